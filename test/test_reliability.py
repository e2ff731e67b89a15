"""Faults on a real rclpy graph: the node keeps serving through them, and says what happened.

Camera restarts, size and encoding changes mid-stream, a camera sending garbage next to a good one, a
backend failing on one batch, the node itself killed and restarted (what ``respawn`` does) and a
missing default model. Every wait has an explicit timeout (``ros_graph.TIMEOUT_S``). The bad-message
catalogue (each kind of bad frame) is in test_node_bad_input.py, hostile frames in test_node_hostile.py,
parameter errors in test_params.py and the launch file's ``respawn`` argument in test_launch.py.

No assertion here depends on how fast this machine is (a 2-core CI machine may also be training): shares
are compared within one run and counts against what was sent in the same run; speed is benchmarks' job.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image

import unet_perception.node as node_module
from reference import Reference
from ros_graph import (Collector, RosGraph, TIMEOUT_S, start_node_process, stop_process, wait_matched,
                       wait_until)
from unet_perception.backends.base import Backend
from unet_perception.backends.factory import create_backend
from unet_perception.launch_support import PACKAGE, node_command, node_env
from unet_perception.tools.camera_sim import image_message, synthetic_frame

RATE_HZ = 20.0
DIAG_PERIOD_S = 0.25
# The good camera keeps at least this share of its output next to two garbage cameras. Starvation (the bug) takes
# it near 0; the flood itself costs CPU on a 2-core machine (publishing it, refusing it), so a loaded machine
# measured 0.57-0.75 of the share alone now and then: 0.5 keeps the test about starvation, not about load.
MIN_SHARE = 0.5
WINDOW_S, ROUNDS = 1.0, 4    # the starvation test alternates 1 s alone and 1 s beside the junk, 4 times each


class Stream:
    """Publishes ``make(i)`` on ``publisher`` at ``rate`` Hz from a thread (``count`` frames, or until stopped)."""

    def __init__(self, publisher: Any, make: Callable[[int], Any], rate: float = RATE_HZ, count: int = 0) -> None:
        self.publisher, self.make, self.period, self.count = publisher, make, 1.0 / rate, count
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set() and (not self.count or self.sent < self.count):
            self.publisher.publish(self.make(self.sent))
            self.sent += 1
            self._stop.wait(max(0.0, start + self.sent * self.period - time.monotonic()))

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT_S)

    def join(self) -> None:
        """Wait until all ``count`` frames are sent."""
        self._thread.join(timeout=self.count * self.period + TIMEOUT_S)


class Diagnostics:
    """/diagnostics of the node under test: the latest values per camera."""

    def __init__(self, graph: RosGraph) -> None:
        self.collector: Collector = graph.collect(DiagnosticArray, "/diagnostics", 10)

    def status(self, topic: str) -> DiagnosticStatus:
        self.collector.wait_for(1)
        return next(s for s in self.collector.messages[-1].status if s.hardware_id == topic)

    def text(self, topic: str, key: str) -> str:
        return next(kv.value for kv in self.status(topic).values if kv.key == key)

    def value(self, topic: str, key: str) -> float:
        return float(self.text(topic, key))

    def wait(self, topic: str, what: str, predicate: Callable[[Callable[[str], float]], bool]) -> None:
        """Wait until ``predicate(value_of_key)`` holds for ``topic``'s latest status."""
        wait_until(lambda: predicate(lambda key: self.value(topic, key)), what=f"{what} on {topic}")


def frame_message(i: int, width: int = 64, height: int = 48, encoding: str = "rgb8") -> Image:
    """Synthetic frame ``i``; its stamp's seconds carry ``i`` so outputs can be matched to inputs."""
    return image_message(synthetic_frame(width, height, i), encoding, stamp=Time(sec=i))


