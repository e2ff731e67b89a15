"""The node's overlapped stages on a real rclpy graph: they overlap, and each camera's outputs stay in order,
each frame once, with keep-latest slots in front (test_node.py has the keep-latest case itself)."""

from __future__ import annotations

import threading
import time
from functools import partial

import numpy as np
import pytest
from rclpy.lifecycle import TransitionCallbackReturn
from builtin_interfaces.msg import Time
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image

from ros_graph import TIMEOUT_S, RosGraph, wait_matched, wait_until
from unet_perception.tools.camera_sim import image_message, synthetic_frame

CAMERAS = ("/st_a", "/st_b")
FRAMES = 40


def stamp_ns(t: Time) -> int:
    return t.sec * 1_000_000_000 + t.nanosec


def stats(cams) -> str:  # type: ignore[no-untyped-def]
    return ", ".join(f"in {c.stats.frames_in} out {c.stats.frames_out} drops {c.stats.drops} errors "
                     f"{c.stats.errors}" for c in cams)


def test_stages_overlap(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Frame 1 is inferred while frame 0 is still being published (in turn, frame 1 would wait for it)."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/ov/image_raw"], overlap="always")
        pub = graph.publisher(Image, "/ov/image_raw")
        labels = graph.collect(Image, "/ov/segmentation/labels")
        wait_matched(pub, [labels])
        segmenter, backend = node._segmenter, node._segmenter.backend
        real_render, real_infer = segmenter.render, backend._infer
        rendering, release = threading.Event(), threading.Event()
        inferred: list[int] = []

        def blocked_render(*args, **kwargs):  # type: ignore[no-untyped-def]
            rendering.set()
            release.wait(TIMEOUT_S)
            return real_render(*args, **kwargs)

        def counted_infer(batch: np.ndarray):  # type: ignore[no-untyped-def]
            inferred.append(len(batch))
            return real_infer(batch)

        segmenter.render, backend._infer = blocked_render, counted_infer
        try:
            pub.publish(image_message(synthetic_frame(64, 48, 0), "rgb8", stamp=Time(sec=10)))
            assert rendering.wait(TIMEOUT_S), "frame 0 never reached the publish stage"
            pub.publish(image_message(synthetic_frame(64, 48, 1), "rgb8", stamp=Time(sec=11)))
            wait_until(lambda: len(inferred) == 2, TIMEOUT_S / 2,  # well before the render gives up waiting
                       what="frame 1 to be inferred while frame 0 is being published")
        finally:
            release.set()
        got = labels.wait_for(2)
        segmenter.render, backend._infer = real_render, real_infer
    assert [m.header.stamp.sec for m in got] == [10, 11]


def test_outputs_in_order_once_each_under_load(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Two cameras much faster than a (slowed) backend: per camera, the labels come in stamp order, each frame at
    most once, the last frame always gets through, and every frame is either published or counted as a drop."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model),
                                       image_topics=[f"{ns}/image_raw" for ns in CAMERAS], overlap="always",
                                       input_qos="reliable", qos_depth=FRAMES)  # DDS loses none: the slot decides
        pubs = [graph.publisher(Image, f"{ns}/image_raw", QoSProfile(depth=FRAMES)) for ns in CAMERAS]
        outs = [graph.collect(Image, f"{ns}/segmentation/labels") for ns in CAMERAS]
        for pub, out in zip(pubs, outs):
            wait_matched(pub, [out])
        backend = node._segmenter.backend
        real_infer = backend._infer

        def slow(batch: np.ndarray):  # type: ignore[no-untyped-def]
            time.sleep(0.02)
            return real_infer(batch)

        backend._infer = slow
        frames = [synthetic_frame(64, 48, i) for i in range(4)]
        sent = [[Time(sec=100 + i, nanosec=k) for i in range(FRAMES)] for k in range(len(CAMERAS))]
        for i in range(FRAMES):
            for k, pub in enumerate(pubs):
                pub.publish(image_message(frames[i % 4], "rgb8", stamp=sent[k][i]))
            time.sleep(0.004)
        cams = node._cameras
        wait_until(lambda: all(c.stats.frames_in == FRAMES and c.stats.frames_out + c.stats.drops >= FRAMES
                               for c in cams), what=f"every frame published or dropped ({stats(cams)})")
        wait_until(lambda: all(len(out) == c.stats.frames_out for out, c in zip(outs, cams)),
                   what="every published label to arrive")
        backend._infer = real_infer
        got = [[stamp_ns(m.header.stamp) for m in out.messages] for out in outs]
    for k, stamps in enumerate(got):
        assert stamps == sorted(set(stamps)), f"camera {k}: out of order or repeated: {stamps}"
        assert stamps[-1] == stamp_ns(sent[k][-1]), f"camera {k}: the last frame never came out"
        assert set(stamps) <= {stamp_ns(t) for t in sent[k]}
        assert cams[k].stats.drops > 0, "the load never made the slot drop a frame; the test proves nothing"


