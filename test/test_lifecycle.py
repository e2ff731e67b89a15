"""The managed node through the standard lifecycle services (what nav2_lifecycle_manager and `ros2 lifecycle` call)."""

from __future__ import annotations

from typing import Any

from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from sensor_msgs.msg import Image

from ros_graph import (TIMEOUT_S, RosGraph, output_on_failure, publish_until, start_node_process, stop_process,
                       wait_matched, wait_until)
from unet_perception.tools.camera_sim import image_message, synthetic_frame

NODE = "/segmentation_node"


TARGET = {Transition.TRANSITION_CONFIGURE: "inactive", Transition.TRANSITION_ACTIVATE: "active"}
ANSWER_S = 3.0


class Lifecycle:
    """Clients of one node's change_state and get_state services, called from the test graph.

    Between processes the first answer of a service can be lost: the server may not have matched the
    client's reply reader yet when it answers. get_state is asked again; for a change_state without an
    answer the state tells whether it happened (what a lifecycle manager would have to do as well).
    """

    def __init__(self, graph: RosGraph, node: str = NODE) -> None:
        self.change_client = graph.node.create_client(ChangeState, f"{node}/change_state")
        self.state_client = graph.node.create_client(GetState, f"{node}/get_state")
        for client in (self.change_client, self.state_client):
            assert client.wait_for_service(TIMEOUT_S), f"{client.srv_name} never appeared"

    @staticmethod
    def _call(client: Any, request: Any, timeout: float) -> Any:
        future = client.call_async(request)
        try:
            wait_until(future.done, timeout, what=f"an answer from {client.srv_name}")
        except AssertionError:
            client.remove_pending_request(future)
            return None
        return future.result()

    def change(self, transition: int, label: str = "") -> bool:
        request = ChangeState.Request(transition=Transition(id=transition, label=label))
        answer = self._call(self.change_client, request, ANSWER_S)
        if answer is None and transition in TARGET and not label:
            return self.state() == TARGET[transition]
        assert answer is not None, f"no answer to transition {transition}"
        return bool(answer.success)

    def state(self) -> str:
        for _ in range(int(TIMEOUT_S / ANSWER_S)):
            answer = self._call(self.state_client, GetState.Request(), ANSWER_S)
            if answer is not None:
                return str(answer.current_state.label)
        raise AssertionError(f"no answer from {self.state_client.srv_name}")


def labels_flow(graph: RosGraph, topic: str, i: int) -> None:
    """A frame on ``topic`` gives a labels image (fresh publisher and collector: the node re-created its own)."""
    pub = graph.publisher(Image, f"{topic}/image_raw")
    labels = graph.collect(Image, f"{topic}/segmentation/labels")
    wait_matched(pub, [labels])
    pub.publish(image_message(synthetic_frame(64, 48, i)))
    labels.wait_for(1)


def io_count(graph: RosGraph, topic: str) -> int:
    return graph.node.count_subscribers(f"{topic}/image_raw") + graph.node.count_publishers(
        f"{topic}/segmentation/labels")


def test_configure_activate_deactivate_cleanup_shutdown(tiny_model) -> None:  # type: ignore[no-untyped-def]
    topic = "/lc"
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=[f"{topic}/image_raw"],
                                       autostart=False)
        lc = Lifecycle(graph)
        assert lc.state() == "unconfigured" and node._segmenter is None and io_count(graph, topic) == 0

        assert lc.change(Transition.TRANSITION_CONFIGURE)  # model and backend loaded, no I/O yet
        backend = node._segmenter.backend
        assert lc.state() == "inactive" and backend.active and io_count(graph, topic) == 0

        assert lc.change(Transition.TRANSITION_ACTIVATE)
        assert lc.state() == "active"
        labels_flow(graph, topic, 0)

        assert lc.change(Transition.TRANSITION_DEACTIVATE)  # I/O gone, engine kept
        assert lc.state() == "inactive"
        wait_until(lambda: io_count(graph, topic) == 0, what="subscription and publishers to go")
        assert node._segmenter.backend is backend and backend.active

        assert lc.change(Transition.TRANSITION_ACTIVATE)  # and back, with the same backend
        labels_flow(graph, topic, 1)
        assert node._segmenter.backend is backend

        assert lc.change(Transition.TRANSITION_DEACTIVATE)
        assert lc.change(Transition.TRANSITION_CLEANUP)  # memory freed
        assert lc.state() == "unconfigured" and not backend.active and node._segmenter is None

        assert lc.change(Transition.TRANSITION_CONFIGURE)  # a cleaned-up node configures again
        assert lc.change(Transition.TRANSITION_INACTIVE_SHUTDOWN)
        assert lc.state() == "finalized" and node._segmenter is None


