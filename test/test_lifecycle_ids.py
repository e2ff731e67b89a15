"""Every transition id and label through the real change_state service, in every state, while frames stream.

A lifecycle manager sends ids. Jazzy's rclpy let an id the current state does not have (configure or activate
to an active node) raise out of the service callback and end the node (ros2/rclpy#1209); lifecycle_guard
answers success=False instead. Each request here either performs its transition or is refused, and the node
keeps answering and, where it is active, labelling.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lifecycle_msgs.msg import Transition
from sensor_msgs.msg import Image

from ros_graph import RosGraph, output_on_failure, start_node_process, stop_process, wait_matched
from test_lifecycle import Lifecycle
from unet_perception.tools.camera_sim import image_message, synthetic_frame

# The transitions each primary state has (the design article's state machine), by id and label.
LEGAL = {
    "unconfigured": {Transition.TRANSITION_CONFIGURE: "configure",
                     Transition.TRANSITION_UNCONFIGURED_SHUTDOWN: "shutdown"},
    "inactive": {Transition.TRANSITION_CLEANUP: "cleanup", Transition.TRANSITION_ACTIVATE: "activate",
                 Transition.TRANSITION_INACTIVE_SHUTDOWN: "shutdown"},
    "active": {Transition.TRANSITION_DEACTIVATE: "deactivate", Transition.TRANSITION_ACTIVE_SHUTDOWN: "shutdown"},
    "finalized": {},
}
LABELS = ["configure", "cleanup", "activate", "deactivate", "shutdown", "create", "destroy", "transition_success",
          "transition_failure", "transition_error", "unconfigured_shutdown", "no such transition"]


@contextmanager
def streaming(graph: RosGraph, topic: str, hz: float = 20.0) -> Iterator[None]:
    """Publish frames on ``topic`` from a thread the whole time (what a camera does while a manager talks)."""
    pub = graph.publisher(Image, topic)
    stop = threading.Event()

    def run() -> None:
        i = 0
        while not stop.wait(1.0 / hz):
            pub.publish(image_message(synthetic_frame(64, 48, i)))
            i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def refuse_all_but_legal(lc: Lifecycle, state: str) -> None:
    """Every id 0..255 and every label the state lacks is answered success=False and changes nothing."""
    for tid in range(256):
        if tid not in LEGAL[state]:
            assert not lc.change(tid), f"transition id {tid} succeeded from {state}"
    for label in LABELS:
        if label not in LEGAL[state].values():
            assert not lc.change(0, label), f"transition '{label}' succeeded from {state}"
    assert lc.state() == state


def labels_keep_coming(labels: Any, more: int = 3) -> None:
    labels.wait_for(len(labels) + more)


def test_every_id_and_label_in_every_state(tiny_model: Any) -> None:
    topic = "/lcid"
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=[f"{topic}/image_raw"],
                                       autostart=False)
        lc = Lifecycle(graph)
        labels = graph.collect(Image, f"{topic}/segmentation/labels")
        with streaming(graph, f"{topic}/image_raw"):
            refuse_all_but_legal(lc, "unconfigured")
            assert lc.change(Transition.TRANSITION_CONFIGURE)
            refuse_all_but_legal(lc, "inactive")
            assert lc.change(Transition.TRANSITION_ACTIVATE)
            labels_keep_coming(labels)
            refuse_all_but_legal(lc, "active")
            labels_keep_coming(labels)  # the refused requests left the cameras running
            assert lc.change(0, "deactivate") and lc.state() == "inactive"
            assert lc.change(0, "cleanup") and lc.state() == "unconfigured" and node._segmenter is None
            assert lc.change(0, "configure") and lc.change(0, "activate")
            labels_keep_coming(labels)
            assert lc.change(0, "shutdown") and lc.state() == "finalized"
            refuse_all_but_legal(lc, "finalized")


def test_shutdown_by_id_from_unconfigured_and_inactive(tiny_model: Any) -> None:
    for setup, shutdown in (([], Transition.TRANSITION_UNCONFIGURED_SHUTDOWN),
                            ([Transition.TRANSITION_CONFIGURE], Transition.TRANSITION_INACTIVE_SHUTDOWN)):
        with RosGraph() as graph:
            graph.segmentation_node(model_path=str(tiny_model), image_topics=["/lcsd/image_raw"], autostart=False)
            lc = Lifecycle(graph)
            assert all(lc.change(t) for t in setup)
            assert lc.change(shutdown) and lc.state() == "finalized"
            refuse_all_but_legal(lc, "finalized")


def test_a_manager_configuring_an_autostarted_node_does_not_end_it(tiny_model: Any) -> None:
    """The report: a manager pointed at a node left on autostart sends configure (1) and activate (3) to the
    running process. Before, `RCLError: Transition is not registered` ended it with exit 1."""
    topic = "/lcproc"
    proc = start_node_process({"model_path": str(tiny_model), "image_topics": [f"{topic}/image_raw"]})
    try:
        with output_on_failure(proc), RosGraph() as graph:
            lc = Lifecycle(graph)
            labels = graph.collect(Image, f"{topic}/segmentation/labels")
            with streaming(graph, f"{topic}/image_raw"):
                wait_matched(graph.publisher(Image, f"{topic}/image_raw"), [labels])
                labels_keep_coming(labels, 1)
                assert lc.state() == "active"
                assert not lc.change(Transition.TRANSITION_CONFIGURE)
                assert not lc.change(Transition.TRANSITION_ACTIVATE)
                for _ in range(30):  # a client that insists: every request answered, the log throttled
                    assert not lc.change(Transition.TRANSITION_CONFIGURE)
                assert proc.poll() is None and lc.state() == "active"
                labels_keep_coming(labels)
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0, out
    assert "transition 1 is not available from state 'active'" in out, out
    assert out.count("is not available") <= 2, out  # 32 refusals within a few seconds: one line per 5 s
    assert "Traceback" not in out and "RCLError" not in out, out


def test_the_read_only_lifecycle_services_answer_from_the_state_machine(tiny_model: Any) -> None:
    """get_available_transitions / get_available_states / get_transition_graph through real clients, from an
    active node: what the design article's state machine has (they are answered by the guarded handlers)."""
    from lifecycle_msgs.srv import GetAvailableStates, GetAvailableTransitions

    from ros_graph import TIMEOUT_S, wait_until
    from test_lifecycle import NODE

    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/lcro/image_raw"])
        answers = {}
        for service, srv in (("get_available_transitions", GetAvailableTransitions),
                             ("get_available_states", GetAvailableStates),
                             ("get_transition_graph", GetAvailableTransitions)):
            client = graph.node.create_client(srv, f"{NODE}/{service}")
            assert client.wait_for_service(TIMEOUT_S)
            future = client.call_async(srv.Request())
            wait_until(future.done, TIMEOUT_S, what=f"an answer from {service}")
            answers[service] = future.result()
    available = {(t.transition.id, t.transition.label) for t in answers["get_available_transitions"]
                 .available_transitions}
    assert available == set(LEGAL["active"].items())
    assert set(LEGAL) <= {s.label for s in answers["get_available_states"].available_states}
    graph_edges = {(t.start_state.label, t.transition.label) for t in answers["get_transition_graph"]
                   .available_transitions}
    assert {(state, label) for state, moves in LEGAL.items() for label in moves.values()} <= graph_edges