def test_camera_stops_and_restarts(tiny_model: Path) -> None:
    """A camera driver that goes away and comes back: output stops, the node stays healthy, output resumes."""
    topic = "/restart/image_raw"
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=[topic], diagnostics_period=DIAG_PERIOD_S)
        labels = graph.collect(Image, "/restart/segmentation/labels")
        diag = Diagnostics(graph)
        for run in range(2):
            camera = Node("restarting_camera", context=graph.context)  # a new participant each time
            pub = camera.create_publisher(Image, topic, qos_profile_sensor_data)
            wait_matched(pub, [labels])
            before = len(labels)
            with Stream(pub, frame_message):
                labels.wait_for(before + 10)
                diag.wait(topic, f"output reported while streaming in run {run}",
                          lambda v: v("rate_in_hz") > 0 and v("rate_out_hz") > 0)
            camera.destroy_node()
            diag.wait(topic, "silence after the camera stopped", lambda v: v("rate_in_hz") == v("rate_out_hz") == 0)
            assert diag.status(topic).level == DiagnosticStatus.OK  # no input is not an error
        assert diag.value(topic, "errors") == 0
        assert diag.value(topic, "frames_out") >= 20


def test_size_and_encoding_change_mid_stream(tiny_model: Path) -> None:
    """320x240 rgb8 -> 640x480 bgr8 -> 160x120 mono8 -> 320x240 rgb8 without a pause: outputs follow."""
    topic = "/morph/image_raw"
    phases = [((320, 240), "rgb8"), ((640, 480), "bgr8"), ((160, 120), "mono8"), ((320, 240), "rgb8")]
    per_phase = 8
    overlay_family = {"rgb8": "rgb8", "bgr8": "bgr8", "mono8": "rgb8"}

    def make(i: int) -> Image:
        (width, height), encoding = phases[i // per_phase]
        return frame_message(i, width, height, encoding)

    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=[topic])
        pub = graph.publisher(Image, topic)
        outs = {kind: graph.collect(Image, f"/morph/segmentation/{kind}") for kind in ("labels", "color", "overlay")}
        diag = Diagnostics(graph)
        wait_matched(pub, list(outs.values()))
        with Stream(pub, make, count=len(phases) * per_phase) as stream:
            stream.join()
        last = make(len(phases) * per_phase - 1).header.stamp

        def answered(collector: Collector) -> bool:
            return len(collector) > 0 and collector.messages[-1].header.stamp == last

        for collector in outs.values():
            wait_until(partial(answered, collector), what=f"the last frame's output on {collector.topic}")
        assert diag.value(topic, "errors") == 0

    reference = Reference(tiny_model)  # cv2 + ONNX Runtime, not the production pipeline
    seen = set()
    for kind, collector in outs.items():
        for msg in collector.messages:
            i = msg.header.stamp.sec
            (width, height), encoding = phases[i // per_phase]
            assert (msg.width, msg.height) == (width, height), (kind, i)
            assert msg.encoding == {"labels": "mono8", "color": "rgb8", "overlay": overlay_family[encoding]}[kind]
            seen.add(i // per_phase)
            if kind == "labels":
                expected = reference.run([rgb_of(make(i))])[0].labels
                np.testing.assert_array_equal(np.frombuffer(bytes(msg.data), np.uint8).reshape(height, width),
                                              expected)
    assert seen == set(range(len(phases))), "every phase produced outputs"


def rgb_of(msg: Image) -> np.ndarray:
    """The RGB pixels of an uncompressed rgb8 / bgr8 / mono8 frame, by the encodings' definitions (not the codec)."""
    pixels = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)[:, : msg.width * (
        1 if msg.encoding == "mono8" else 3)].reshape(msg.height, msg.width, -1)
    return {"rgb8": pixels, "bgr8": pixels[:, :, ::-1], "mono8": np.repeat(pixels, 3, axis=2)}[msg.encoding].copy()


def junk_image(_: int) -> Image:
    """Claims 640x480 rgb8 but carries 100 bytes."""
    msg = Image(encoding="rgb8", width=640, height=480, step=640 * 3)
    msg.data = bytes(100)
    return msg


def junk_jpeg(_: int) -> CompressedImage:
    msg = CompressedImage(format="jpeg")
    msg.data = b"\xff\xd8\xff\xe0" + bytes(500)
    return msg


def test_garbage_camera_does_not_starve_a_good_one(tiny_model: Path) -> None:
    """Two cameras flooding garbage (4x the good rate): the good camera keeps its output; errors only on them."""
    good, junk, junk_c = "/good/image_raw", "/junk/image_raw", "/junk_c/image_raw/compressed"
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=[good, junk, junk_c],
                                diagnostics_period=DIAG_PERIOD_S)
        pubs = {good: graph.publisher(Image, good), junk: graph.publisher(Image, junk),
                junk_c: graph.publisher(CompressedImage, junk_c)}
        labels = graph.collect(Image, "/good/segmentation/labels")
        junk_labels = graph.collect(Image, "/junk/segmentation/labels")
        diag = Diagnostics(graph)
        wait_matched(pubs[good], [labels])
        wait_until(lambda: all(p.get_subscription_count() for p in pubs.values()), what="the junk cameras' match")

        junk_sent = {junk: 0, junk_c: 0}

        def window(first: int, with_junk: bool) -> tuple[int, int]:
            """(answered, sent) of the good camera's frames during one window of streaming (stamps from ``first``)."""
            before = len(labels)
            with ExitStack() as streams:
                camera = streams.enter_context(Stream(pubs[good], lambda i: frame_message(first + i)))
                junk_streams = {t: streams.enter_context(Stream(pubs[t], make, 4 * RATE_HZ))
                                for t, make in ((junk, junk_image), (junk_c, junk_jpeg)) if with_junk}
                time.sleep(WINDOW_S)  # the measurement window, not a synchronisation
            for t, stream in junk_streams.items():
                junk_sent[t] += stream.sent
            last = first + camera.sent - 1  # the keep-latest slot always processes a camera's newest frame
            wait_until(lambda: len(labels) > before and labels.messages[-1].header.stamp.sec == last,
                       what=f"the output of good frame {last}")
            return len(labels) - before, camera.sent

        # Alone and beside the junk in alternating windows: the share answered depends on the CPU the node gets,
        # and on the shared 2-core machine that drifts by 2x within seconds (one 3 s window alone then one with
        # junk once gave 0.81 then 0.377). Interleaved, a drift in load falls on both sides alike.
        totals = {False: [0, 0], True: [0, 0]}  # with junk -> [answered, sent]
        for r in range(ROUNDS):
            for with_junk in (False, True):
                answered, sent = window(10_000 * (2 * r + with_junk), with_junk)
                totals[with_junk][0] += answered
                totals[with_junk][1] += sent
        alone, beside_junk = (answered / sent for answered, sent in (totals[False], totals[True]))
        assert beside_junk >= MIN_SHARE * alone, (alone, beside_junk, totals)
        # Every junk frame that reached the node is an error, refused in its callback (never queued: no drops), and
        # none came out. How many reach it is not the node's to promise: best effort with keep-last 5 loses what a
        # loaded machine's executor does not take in time (under a training job, over 3/4 of 80 Hz has been lost).
        for topic in (junk, junk_c):
            diag.wait(topic, "every junk frame that arrived counted as an error",
                      lambda v, topic=topic: 0 < v("frames_in") == v("errors") <= junk_sent[topic]
                      and v("drops") == v("frames_out") == 0)
        assert "needs 921600 bytes" in diag.text(junk, "last_error")
        assert "not a decodable" in diag.text(junk_c, "last_error")
        assert diag.value(good, "errors") == 0 and diag.text(good, "last_error") == ""
        assert diag.value(junk, "frames_out") == 0 and len(junk_labels) == 0