def test_active_shutdown_stops_io_and_frees_the_backend(tiny_model) -> None:  # type: ignore[no-untyped-def]
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/sd/image_raw"])  # autostart
        lc = Lifecycle(graph)
        assert lc.state() == "active"
        backend = node._segmenter.backend
        assert lc.change(Transition.TRANSITION_ACTIVE_SHUTDOWN)
        assert lc.state() == "finalized" and not backend.active
        wait_until(lambda: io_count(graph, "/sd") == 0, what="subscription and publishers to go")


def test_a_failed_configure_under_a_manager_stays_unconfigured(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tmp_path / "missing.onnx"), autostart=False)
        lc = Lifecycle(graph)
        assert not lc.change(Transition.TRANSITION_CONFIGURE)
        assert lc.state() == "unconfigured"


def test_cli_with_autostart_false_waits_for_a_manager(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`segmentation_node --ros-args -p autostart:=false`, then configure + activate as a lifecycle manager does."""
    proc = start_node_process({"model_path": str(tiny_model), "image_topics": ["/cli_lc/image_raw"],
                               "autostart": False})
    try:
        with output_on_failure(proc), RosGraph() as graph:
            lc = Lifecycle(graph)
            assert lc.state() == "unconfigured" and io_count(graph, "/cli_lc") == 0
            assert lc.change(Transition.TRANSITION_CONFIGURE) and lc.change(Transition.TRANSITION_ACTIVATE)
            pub = graph.publisher(Image, "/cli_lc/image_raw")
            labels = graph.collect(Image, "/cli_lc/segmentation/labels")
            wait_matched(pub, [labels])
            publish_until(pub, image_message(synthetic_frame(64, 48)), labels)
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0, out
    assert "segmenting /cli_lc/image_raw" in out


def test_a_failed_warm_up_frees_the_backend(tiny_model: Any, monkeypatch: Any) -> None:
    """A backend that activates and then fails its warm-up is closed by the failed configure, not leaked
    until garbage collection (a lifecycle manager retrying configure would pile up GPU memory)."""
    import pytest

    from unet_perception import node as node_module
    from unet_perception.node_params import StartupError

    created: list[Any] = []
    real_create = node_module.create_backend

    def failing_create(*args: Any, **kwargs: Any) -> Any:
        backend = real_create(*args, **kwargs)

        def fail(batch: Any) -> Any:
            raise RuntimeError("simulated warm-up failure")

        backend._infer = fail
        created.append(backend)
        return backend

    monkeypatch.setattr(node_module, "create_backend", failing_create)
    with RosGraph() as graph, pytest.raises(StartupError, match="simulated warm-up failure"):
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/warm/image_raw"])
    assert len(created) == 1 and not created[0].active


def test_a_camera_failing_in_activate_leaves_no_io_behind(tiny_model: Any, monkeypatch: Any) -> None:
    """The second camera's subscription fails (as rmw may): activate fails, and the first camera's publishers and
    subscription are gone with it (they were created before the failure); a second activate then works."""
    from rclpy.lifecycle import TransitionCallbackReturn

    from unet_perception.node import SegmentationNode

    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/la/image_raw", "/lb/image_raw"],
                                       autostart=False)
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        before_pubs, before_subs = {p.topic_name for p in node.publishers}, {s.topic_name for s in node.subscriptions}
        calls = []
        real = SegmentationNode.create_subscription

        def second_fails(self: Any, msg_type: Any, topic: str, *args: Any, **kwargs: Any) -> Any:
            calls.append(topic)
            if len(calls) == 2:
                raise RuntimeError("rmw: could not create the subscription")
            return real(self, msg_type, topic, *args, **kwargs)

        monkeypatch.setattr(SegmentationNode, "create_subscription", second_fails)
        assert node.trigger_activate() == TransitionCallbackReturn.FAILURE
        assert calls == ["/la/image_raw", "/lb/image_raw"]
        assert {p.topic_name for p in node.publishers} == before_pubs
        assert {s.topic_name for s in node.subscriptions} == before_subs
        assert node._cameras == [] and node._receiver is None
        monkeypatch.undo()
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert {"/la/segmentation/labels", "/lb/segmentation/labels"} <= {p.topic_name for p in node.publishers}
