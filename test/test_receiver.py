"""FrameReceiver on a real rclpy graph: the executor never takes the subscriptions it owns, it takes every message in
order, stops promptly, and tells why when a subscription dies under it. The node's own paths (input_thread true,
the default, and false) are exercised by every node test; here one node with input_thread false answers too."""

from __future__ import annotations

import threading
import time

import pytest
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import Image

from ros_graph import RosGraph, publish_until, wait_matched, wait_until
from unet_perception.receiver import FrameReceiver, TakenByReceiver
from unet_perception.tools.camera_sim import image_message, synthetic_frame

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def stamped(sec: int) -> Image:
    msg = image_message(synthetic_frame(8, 6, sec))
    msg.header.stamp.sec = sec
    return msg


class Inbox:
    """The stamps (seconds) of the messages a handler got, per topic."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: dict[str, list[int]] = {}

    def handler(self, topic: str):  # type: ignore[no-untyped-def]
        def on_bytes(data: bytes) -> None:
            with self.lock:
                self.got.setdefault(topic, []).append(deserialize_message(data, Image).header.stamp.sec)
        return on_bytes

    def __getitem__(self, topic: str) -> list[int]:
        with self.lock:
            return list(self.got.get(topic, []))


def test_executor_leaves_them_alone_and_the_receiver_takes_every_message_in_order() -> None:
    with RosGraph() as graph:
        executor_calls: list[object] = []
        group = TakenByReceiver()
        subs = [graph.node.create_subscription(Image, topic, executor_calls.append, RELIABLE, raw=True,
                                               callback_group=group) for topic in ("/rx/a", "/rx/b")]
        pubs = [graph.publisher(Image, topic, RELIABLE) for topic in ("/rx/a", "/rx/b")]
        for pub in pubs:
            wait_until(lambda pub=pub: pub.get_subscription_count() == 1, what="subscription matched")
        for sec in range(3):
            pubs[0].publish(stamped(sec))
        cpu = time.process_time()
        time.sleep(1.0)  # the graph's executor spins all along: it must not take them, nor wake for them
        assert executor_calls == []
        assert time.process_time() - cpu < 0.25  # an executor that waits on them but may not run them spins a core

        inbox, errors = Inbox(), []
        receiver = FrameReceiver(graph.context, subs, [inbox.handler("a"), inbox.handler("b")],
                                 lambda i, reason: errors.append((i, reason)))
        receiver.start()
        wait_until(lambda: len(inbox["a"]) == 3, what="the three queued messages")  # reliable, depth 10: kept
        for sec in range(3, 8):
            pubs[0].publish(stamped(sec))
            pubs[1].publish(stamped(100 + sec))
        wait_until(lambda: len(inbox["a"]) == 8 and len(inbox["b"]) == 5, what="every message")
        assert inbox["a"] == list(range(8)) and inbox["b"] == [103, 104, 105, 106, 107]

        receiver.stop()
        pubs[0].publish(stamped(99))
        time.sleep(0.5)
        assert inbox["a"] == list(range(8)) and executor_calls == [] and errors == []


@pytest.mark.parametrize("round_", range(6))
def test_a_subscription_destroyed_under_it_is_reported_for_every_camera(round_: int) -> None:
    """Destroyed while the thread starts waiting on it: reported, never a crash. Before the receiver held its
    handles for the wait, rcl_wait read a freed subscription (a segfault in about one run in seven)."""
    with RosGraph() as graph:
        group = TakenByReceiver()
        subs = [graph.node.create_subscription(Image, topic, lambda _: None, RELIABLE, raw=True,
                                               callback_group=group) for topic in ("/rx/c", "/rx/d")]
        errors: list[tuple[int, str]] = []
        receiver = FrameReceiver(graph.context, subs, [lambda _: None, lambda _: None],
                                 lambda i, reason: errors.append((i, reason)))
        receiver.start()
        graph.node.destroy_subscription(subs[1])
        wait_until(lambda: len(errors) == 2, what="an error for each subscription")
        assert [i for i, _ in errors] == [0, 1] and all("frame receiver stopped" in r for _, r in errors)
        receiver.stop()


def test_a_handler_that_raises_is_reported_and_the_frames_go_on() -> None:
    """A bug in one camera's handler is heard through on_error; that camera's next frames and the other camera's
    still arrive (before, the exception ended the thread: every camera silent, nothing counted or logged)."""
    with RosGraph() as graph:
        group = TakenByReceiver()
        topics = ("/rx/h1", "/rx/h2")
        subs = [graph.node.create_subscription(Image, t, lambda _: None, RELIABLE, raw=True, callback_group=group)
                for t in topics]
        pubs = [graph.publisher(Image, t, RELIABLE) for t in topics]
        for pub in pubs:
            wait_until(lambda pub=pub: pub.get_subscription_count() == 1, what="subscription matched")
        inbox, errors = Inbox(), []
        good = inbox.handler("h1")

        def flaky(data: bytes) -> None:
            if deserialize_message(data, Image).header.stamp.sec == 0:
                raise ValueError("handler bug")
            good(data)

        receiver = FrameReceiver(graph.context, subs, [flaky, inbox.handler("h2")],
                                 lambda i, reason: errors.append((i, reason)))
        receiver.start()
        for sec in range(3):
            pubs[0].publish(stamped(sec))
            pubs[1].publish(stamped(10 + sec))
        wait_until(lambda: len(inbox["h1"]) == 2 and len(inbox["h2"]) == 3, what="the frames after the failure")
        assert inbox["h1"] == [1, 2] and inbox["h2"] == [10, 11, 12]
        assert len(errors) == 1 and errors[0][0] == 0 and "handler bug" in errors[0][1]
        receiver.stop()


def test_a_receiver_started_on_a_shut_down_context_ends_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    crashes: list[object] = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    graph = RosGraph()
    sub = graph.node.create_subscription(Image, "/rx/late", lambda _: None, RELIABLE, raw=True,
                                         callback_group=TakenByReceiver())
    errors: list[tuple[int, str]] = []
    receiver = FrameReceiver(graph.context, [sub], [lambda _: None], lambda i, r: errors.append((i, r)))
    graph.close()  # the context is shut down
    receiver.start()
    receiver._thread.join(5.0)
    assert not receiver._thread.is_alive() and crashes == [] and errors == []
    receiver.stop()  # and stopping it afterwards is harmless


def test_qos_events_of_its_subscriptions_reach_their_callbacks() -> None:
    """A best-effort publisher on a reliable subscription: the incompatible-QoS event (rclpy's default callback
    logs the warning users rely on) runs in the receiver, since the executor may not wait on it."""
    with RosGraph() as graph:
        events: list[object] = []
        sub = graph.node.create_subscription(
            Image, "/rx/qos", lambda _: None, RELIABLE, raw=True, callback_group=TakenByReceiver(),
            event_callbacks=SubscriptionEventCallbacks(incompatible_qos=events.append))
        receiver = FrameReceiver(graph.context, [sub], [lambda _: None], lambda i, r: None)
        receiver.start()
        cpu = time.process_time()
        graph.publisher(Image, "/rx/qos", QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        wait_until(lambda: len(events) >= 1, what="the incompatible QoS event")
        time.sleep(0.5)
        assert time.process_time() - cpu < 0.5  # handled once, not woken again and again
        receiver.stop()


def test_only_raw_subscriptions_of_its_group() -> None:
    with RosGraph() as graph:
        plain = graph.node.create_subscription(Image, "/rx/e", lambda _: None, RELIABLE, raw=True)
        typed = graph.node.create_subscription(Image, "/rx/f", lambda _: None, RELIABLE,
                                               callback_group=TakenByReceiver())
        for sub in (plain, typed):
            with pytest.raises(ValueError, match="TakenByReceiver"):
                FrameReceiver(graph.context, [sub], [lambda _: None], lambda i, r: None)


def test_node_with_input_thread_off_still_answers(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """input_thread false: the executor takes the frames, as before the receiver."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/exec/image_raw"],
                                       input_thread=False)
        assert node._receiver is None and node._cameras[0].subscription.callback_group is node.default_callback_group
        pub = graph.publisher(Image, "/exec/image_raw")
        labels = graph.collect(Image, "/exec/segmentation/labels")
        wait_matched(pub, [labels])
        publish_until(pub, image_message(synthetic_frame(64, 48)), labels)
        assert labels.messages[0].width == 64