def test_more_cameras_than_max_batch_take_turns(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """max_batch 1, one worker, three cameras waiting: the cameras take turns and within a turn the newest frame goes
    first (here camera 2's, though camera 1 comes after camera 0 in a round robin); camera 0, served already, waits
    for the next turn even with the newest frame of all."""
    topics = [f"/rr{k}/image_raw" for k in range(3)]
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=topics, max_batch=1, workers=1)
        pubs = [graph.publisher(Image, t) for t in topics]
        outs = [graph.collect(Image, f"/rr{k}/segmentation/labels") for k in range(3)]
        for pub, out in zip(pubs, outs):
            wait_matched(pub, [out])
        backend, served = node._segmenter.backend, []
        real_infer, real_publish = backend._infer, node._publish_batch
        busy, release = threading.Event(), threading.Event()

        def blocked(batch: np.ndarray):  # type: ignore[no-untyped-def]
            busy.set()
            release.wait(TIMEOUT_S)
            return real_infer(batch)

        def recorded(work):  # type: ignore[no-untyped-def]
            served.append(work.items[0][0].topic)
            return real_publish(work)

        backend._infer, node._publish_batch = blocked, recorded
        frame = synthetic_frame(64, 48, 0)
        try:
            pubs[0].publish(image_message(frame, "rgb8", stamp=Time(sec=1)))
            assert busy.wait(TIMEOUT_S)
            for k in (1, 2, 0):  # one after the other: each slot's frame arrived after the one before
                pubs[k].publish(image_message(frame, "rgb8", stamp=Time(sec=2)))
                wait_until(lambda k=k: node._cameras[k].pending is not None, what=f"camera {k}'s frame in its slot")
        finally:
            backend._infer = real_infer
            release.set()
        wait_until(lambda: len(served) == 4, what="four batches")
    assert served == [topics[0], topics[2], topics[1], topics[0]]


