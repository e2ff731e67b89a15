"""/diagnostics on a real graph: a failing model is an ERROR, frames lost before the node and a slow node are WARNs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import Image

from ros_graph import TIMEOUT_S, RosGraph, wait_matched, wait_until
from unet_perception.node_stats import MAX_JUMPS
from unet_perception.tools.camera_sim import image_message, synthetic_frame

TOPIC = "/diag/image_raw"


class Rig:
    """A node with one camera, its publisher, a labels collector and a /diagnostics collector."""

    def __init__(self, graph: RosGraph, model: str) -> None:
        self.node = graph.segmentation_node(model_path=model, image_topics=[TOPIC], diagnostics_period=0.2)
        self.pub = graph.publisher(Image, TOPIC)
        self.graph = graph
        self.labels = graph.collect(Image, "/diag/segmentation/labels")
        self.diagnostics = graph.collect(DiagnosticArray, "/diagnostics", 10)
        wait_matched(self.pub, [self.labels])
        self.backend = self.node._segmenter.backend

    def send(self, i: int, stamp_ns: int, stamp: Time | None = None) -> None:
        """Publish frame ``i`` stamped ``stamp_ns`` (or ``stamp`` as it is) and wait until the node has it."""
        before = self.node._cameras[0].stats.frames_in
        stamp = stamp or Time(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
        self.pub.publish(image_message(synthetic_frame(64, 48, i), "rgb8", stamp=stamp))
        wait_until(lambda: self.node._cameras[0].stats.frames_in > before, what=f"frame {i} at the node")

    def statuses(self, match: Callable[[DiagnosticStatus], bool]) -> list[DiagnosticStatus]:
        """Every /diagnostics status of the camera so far that ``match`` accepts."""
        return [s for msg in self.diagnostics.wait_for(0) for s in msg.status if s.hardware_id == TOPIC and match(s)]

    def wait_status(self, match: Callable[[DiagnosticStatus], bool], what: str) -> DiagnosticStatus:
        """The first /diagnostics status of the camera that ``match`` accepts, waiting for it if need be."""
        wait_until(lambda: bool(self.statuses(match)), what=what)
        return self.statuses(match)[0]


def values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


@pytest.fixture
def rig(tiny_model) -> Iterator[Rig]:  # type: ignore[no-untyped-def]
    with RosGraph() as graph:
        yield Rig(graph, str(tiny_model))


def test_a_backend_failing_every_batch_is_an_error(rig: Rig) -> None:
    def fail(batch: np.ndarray) -> None:
        raise RuntimeError("simulated dead GPU")

    rig.backend._infer = fail
    deadline = time.monotonic() + TIMEOUT_S
    status = None
    while status is None and time.monotonic() < deadline:  # keep frames coming until a period reports them
        rig.send(0, 0)
        found = rig.statuses(lambda s: s.level == DiagnosticStatus.ERROR)
        status = found[-1] if found else None
        time.sleep(0.05)
    assert status is not None, "no ERROR status while every batch failed"
    assert "no output for" in status.message and "good frames" in status.message
    assert int(status.message.split("no output for ")[1].split()[0]) >= 1
    v = values(status)
    assert "simulated dead GPU" in v["last_error"] and int(v["errors"]) >= 1 and v["frames_out"] == "0"
    wait_until(lambda: not rig.node._cameras[0].in_progress, what="the failed frames out of progress")


def test_class_ids_outside_the_table_are_an_error_not_output(rig: Rig) -> None:
    def bad_ids(batch: np.ndarray) -> tuple[np.ndarray, None]:
        return np.full((batch.shape[0], *rig.backend.input_hw), 200, np.uint8), None

    rig.backend._infer = bad_ids
    rig.send(0, 0)
    rig.wait_status(lambda s: "emitted class id 200" in values(s)["last_error"], "the bad ids reported")
    # The period in which the frame was decoded had a good frame and no output: ERROR, whichever period the
    # error itself landed in (the same one, or the next, which then only WARNs about 1 error).
    error = rig.wait_status(lambda s: s.level == DiagnosticStatus.ERROR, "an ERROR status")
    assert error.message.startswith("no output for 1 good frames")
    assert len(rig.labels) == 0


@contextmanager
def held_inference(rig: Rig) -> Iterator[threading.Event]:
    """The backend holds every frame in inference until the block ends (the event: a frame is held), then runs
    it; the backend's own inference is back afterwards."""
    real_infer, held, go = rig.backend._infer, threading.Event(), threading.Event()

    def hold(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        held.set()
        go.wait(TIMEOUT_S)
        return real_infer(batch)

    rig.backend._infer = hold
    try:
        yield held
    finally:
        go.set()
        rig.backend._infer = real_infer


def test_a_frame_still_in_inference_as_a_period_ends_is_not_an_error(rig: Rig,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The last frame of a camera that stops, decoded in one period and published in a later one: no period may
    call it missing output (a period with it decoded and nothing out was an ERROR, and a test of a camera stopping
    saw that level once in a CI run). Held here for three periods (0.6 s), then let go."""
    monkeypatch.setattr("unet_perception.node.STUCK_S", 60.0)  # slow, not hung, however loaded the machine is
    seen = len(rig.diagnostics.wait_for(0))
    with held_inference(rig) as held:
        rig.send(0, 1_000_000_000)
        wait_until(held.is_set, what="the frame in (held) inference")
        wait_until(lambda: len(rig.diagnostics.wait_for(0)) >= seen + 3, what="three periods while it is held")
    rig.labels.wait_for(1)
    done = len(rig.diagnostics.wait_for(0))
    wait_until(lambda: len(rig.diagnostics.wait_for(0)) >= done + 2, what="the periods after it was published")
    assert not rig.statuses(lambda s: s.level == DiagnosticStatus.ERROR), \
        [s.message for s in rig.statuses(lambda s: s.level != DiagnosticStatus.OK)]


def test_a_frame_that_never_ends_is_an_error_and_the_node_recovers(rig: Rig) -> None:
    """A hung backend: the one frame in inference neither ends nor fails. Once it has been in progress for 2 s
    (STUCK_S) with nothing out, ERROR naming how long; let go, its labels go out and the ERROR ends."""
    from unet_perception.node import STUCK_S

    start = time.monotonic()
    with held_inference(rig) as held:
        rig.send(0, 1_000_000_000)
        wait_until(held.is_set, what="the frame in (hung) inference")
        stuck = rig.wait_status(lambda s: s.level == DiagnosticStatus.ERROR, "an ERROR while the frame hangs")
    assert time.monotonic() - start >= STUCK_S
    assert stuck.message.startswith("no output: a frame has been in progress for"), stuck.message
    assert float(stuck.message.split(" for ")[1].split()[0]) >= STUCK_S
    rig.labels.wait_for(1)
    seen = len(rig.diagnostics.wait_for(0))
    wait_until(lambda: len(rig.diagnostics.wait_for(0)) >= seen + 2, what="two periods after the frame went out")
    # the frame leaves in_progress with frames_out counted (one lock): no status that counts it is an ERROR
    assert not rig.statuses(lambda s: values(s)["frames_out"] != "0" and s.level == DiagnosticStatus.ERROR)
    rig.send(1, 2_000_000_000)
    rig.labels.wait_for(2)
    wait_until(lambda: not rig.node._cameras[0].in_progress, what="no frame left in progress")


def test_frames_lost_before_the_node_are_counted_from_stamps(rig: Rig) -> None:
    """A 10 Hz camera (by its stamps) whose frames 10, 11 and 12 never arrive: 3 missing, camera rate 10 Hz."""
    period = 100_000_000
    for i in [*range(10), *range(13, 16)]:
        rig.send(i, 5_000_000_000 + i * period)
    status = rig.wait_status(lambda s: values(s)["frames_missing"] == "3", "3 frames missing")
    assert 9.5 < float(values(status)["camera_rate_hz"]) < 10.5
    missing = rig.wait_status(lambda s: "frames missing before the node" in s.message, "the WARN naming them")
    assert missing.level == DiagnosticStatus.WARN and "3 frames missing" in missing.message


def test_a_stamp_jump_is_one_warn_and_the_counts_survive(rig: Rig) -> None:
    """A 10 Hz camera sends one frame stamped 99 s ahead, then goes on and loses frame 25. Before, that one
    frame set frames_missing to 989 for good; now it is one WARN naming the jump, and 1 frame missing."""
    for i in range(20):
        rig.send(i, 5_000_000_000 + i * PERIOD)
    rig.send(20, 5_000_000_000 + 99 * 1_000_000_000 + 19 * PERIOD)
    for i in [*range(20, 25), *range(26, 30)]:
        rig.send(i, 5_000_000_000 + i * PERIOD)
    status = rig.wait_status(lambda s: values(s)["frames_in"] == "30", "a status after the last frame")
    assert values(status)["frames_missing"] == "1" and 9.5 < float(values(status)["camera_rate_hz"]) < 10.5
    rig.wait_status(lambda s: s.message == "ok" and values(s)["frames_in"] == "30", "OK once the jump was reported")
    jumps = rig.statuses(lambda s: "stamps jumped" in s.message)
    assert len(jumps) == 1 and jumps[0].level == DiagnosticStatus.WARN, [s.message for s in jumps]
    assert "stamps jumped +99.0 s" in jumps[0].message
    assert not rig.statuses(lambda s: int(values(s)["frames_missing"]) > 1)


def test_many_stamp_jumps_are_one_short_warn_each_counted(rig: Rig) -> None:
    """40 frames each stamped 100 s after the last: every jump is reported once (named, or counted as 'N more
    stamp jumps'), and no status names more than MAX_JUMPS of them (the message stays short whatever the rate)."""
    for i in range(10):
        rig.send(i, 5_000_000_000 + i * PERIOD)
    for k in range(1, 41):
        rig.send(9 + k, 5_000_000_000 + 9 * PERIOD + k * 100_000_000_000)
    rig.wait_status(lambda s: values(s)["frames_in"] == "50" and "jump" not in s.message, "all jumps reported")
    reported = 0
    for status in rig.statuses(lambda s: "jump" in s.message):
        named = status.message.count("stamps jumped +100.0 s")
        assert named <= MAX_JUMPS and status.level == DiagnosticStatus.WARN, status.message
        more = status.message.split(" more stamp jumps")[0].rsplit(" ", 1)[-1] if "more stamp" in status.message \
            else "0"
        reported += named + int(more)
    assert reported == 40


def test_an_invalid_stamp_is_bad_input(rig: Rig) -> None:
    """nanosec = 4e9 is not a time: a counted error, not published, and not 40 frames missing."""
    for i in range(10):
        rig.send(i, 5_000_000_000 + i * PERIOD)
        rig.labels.wait_for(i + 1)  # one at a time: none replaced in the keep-latest slot
    rig.send(10, 0, Time(sec=5, nanosec=4_000_000_000))
    rig.send(11, 5_000_000_000 + 10 * PERIOD)
    labels = rig.labels.wait_for(11)
    status = rig.wait_status(lambda s: values(s)["frames_in"] == "12", "a status after the last frame")
    assert values(status)["errors"] == "1" and "nanosec=4000000000" in values(status)["last_error"]
    assert values(status)["frames_missing"] == "0"
    assert rig.statuses(lambda s: s.level == DiagnosticStatus.WARN and "1 errors" in s.message)
    assert len(rig.labels) == 11 and 4_000_000_000 not in [m.header.stamp.nanosec for m in labels]


def test_output_far_below_the_camera_rate_is_a_warning(rig: Rig) -> None:
    """Stamps say 20 Hz; inference takes 0.4 s a frame: the status says so (not only 'drops')."""
    real_infer = rig.backend._infer

    def slow(batch: np.ndarray):  # type: ignore[no-untyped-def]
        time.sleep(0.4)
        return real_infer(batch)

    rig.backend._infer = slow
    start = time.monotonic()
    i = 0
    status = None
    while status is None and time.monotonic() - start < TIMEOUT_S:
        rig.send(i, 1_000_000_000 + i * 50_000_000)
        i += 1
        time.sleep(0.05)
        found = rig.statuses(lambda s: "Hz camera" in s.message)
        status = found[-1] if found else None
    assert status is not None, "no status named the slow processing"
    assert status.level == DiagnosticStatus.WARN and "processing" in status.message
    assert 15.0 < float(values(status)["camera_rate_hz"]) < 25.0


def test_a_frame_that_fails_to_publish_is_counted_and_the_worker_goes_on(rig: Rig) -> None:
    """An exception after inference (render, encode, publish) is one counted error; the next frame is published
    (before, it ended the worker thread: no output on any camera until restart)."""
    segmenter = rig.node._segmenter
    real_render = segmenter.render
    calls = []

    def render_failing_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated render failure")
        return real_render(*args, **kwargs)

    segmenter.render = render_failing_once
    rig.send(0, 0)
    rig.wait_status(lambda s: "simulated render failure" in values(s)["last_error"], "the failure counted")
    assert len(rig.labels) == 0
    rig.send(1, 0)
    rig.labels.wait_for(1)


@pytest.mark.parametrize("failing", [("color",), ("labels",), ("labels", "color")])
def test_an_output_that_cannot_be_published_holds_back_no_other(rig: Rig, failing: tuple[str, ...]) -> None:
    """The colour mask's publish failing (an rmw error) is an error naming it, a WARN; the labels still go out and
    the frame counts as published. The labels failing fails the frame (they are what planners read), whatever else
    went out: the status is the ERROR "no output"."""
    color = rig.graph.collect(Image, "/diag/segmentation/color")  # subscribed, so the node renders and publishes it
    cam = rig.node._cameras[0]
    wait_until(lambda: cam.publishers["color"].get_subscription_count() > 0, what="the colour subscriber matched")

    def refuse(msg: bytes) -> None:
        raise RuntimeError("simulated rmw error")

    for kind in failing:
        cam.publishers[kind].publish = refuse
    rig.send(0, 1_000_000_000)
    said = "; ".join(f"{kind}: RuntimeError: simulated rmw error" for kind in failing)
    if "labels" not in failing:
        rig.labels.wait_for(1)
        wait_until(lambda: cam.stats.frames_out == 1 and cam.stats.errors == 1, what="frame 0 out, one error")
        assert cam.stats.failed == 0
        assert cam.stats.last_error == f"publishing failed on /diag/image_raw: {said}"
        status = rig.wait_status(lambda s: s.level != DiagnosticStatus.OK, "a status that is not OK")
        assert status.level == DiagnosticStatus.WARN, status.message
    else:
        wait_until(lambda: cam.stats.failed == 1 and not cam.in_progress, what="frame 0 failed and ended")
        assert cam.stats.frames_out == 0 and len(rig.labels) == 0
        assert cam.stats.last_error == f"publishing failed on /diag/image_raw: {said}"
        status = rig.wait_status(lambda s: s.level == DiagnosticStatus.ERROR, "the ERROR")
        assert status.message.startswith("no output for 1 good frames"), status.message
    if "color" in failing:
        assert len(color) == 0
    else:  # the colour mask went out although the frame failed on its labels
        color.wait_for(1)


PERIOD = 100_000_000  # a 10 Hz camera's stamps


def stamp_rate(stamps: list[int]):  # type: ignore[no-untyped-def]
    from unet_perception.node_stats import StampRate

    rate = StampRate()
    for ns in stamps:
        rate.add(ns)
    return rate


def test_stamps_after_a_bag_loop_are_counted_again() -> None:
    """The bag starts over (stamps jump back 30 s); frames 13 and 14 of the second pass are lost: 2 missing.
    Before, every stamp below the first pass's last one was ignored, so the second pass counted nothing."""
    first = [5_000_000_000 + i * PERIOD for i in range(300)]
    second = [5_000_000_000 + i * PERIOD for i in range(20) if i not in (13, 14)]
    rate = stamp_rate(first + second)
    assert rate.missing == 2 and round(rate.rate_hz()) == 10


def test_one_frame_stamped_in_the_future_does_not_blind_the_camera() -> None:
    """A frame stamped a day ahead (a bad clock, a hostile sender), then the camera goes on and loses a frame."""
    good = [5_000_000_000 + i * PERIOD for i in range(10)]
    later = [5_000_000_000 + i * PERIOD for i in range(10, 20) if i != 15]
    rate = stamp_rate([*good, 5_000_000_000 + 86_400 * 1_000_000_000, *later])
    assert rate.missing == 1 and round(rate.rate_hz()) == 10


def test_a_stray_stamp_and_a_clock_reset_are_reported_once_each() -> None:
    """One frame 99 s ahead, back on time, then the clock steps back 60 s for good: two jumps, nothing missing,
    the rate kept."""
    base = [100_000_000_000 + i * PERIOD for i in range(10)]
    stray = 100_000_000_000 + 99 * 1_000_000_000
    after = [base[-1] + i * PERIOD for i in range(1, 6)]
    reset = [after[-1] - 60 * 1_000_000_000 + i * PERIOD for i in range(5)]
    rate = stamp_rate([*base, stray, *after, *reset])
    assert rate.missing == 0 and round(rate.rate_hz()) == 10
    jumps, more = rate.take_jumps()
    assert [round(ns / 1e9, 1) for ns in jumps] == [round((stray - base[-1]) / 1e9, 1), -60.0] and more == 0
    assert rate.take_jumps() == ([], 0)


def test_stamps_jumping_every_frame_are_counted_in_bounded_memory() -> None:
    """A sender stamping each frame 100 s after the last (a broken clock, a hostile sender): every frame is a
    jump. Before, each was kept in a list until the next status and then named one by one in its message, so
    the memory and the /diagnostics text grew with the input rate times diagnostics_period."""
    base = [5_000_000_000 + i * PERIOD for i in range(10)]
    rate = stamp_rate([*base, *(base[-1] + k * 100_000_000_000 for k in range(1, 10_001))])
    jumps, more = rate.take_jumps()
    assert [round(ns / 1e9) for ns in jumps] == [100] * MAX_JUMPS and more == 10_000 - MAX_JUMPS
    assert rate.take_jumps() == ([], 0) and rate.missing == 0


def test_unset_repeated_and_slightly_late_stamps_are_not_losses() -> None:
    base = [5_000_000_000 + i * PERIOD for i in range(10)]
    rate = stamp_rate([*base[:8], 0, base[7], base[6], *base[8:]])
    assert rate.missing == 0 and round(rate.rate_hz()) == 10


def test_what_a_valid_stamp_is() -> None:
    from unet_perception.node_stats import check_stamp, stamp_ns

    for bad in (Time(sec=5, nanosec=1_000_000_000), Time(sec=5, nanosec=4_294_967_295), Time(sec=-1, nanosec=0)):
        with pytest.raises(ValueError, match="not a valid time"):
            check_stamp(bad)
        assert stamp_ns(bad) == 0  # says nothing to the rate, like an unset stamp
    for good in (Time(sec=0, nanosec=0), Time(sec=5, nanosec=999_999_999), Time(sec=2**31 - 1, nanosec=0)):
        check_stamp(good)
    assert stamp_ns(Time(sec=5, nanosec=999_999_999)) == 5_999_999_999
