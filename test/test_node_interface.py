"""What other ROS nodes see: output names under remapping and namespaces, QoS matching, confidence, LabelInfo."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from ros_graph import RosGraph, publish_until, stop_process, wait_matched, wait_until
from test_node import as_array, reference_segmenter
from unet_perception import node as node_module
from unet_perception.launch_support import node_command, node_env
from unet_perception.model_contract import UNKNOWN_LABEL, read_model_info
from unet_perception.node_params import StartupError
from unet_perception.tools.camera_sim import image_message, synthetic_frame

vision_msgs = pytest.importorskip("vision_msgs.msg", reason="vision_msgs is not installed (make venv builds it)")

RELIABLE = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)  # rviz2's default for image displays
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


def frame(i: int = 0, frame_id: str = "cam") -> Image:
    return image_message(synthetic_frame(64, 48, i), "rgb8", frame_id=frame_id, stamp=Time(sec=50 + i))


def flows(graph: RosGraph, camera: str, labels_topic: str, i: int = 0) -> Image:
    """Publish frame ``i`` on ``camera``; returns the labels image that arrives on ``labels_topic``."""
    pub = graph.publisher(Image, camera)
    labels = graph.collect(Image, labels_topic)
    wait_matched(pub, [labels])
    pub.publish(frame(i))
    return labels.wait_for(1)[0]


def test_outputs_follow_remapping(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The README's `-r image_raw:=/camera/image_raw` gives /camera/segmentation/*, not /segmentation/*."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), ros_args=["-r", "image_raw:=/camera/image_raw"])
        assert [c.topic for c in node._cameras] == ["/camera/image_raw"]
        assert flows(graph, "/camera/image_raw", "/camera/segmentation/labels").header.frame_id == "cam"
        assert graph.node.count_publishers("/segmentation/labels") == 0


def test_outputs_follow_the_node_namespace(tiny_model) -> None:  # type: ignore[no-untyped-def]
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), namespace="/car", image_topics=["front/image_raw"])
        flows(graph, "/car/front/image_raw", "/car/front/segmentation/labels")
        for kind in ("color", "overlay", "confidence", "label_info"):
            assert graph.node.count_publishers(f"/car/front/segmentation/{kind}") == 1, kind


def test_one_topic_named_twice_is_subscribed_once(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """['image_raw', '/image_raw'] in the root namespace is one camera: every output once, not twice."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["image_raw", "/image_raw"])
        assert [c.topic for c in node._cameras] == ["/image_raw"]
        assert graph.node.count_subscribers("/image_raw") == 1
        assert graph.node.count_publishers("/segmentation/labels") == 1


@pytest.mark.parametrize("topics, needle", [
    (["/cam/left", "/cam/right"], "'/cam/left' and '/cam/right' would both publish on /cam/segmentation/*"),
    (["/cam/image_raw", "/cam/image_raw/compressed"], "raw and compressed topics of one camera"),
    (["left", "/right"], "'/left' and '/right' would both publish on /segmentation/*"),  # resolved first
])
def test_two_cameras_never_share_an_output_topic(tiny_model, topics: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    with RosGraph() as graph, pytest.raises(StartupError, match="parameter 'image_topics'") as err:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=topics)
    assert needle in str(err.value)