class FailingBackend(Backend):
    """Wraps a real backend; raises on the next batch after :meth:`fail_next_batch`, then works again."""

    name = "failing"

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner.info, inner.max_batch)
        self.inner = inner
        self._armed = threading.Event()
        self.failed_batches: list[int] = []  # sizes of the batches that raised

    def fail_next_batch(self) -> None:
        self._armed.set()

    def _activate(self) -> None:
        self.inner.activate()

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self._armed.is_set():
            self._armed.clear()
            self.failed_batches.append(len(batch))
            raise RuntimeError("injected device failure")
        pred = self.inner.infer(batch)
        return pred.labels, pred.confidence

    def _deactivate(self) -> None:
        self.inner.close()


@pytest.fixture
def failing_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FailingBackend]]:
    """The node's backend factory wrapped so that the node gets a FailingBackend (listed here once made)."""
    made: list[FailingBackend] = []

    def factory(*args: Any, **kwargs: Any) -> Backend:
        made.append(FailingBackend(create_backend(*args, **kwargs)))
        return made[-1]

    monkeypatch.setattr(node_module, "create_backend", factory)
    yield made


def test_backend_raising_on_one_batch(tiny_model: Path, failing_backend: list[FailingBackend],
                                      capfd: pytest.CaptureFixture[str]) -> None:
    """One batch of four cameras fails: logged, counted on exactly its cameras, and the next batch is fine."""
    topics = [f"/cam{i}/image_raw" for i in range(4)]
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=topics, max_batch=4,
                                diagnostics_period=DIAG_PERIOD_S)
        (backend,) = failing_backend
        pubs = {t: graph.publisher(Image, t) for t in topics}
        labels = {t: graph.collect(Image, t.replace("image_raw", "segmentation/labels")) for t in topics}
        diag = Diagnostics(graph)
        for t in topics:
            wait_matched(pubs[t], [labels[t]])

        def publish_round(i: int) -> None:
            for pub in pubs.values():
                pub.publish(frame_message(i))

        publish_round(0)
        for collector in labels.values():
            collector.wait_for(1)
        backend.fail_next_batch()
        publish_round(1)
        for t in topics:  # each camera's frame 1 either failed (an error) or came out
            diag.wait(t, "frame 1 settled", lambda v, t=t: v("errors") + len(labels[t]) == 2)  # type: ignore[misc]
        failed = {t for t in topics if diag.value(t, "errors")}
        assert len(backend.failed_batches) == 1 and len(failed) == backend.failed_batches[0]
        for t in failed:
            assert diag.text(t, "last_error") == f"inference failed on {t}: RuntimeError: injected device failure"
        publish_round(2)
        for t in topics:
            got = labels[t].wait_for(3 - (t in failed))
            assert [m.header.stamp.sec for m in got] == ([0, 2] if t in failed else [0, 1, 2])
            diag.wait(t, "a quiet period", lambda v: v("rate_in_hz") == 0)
            assert diag.status(t).level == DiagnosticStatus.OK
    assert "injected device failure" in capfd.readouterr().err