DESTROYED = """
import rclpy
from lifecycle_msgs.srv import GetAvailableStates, GetAvailableTransitions, GetState
from unet_perception.node import SegmentationNode
from rclpy.parameter import Parameter
context = rclpy.Context()
rclpy.init(context=context)
node = SegmentationNode(context=context, parameter_overrides=[Parameter("model_path", value=MODEL),
                                                              Parameter("autostart", value=False)])
node.destroy_node()
for service, srv in (("get_state", GetState), ("get_available_states", GetAvailableStates),
                     ("get_available_transitions", GetAvailableTransitions),
                     ("get_transition_graph", GetAvailableTransitions)):
    print(service, getattr(node, "_LifecycleNodeMixin__on_" + service)(srv.Request(), srv.Response()), flush=True)
rclpy.shutdown(context=context)
"""


def test_a_request_served_after_the_node_is_destroyed_gets_an_empty_answer(tiny_model: Any) -> None:
    """A request an executor thread took just before another thread destroyed the node is served after it: with
    rclpy's own handlers that read the freed state machine and the process died (SIGSEGV, -11). In a child
    process, so that such a crash fails this test rather than ending the run."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", f"MODEL = {str(tiny_model)!r}\n" + DESTROYED],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["get_state", "get_available_states", "get_available_transitions",
                                                   "get_transition_graph"], done.stdout
    assert "label=''" in lines[0] and "available_states=[]" in lines[1] and "available_transitions=[]" in lines[2]