def test_a_camera_back_from_silence_catches_up_by_one_turn(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Camera c, silent while a and b were served three times each, then given a new frame after each of its own
    services: it is served twice in a row (its first frame lifts it to one turn behind a, level with b; then its
    frame is newer than b's), then b's waiting frame goes. It does not hold b back for all the turns it missed
    while silent."""
    topics = [f"/cu_{k}/image_raw" for k in "abc"]
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=topics, max_batch=1, workers=1)
        pubs = [graph.publisher(Image, t) for t in topics]
        outs = [graph.collect(Image, t.replace("image_raw", "segmentation/labels")) for t in topics]
        for pub, out in zip(pubs, outs):
            wait_matched(pub, [out])
        frame, taken = synthetic_frame(64, 48, 0), []
        real_take = node._take_frames

        def recorded():  # type: ignore[no-untyped-def]
            ready = real_take()
            taken.extend("abc"[topics.index(cam.topic)] for cam, _ in ready)
            return ready

        def send(k: int, sec: int) -> None:
            pubs[k].publish(image_message(frame, "rgb8", stamp=Time(sec=sec)))

        node._take_frames = recorded
        for sec in range(1, 4):
            for k in (0, 1):
                send(k, sec)
                wait_until(lambda k=k, sec=sec: len(outs[k].messages) == sec, what=f"camera {k}'s frame {sec} out")
        backend = node._segmenter.backend
        real_infer = backend._infer
        entered, gate = threading.Semaphore(0), threading.Semaphore(0)

        def gated(batch: np.ndarray):  # type: ignore[no-untyped-def]
            entered.release()
            assert gate.acquire(timeout=4 * TIMEOUT_S)
            return real_infer(batch)

        backend._infer = gated
        try:
            send(0, 10)
            assert entered.acquire(timeout=TIMEOUT_S), "a's frame never reached inference"
            for k in (2, 1):  # c's frame first, b's after it: b's is the newest
                send(k, 10)
                wait_until(lambda k=k: node._cameras[k].pending is not None, what=f"camera {k}'s frame in its slot")
            for sec in range(11, 16):
                gate.release()  # the batch in inference ends, the worker takes the next one
                assert entered.acquire(timeout=TIMEOUT_S), "no next batch reached inference"
                if taken[-1] == "b":
                    break
                send(2, sec)  # c has the newest frame again
                wait_until(lambda: node._cameras[2].pending is not None, what="c's new frame in its slot")
        finally:
            backend._infer = real_infer
            for _ in range(8):
                gate.release()
    assert taken[:6] == ["a", "b"] * 3, taken
    assert taken[6:10] == ["a", "c", "c", "b"], taken


def test_a_batch_takes_the_cameras_served_least_before_newer_frames(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """max_batch 2, three cameras: c was served twice, b once, a never; all three wait, c's frame the newest. The
    batch takes a and b (the two served least), not a and c (the newest frames)."""
    topics = [f"/mb_{k}/image_raw" for k in "abc"]
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=topics, max_batch=2, workers=1)
        pubs = [graph.publisher(Image, t) for t in topics]
        outs = [graph.collect(Image, t.replace("image_raw", "segmentation/labels")) for t in topics]
        for pub, out in zip(pubs, outs):
            wait_matched(pub, [out])
        frame, batches = synthetic_frame(64, 48, 0), []
        real_take = node._take_frames

        def recorded():  # type: ignore[no-untyped-def]
            ready = real_take()
            if ready:
                batches.append(sorted("abc"[topics.index(cam.topic)] for cam, _ in ready))
            return ready

        def send_in_order(cams: str, sec: int) -> None:
            for k in ("abc".index(c) for c in cams):
                pubs[k].publish(image_message(frame, "rgb8", stamp=Time(sec=sec)))
                wait_until(lambda k=k: node._cameras[k].pending is not None, what=f"camera {k}'s frame in its slot")

        backend = node._segmenter.backend
        real_infer = backend._infer
        entered, gate = threading.Semaphore(0), threading.Semaphore(0)

        def gated(batch: np.ndarray):  # type: ignore[no-untyped-def]
            entered.release()
            assert gate.acquire(timeout=4 * TIMEOUT_S)
            return real_infer(batch)

        node._take_frames, backend._infer = recorded, gated
        try:
            pubs[2].publish(image_message(frame, "rgb8", stamp=Time(sec=1)))
            assert entered.acquire(timeout=TIMEOUT_S), "c's first frame never reached inference"
            send_in_order("bc", 2)
            gate.release()
            assert entered.acquire(timeout=TIMEOUT_S), "the batch of b and c never reached inference"
            send_in_order("abc", 3)  # a's frame the oldest, c's the newest
            gate.release()
            assert entered.acquire(timeout=TIMEOUT_S), "the third batch never reached inference"
        finally:
            backend._infer = real_infer
            for _ in range(8):
                gate.release()
    assert batches[:3] == [["c"], ["b", "c"], ["a", "b"]], batches


def test_workers_infer_other_cameras_at_once_and_each_camera_in_order(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """workers 2: while camera a's frame is held in inference, camera b's frames go through; a's next frame waits
    for a's first (no second worker takes it), then both come out in stamp order."""
    topics = ["/wk_a/image_raw", "/wk_b/image_raw"]
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=topics, workers=2)
        pubs = [graph.publisher(Image, t) for t in topics]
        outs = [graph.collect(Image, t.replace("image_raw", "segmentation/labels")) for t in topics]
        for pub, out in zip(pubs, outs):
            wait_matched(pub, [out])
        assert [w.name for w in node._workers] == ["segmentation_worker_0", "segmentation_worker_1"]
        backend = node._segmenter.backend
        real_infer = backend._infer
        held, release = threading.Event(), threading.Event()
        runs = {"a": 0, "b": 0}
        lock = threading.Lock()

        def holding_a(batch: np.ndarray):  # type: ignore[no-untyped-def]
            cam = "a" if batch[0, 0, 0, 0] == 0 else "b"  # camera a sends black frames, b white ones
            with lock:
                runs[cam] += 1
                first_of_a = cam == "a" and runs["a"] == 1
            if first_of_a:
                held.set()
                release.wait(4 * TIMEOUT_S)  # longer than the waits below: only the test lets it go
            return real_infer(batch)

        black, white = np.zeros((48, 64, 3), np.uint8), np.full((48, 64, 3), 255, np.uint8)
        backend._infer = holding_a
        try:
            pubs[0].publish(image_message(black, "rgb8", stamp=Time(sec=1)))
            assert held.wait(TIMEOUT_S), "camera a's frame never reached inference"
            pubs[0].publish(image_message(black, "rgb8", stamp=Time(sec=2)))
            wait_until(lambda: node._cameras[0].pending is not None, what="a's second frame in its slot")
            for sec in (1, 2):  # the other worker serves b meanwhile, and never takes a's waiting frame
                pubs[1].publish(image_message(white, "rgb8", stamp=Time(sec=sec)))
                wait_until(partial(lambda n: len(outs[1]) == n, sec), what=f"b's frame {sec} while a's is held")
            assert runs["a"] == 1 and node._cameras[0].pending is not None, \
                "a's second frame was taken while its first was still being processed"
        finally:
            release.set()
        wait_until(lambda: len(outs[0]) == 2, what="a's two frames")
        backend._infer = real_infer
    assert [m.header.stamp.sec for m in outs[0].messages] == [1, 2]
    assert [m.header.stamp.sec for m in outs[1].messages] == [1, 2]
    assert runs == {"a": 2, "b": 2}


def test_a_worker_that_fails_mid_frame_reports_it_and_frees_the_camera(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """workers 2: an exception no step catches is a counted error on that camera, the worker goes on, and the camera
    is free again: its next frame comes out."""
    topics = ["/wf_a/image_raw", "/wf_b/image_raw"]
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=topics, workers=2)
        pub = graph.publisher(Image, topics[0])
        out = graph.collect(Image, "/wf_a/segmentation/labels")
        wait_matched(pub, [out])
        real_decode, calls = node._decode, []

        def failing_once(cam, frame):  # type: ignore[no-untyped-def]
            calls.append(frame.header.stamp.sec)
            if len(calls) == 1:
                raise RuntimeError("planted")
            return real_decode(cam, frame)

        node._decode = failing_once
        cam = node._cameras[0]
        pub.publish(image_message(synthetic_frame(64, 48, 0), "rgb8", stamp=Time(sec=1)))
        wait_until(lambda: cam.stats.errors == 1, what="the failure counted")
        assert cam.stats.last_error == "processing failed on /wf_a/image_raw: RuntimeError: planted"
        pub.publish(image_message(synthetic_frame(64, 48, 1), "rgb8", stamp=Time(sec=2)))
        out.wait_for(1)
        node._decode = real_decode
    assert [m.header.stamp.sec for m in out.messages] == [2] and calls == [1, 2]


@pytest.mark.parametrize("stage", ["_infer", "_publish_batch"])
def test_an_overlapped_stage_that_fails_mid_batch_reports_it_and_goes_on(tiny_model, stage) -> None:  # type: ignore[no-untyped-def]
    """overlap always: an exception no step of the infer or the publish stage catches is a counted error on the
    camera, the stage thread goes on (the next frame comes out) and the node still deactivates."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/sf/image_raw"], overlap="always")
        pub = graph.publisher(Image, "/sf/image_raw")
        out = graph.collect(Image, "/sf/segmentation/labels")
        wait_matched(pub, [out])
        real, calls = getattr(node, stage), []

        def failing_once(work):  # type: ignore[no-untyped-def]
            calls.append(work.items[0][1].header.stamp.sec)
            if len(calls) == 1:
                raise RuntimeError("planted")
            return real(work)

        setattr(node, stage, failing_once)
        cam = node._cameras[0]
        pub.publish(image_message(synthetic_frame(64, 48, 0), "rgb8", stamp=Time(sec=1)))
        wait_until(lambda: cam.stats.errors == 1 and not cam.in_progress, what="the failure counted, the frame ended")
        assert cam.stats.last_error == "processing failed on /sf/image_raw: RuntimeError: planted"
        assert cam.stats.failed == 1
        pub.publish(image_message(synthetic_frame(64, 48, 1), "rgb8", stamp=Time(sec=2)))
        out.wait_for(1)
        results: list[TransitionCallbackReturn] = []
        stopper = threading.Thread(target=lambda: results.append(node.trigger_deactivate()), daemon=True)
        stopper.start()
        stopper.join(TIMEOUT_S)
        assert not stopper.is_alive(), "deactivate hung on a dead stage"
        assert results == [TransitionCallbackReturn.SUCCESS]
    assert [m.header.stamp.sec for m in out.messages] == [2] and calls == [1, 2]


class HeldCamera:
    """One camera of a node with workers 2 whose inference of a chosen frame is held until the test releases it
    (and then fails, if asked). Each frame is one flat value, 10 x its stamp, so the hold can tell them apart."""

    def __init__(self, graph: RosGraph, model: str, name: str) -> None:
        topic = f"/{name}/image_raw"
        self.node = graph.segmentation_node(model_path=model, image_topics=[topic], workers=2)
        self.pub = graph.publisher(Image, topic)
        self.out = graph.collect(Image, f"/{name}/segmentation/labels")
        wait_matched(self.pub, [self.out])
        self.backend, self.cam = self.node._segmenter.backend, self.node._cameras[0]
        self.real_infer = self.backend._infer
        self.held, self.release = threading.Event(), threading.Event()
        self.inferred: list[int] = []
        self.hold_value, self.fail = 10, False
        self.backend._infer = self._holding

    def _holding(self, batch: np.ndarray):  # type: ignore[no-untyped-def]
        value = int(batch[0, 0, 0, 0])
        if value == self.hold_value:
            self.held.set()
            self.release.wait(4 * TIMEOUT_S)  # longer than the waits of the tests: only the test lets it go
            if self.fail:
                raise RuntimeError("planted")
        result = self.real_infer(batch)
        self.inferred.append(value)
        return result

    def send(self, sec: int) -> None:
        self.pub.publish(image_message(np.full((48, 64, 3), 10 * sec, np.uint8), "rgb8", stamp=Time(sec=sec)))

    def stamps(self) -> list[int]:
        return [m.header.stamp.sec for m in self.out.messages]


def test_more_workers_than_cameras_overlap_a_cameras_frames_and_publish_them_in_order(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """workers 2, one camera: while frame 1 is held in inference the other worker infers frame 2, which waits and
    comes out after frame 1; a held frame that then fails is counted, and the frame behind it still comes out."""
    with RosGraph() as graph:
        h = HeldCamera(graph, str(tiny_model), "wo")
        assert len(h.node._workers) == 2
        cam = h.cam
        try:
            h.send(1)
            assert h.held.wait(TIMEOUT_S), "frame 1 never reached inference"
            h.send(2)
            wait_until(lambda: h.inferred == [20], what="frame 2 inferred by the other worker while frame 1 is held")
            time.sleep(0.3)  # frame 2 is ready to publish; it must wait for frame 1
            assert len(h.out) == 0, "frame 2 was published before frame 1"
            h.release.set()
            h.out.wait_for(2)
            h.held.clear()
            h.release.clear()
            h.hold_value, h.fail = 30, True
            h.send(3)
            assert h.held.wait(TIMEOUT_S), "frame 3 never reached inference"
            h.send(4)
            wait_until(lambda: h.inferred[-1:] == [40], what="frame 4 inferred while frame 3 is held")
            h.release.set()
            wait_until(lambda: len(h.out) == 3 and cam.stats.errors == 1, what="frame 4 out after frame 3 failed")
        finally:
            h.release.set()
            h.backend._infer = h.real_infer
    assert h.stamps() == [1, 2, 4], stats([cam])
    assert cam.stats.last_error == "inference failed on /wo/image_raw: RuntimeError: planted"
    assert (len(cam.in_progress), cam.taken, cam.finished, cam.done_early) == (0, 4, 4, set())


def test_deactivate_with_a_cameras_frames_in_flight_finishes_them_in_order(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """workers 2, one camera: deactivate while frame 1 is held in inference and frame 2 waits for its turn to
    publish: deactivate waits for both, they come out in order, and the node activates again and serves."""
    with RosGraph() as graph:
        h = HeldCamera(graph, str(tiny_model), "wd")
        results: list[TransitionCallbackReturn] = []
        stopper = threading.Thread(target=lambda: results.append(h.node.trigger_deactivate()))
        try:
            h.send(1)
            assert h.held.wait(TIMEOUT_S), "frame 1 never reached inference"
            h.send(2)
            wait_until(lambda: h.inferred == [20], what="frame 2 inferred while frame 1 is held")
            stopper.start()
            time.sleep(0.3)
            assert stopper.is_alive(), "deactivate returned with frames of the camera still in flight"
        finally:
            h.release.set()
        stopper.join(TIMEOUT_S)
        assert not stopper.is_alive(), "deactivate hung with a frame waiting for its turn"
        assert results == [TransitionCallbackReturn.SUCCESS]
        assert (h.cam.stats.frames_out, h.cam.stats.errors) == (2, 0)  # both published before deactivate returned
        wait_until(lambda: len(h.out) == 2, what="frames 1 and 2")  # delivered a moment later
        assert h.stamps() == [1, 2]
        assert h.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        wait_matched(h.pub, [h.out])
        h.send(3)
        wait_until(lambda: h.stamps() == [1, 2, 3], what="frame 3 after re-activation")
        h.backend._infer = h.real_infer