def test_node_killed_and_restarted_under_a_running_camera(tiny_model: Path) -> None:
    """What ``respawn:=true`` does: the node process dies (SIGKILL), a new one starts, output resumes."""
    topic = "/respawn/image_raw"
    params = {"model_path": str(tiny_model), "image_topics": [topic]}
    with RosGraph() as graph:
        pub = graph.publisher(Image, topic)
        labels = graph.collect(Image, "/respawn/segmentation/labels")
        with Stream(pub, frame_message):
            crashed = start_node_process(params)
            try:
                labels.wait_for(10)
            finally:
                crashed.kill()  # no clean shutdown: its DDS participant just vanishes
                crashed.communicate(timeout=TIMEOUT_S)
            before = len(labels)
            respawned = start_node_process(params)
            try:
                labels.wait_for(before + 10)
            finally:
                out = stop_process(respawned)
    assert respawned.returncode == 0, out


def test_missing_default_model_exits_with_a_clear_message(tmp_path: Path) -> None:
    """No model_path and no model in the package share (a fresh install before training): exit 1, say why."""
    prefix = tmp_path / "install"
    (prefix / "share" / "ament_index" / "resource_index" / "packages").mkdir(parents=True)
    (prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE).touch()
    (prefix / "share" / PACKAGE).mkdir()
    env = os.environ | node_env() | {"AMENT_PREFIX_PATH": str(prefix)}
    result = subprocess.run(node_command(overrides={"image_topics": ["/nomodel/image_raw"]}), env=env,
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    missing = prefix / "share" / PACKAGE / "models" / "unet_camvid.onnx"
    assert f"'{missing}'" in output and "does not exist" in output and "set model_path" in output, output
    assert "Traceback" not in output