def test_reliable_subscriber_gets_outputs_by_default(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """rviz2 subscribes reliable; best-effort outputs would match nothing (silently)."""
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/q/image_raw"])
        pub = graph.publisher(Image, "/q/image_raw")  # the camera: best effort (sensor data)
        reliable = {k: graph.collect(Image, f"/q/segmentation/{k}", RELIABLE) for k in ("labels", "overlay")}
        best_effort = graph.collect(Image, "/q/segmentation/color")
        wait_matched(pub, [*reliable.values(), best_effort])
        pub.publish(frame())
        for collector in (*reliable.values(), best_effort):
            collector.wait_for(1)
        (info,) = graph.node.get_publishers_info_by_topic("/q/segmentation/labels")
        assert info.qos_profile.reliability == ReliabilityPolicy.RELIABLE


def test_best_effort_outputs_do_not_match_a_reliable_subscriber(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The defect output_qos fixes, kept as a check that the QoS parameter really reaches the publishers."""
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/qb/image_raw"], output_qos="best_effort",
                                input_qos="reliable")
        reliable = graph.collect(Image, "/qb/segmentation/labels", RELIABLE)
        best_effort = graph.collect(Image, "/qb/segmentation/labels")
        wait_until(lambda: best_effort.subscription.get_publisher_count() == 1, what="the best-effort match")
        assert reliable.subscription.get_publisher_count() == 0  # incompatible QoS: never matched
        (info,) = graph.node.get_subscriptions_info_by_topic("/qb/image_raw")
        assert info.qos_profile.reliability == ReliabilityPolicy.RELIABLE


def test_confidence_and_label_info(tiny_model) -> None:  # type: ignore[no-untyped-def]
    info = read_model_info(tiny_model)
    assert info.has_confidence
    ref = reference_segmenter(tiny_model)
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/ci/image_raw"])
        pub = graph.publisher(Image, "/ci/image_raw")
        labels = graph.collect(Image, "/ci/segmentation/labels")
        confidence = graph.collect(Image, "/ci/segmentation/confidence")
        wait_matched(pub, [labels, confidence])
        msg = frame(3, "ci_optical")
        pub.publish(msg)
        got = confidence.wait_for(1)[0]
        label_msg = labels.wait_for(1)[0]
        # a late subscriber (transient local) still gets the class map, published once at activation
        label_info = graph.collect(vision_msgs.LabelInfo, "/ci/segmentation/label_info", LATCHED).wait_for(1)[0]
    expected = ref.run([synthetic_frame(64, 48, 3)])[0]
    assert (got.encoding, got.width, got.height) == ("mono8", 64, 48)
    assert got.header == label_msg.header == msg.header  # aligned: same stamp and frame_id
    assert expected.confidence is not None
    np.testing.assert_array_equal(as_array(got), expected.confidence)
    assert as_array(got).min() > 0  # the winning class of 12 has probability > 1/12
    assert [(c.class_id, c.class_name) for c in label_info.class_map] == list(enumerate(info.classes.names))
    assert label_info.threshold == 0.0


def test_unknown_threshold_marks_labels_and_the_class_map(tiny_model) -> None:  # type: ignore[no-untyped-def]
    ref = reference_segmenter(tiny_model)
    conf = ref.run([synthetic_frame(64, 48, 3)])[0].confidence
    assert conf is not None
    threshold = int(np.median(conf)) + 1  # about half the pixels fall under it
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/u/image_raw"],
                                unknown_threshold=threshold)
        label_info = graph.collect(vision_msgs.LabelInfo, "/u/segmentation/label_info", LATCHED)
        got = as_array(flows(graph, "/u/image_raw", "/u/segmentation/labels", 3))
        class_map = label_info.wait_for(1)[0]
    unknown = conf < threshold
    assert 0 < unknown.mean() < 1
    np.testing.assert_array_equal(got == UNKNOWN_LABEL, unknown)
    assert class_map.class_map[-1].class_id == UNKNOWN_LABEL and class_map.class_map[-1].class_name == "unknown"
    assert class_map.threshold == pytest.approx(threshold / 255.0)


def test_without_vision_msgs_the_node_runs_without_label_info(tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(node_module, "LabelInfo", None)
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/nv/image_raw"])
        flows(graph, "/nv/image_raw", "/nv/segmentation/labels")
        assert graph.node.count_publishers("/nv/segmentation/label_info") == 0


def test_readme_remap_example_across_processes(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`segmentation_node --ros-args -r image_raw:=/camera/image_raw` as its own process: /camera/segmentation/*."""
    cmd = node_command(None, {"model_path": str(tiny_model)}) + ["-r", "image_raw:=/camera/image_raw"]
    proc = subprocess.Popen(cmd, env=os.environ | node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        with RosGraph() as graph:
            pub = graph.publisher(Image, "/camera/image_raw")
            labels = graph.collect(Image, "/camera/segmentation/labels", RELIABLE)
            wait_matched(pub, [labels])
            publish_until(pub, frame(), labels)
            assert graph.node.count_publishers("/segmentation/labels") == 0
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0, out
    assert "segmenting /camera/image_raw" in out and "/camera/segmentation/{labels," in out
