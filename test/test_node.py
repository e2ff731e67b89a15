"""The segmentation node on a real rclpy graph with real ONNX models: outputs, headers, labels, CLI."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from sensor_msgs.msg import CompressedImage, Image

from conftest import ORT_BOUNDS_SPIN, SHIPPED_MODEL
from reference import Reference
from ros_graph import TIMEOUT_S, RosGraph, publish_until, start_node_process, stop_process, wait_matched, wait_until
from unet_perception.pipeline import blend
from unet_perception.tools.camera_sim import compressed_message, image_message, synthetic_frame


N_FRAMES = 3


def reference_segmenter(model) -> Reference:  # type: ignore[no-untyped-def]
    """cv2 + ONNX Runtime on the file, not the production Segmenter (test/reference.py)."""
    return Reference(model)


def decoded_jpeg_or_png(msg: CompressedImage) -> np.ndarray:
    """The RGB pixels of a compressed frame, by cv2 directly (the reference does not use the node's codec)."""
    return cv2.imdecode(np.frombuffer(bytes(msg.data), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].copy()


def as_array(msg: Image) -> np.ndarray:
    channels = msg.step // msg.width
    shape = (msg.height, msg.width, channels) if channels > 1 else (msg.height, msg.width)
    return np.frombuffer(bytes(msg.data), np.uint8).reshape(shape)


def stamp(i: int) -> Time:
    return Time(sec=1000 + i, nanosec=123)


def outputs_of(graph: RosGraph, ns: str) -> dict:  # type: ignore[type-arg]
    return {k: graph.collect(Image, f"{ns}/segmentation/{k}") for k in ("labels", "color", "overlay")}


def test_two_cameras_labels_color_overlay(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cams = {"/cam_a": ((64, 48), "rgb8"), "/cam_b": ((80, 60), "bgr8")}  # (width, height), encoding
    ref = reference_segmenter(tiny_model)
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model),
                                image_topics=[f"{ns}/image_raw" for ns in cams], overlay_alpha=0.4)
        pubs = {ns: graph.publisher(Image, f"{ns}/image_raw") for ns in cams}
        outs = {ns: outputs_of(graph, ns) for ns in cams}
        for ns in cams:
            wait_matched(pubs[ns], list(outs[ns].values()))
        sent: dict[str, list[Image]] = {ns: [] for ns in cams}
        for i in range(N_FRAMES):
            for ns, ((w, h), enc) in cams.items():
                msg = image_message(synthetic_frame(w, h, i), enc, frame_id=f"{ns[1:]}_optical", stamp=stamp(i))
                sent[ns].append(msg)
                pubs[ns].publish(msg)
            for ns in cams:  # one frame at a time per camera: the keep-latest slot drops nothing
                for collector in outs[ns].values():
                    collector.wait_for(i + 1)
        ref_labels = {ns: [s.labels for s in ref.run([synthetic_frame(w, h, i) for i in range(N_FRAMES)])]
                      for ns, ((w, h), _) in cams.items()}

    for ns, ((w, h), enc) in cams.items():
        for i in range(len(sent[ns])):
            got = {k: c.messages[i] for k, c in outs[ns].items()}
            for kind, msg in got.items():
                assert (msg.width, msg.height) == (w, h), (ns, kind)
                assert msg.header.frame_id == f"{ns[1:]}_optical"
                assert msg.header.stamp == stamp(i)
            assert got["labels"].encoding == "mono8"
            assert got["color"].encoding == "rgb8"
            assert got["overlay"].encoding == enc  # same family as the input (rgb8 or bgr8)
            labels = as_array(got["labels"])
            np.testing.assert_array_equal(labels, ref_labels[ns][i])
            assert len(np.unique(labels)) > 1, "a random model still gives more than one class"
            color = ref.color(labels)
            np.testing.assert_array_equal(as_array(got["color"]), color)
            overlay = blend(synthetic_frame(w, h, i), color, 0.4)
            expected = overlay[:, :, ::-1] if enc == "bgr8" else overlay
            np.testing.assert_array_equal(as_array(got["overlay"]), expected)


def test_compressed_input(tiny_carla_model) -> None:  # type: ignore[no-untyped-def]
    ref = reference_segmenter(tiny_carla_model)
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_carla_model), image_topics=["/front/image_raw/compressed"])
        pub = graph.publisher(CompressedImage, "/front/image_raw/compressed")
        outs = outputs_of(graph, "/front")
        wait_matched(pub, list(outs.values()))
        sent = []
        for i, fmt in enumerate(("png", "jpeg")):
            msg = compressed_message(synthetic_frame(96, 72, i), fmt, frame_id="front", stamp=stamp(i))
            sent.append(msg)
            pub.publish(msg)
            for collector in outs.values():
                collector.wait_for(i + 1)
    for i, msg_in in enumerate(sent):
        labels = outs["labels"].messages[i]
        assert (labels.width, labels.height, labels.encoding) == (96, 72, "mono8")
        assert labels.header.stamp == stamp(i)
        np.testing.assert_array_equal(as_array(labels), ref.run([decoded_jpeg_or_png(msg_in)])[0].labels)
        assert outs["overlay"].messages[i].encoding == "rgb8"


def test_colour_and_overlay_only_while_subscribed(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """With only a labels subscriber, colour and overlay are neither computed nor published."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/cam/image_raw"],
                                       publish_overlay=False)
        pub = graph.publisher(Image, "/cam/image_raw")
        labels = graph.collect(Image, "/cam/segmentation/labels")
        wait_matched(pub, [labels])
        calls = []
        real_outputs = node._segmenter.outputs
        node._segmenter.outputs = lambda *a, **kw: calls.append(kw) or real_outputs(*a, **kw)
        pub.publish(image_message(synthetic_frame(64, 48), "rgb8"))
        labels.wait_for(1)
        assert node._cameras[0].publishers["overlay"] is None  # switched off: no publisher at all
        assert calls == [{"color": False, "overlay": False, "alpha": 0.5, "overlay_bgr": False}]


def test_cli_subprocess_with_params_file(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`python -m unet_perception.node --ros-args --params-file config/seg.yaml -p ...`, stopped by Ctrl-C."""
    proc = start_node_process({"model_path": str(tiny_model), "image_topics": ["/sub/image_raw"],
                               "publish_color": False})
    try:
        with RosGraph() as graph:
            pub = graph.publisher(Image, "/sub/image_raw")
            labels = graph.collect(Image, "/sub/segmentation/labels")
            overlay = graph.collect(Image, "/sub/segmentation/overlay")
            wait_matched(pub, [labels, overlay])
            assert graph.node.count_publishers("/sub/segmentation/color") == 0  # publish_color: false
            msg = image_message(synthetic_frame(64, 48), "rgb8", frame_id="sub", stamp=stamp(7))
            got = publish_until(pub, msg, labels)[0]
            overlay.wait_for(1)
        assert (got.width, got.height, got.header.frame_id, got.header.stamp) == (64, 48, "sub", stamp(7))
        expected = reference_segmenter(tiny_model).run([synthetic_frame(64, 48)])[0].labels
        np.testing.assert_array_equal(as_array(got), expected)
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0, out
    assert "segmenting /sub/image_raw with onnxruntime on cpu" in out


@pytest.mark.skipif(not SHIPPED_MODEL.exists(), reason=f"shipped model {SHIPPED_MODEL} not trained/exported yet")
def test_shipped_model_is_the_default() -> None:
    """No model_path: the node loads the package's models/unet_camvid.onnx; CamVid-sized frame in, labels out."""
    proc = start_node_process({"image_topics": ["/camvid/image_raw"]})
    try:
        with RosGraph() as graph:
            pub = graph.publisher(Image, "/camvid/image_raw")
            labels = graph.collect(Image, "/camvid/segmentation/labels")
            wait_matched(pub, [labels])
            got = publish_until(pub, image_message(synthetic_frame(480, 360), "rgb8"), labels)[0]
        assert (got.width, got.height) == (480, 360)
    finally:
        out = stop_process(proc)
    assert "unet_camvid.onnx" in out


@pytest.mark.parametrize("params, entries", [
    ({}, ("1", "100") if ORT_BOUNDS_SPIN else ("0", "")),  # the default: spin, at most 100 us (else no spin)
    ({"spin_us": 250}, ("1", "250") if ORT_BOUNDS_SPIN else ("0", "")),
    ({"spin_us": 0}, ("1", "")),  # ONNX Runtime's own spin: no bound set
    ({"spinning": False}, ("0", "")),
])
def test_spin_parameters_reach_the_inference_session(tiny_model, params: dict, entries: tuple) -> None:  # type: ignore[no-untyped-def]
    """spinning / spin_us as the session's config entries (what each does: test_backend_onnxruntime)."""
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/spin/image_raw"], **params)
        options = node._segmenter.backend.sessions[0].get_session_options()

        def entry(key: str) -> str:
            try:
                return options.get_session_config_entry(f"session.intra_op.{key}")
            except RuntimeError:  # "does not have configuration with key"
                return ""

        assert (entry("allow_spinning"), entry("spin_duration_us")) == entries


@pytest.mark.parametrize("overlap", ["always", "never"])
def test_keep_latest_publishes_the_newest_frame(tiny_model, overlap: str) -> None:  # type: ignore[no-untyped-def]
    """While inference is busy on frame 0, frames 1, 2, 3 arrive: the next output is frame 3, 2 is dropped.

    Overlapped, the prepare stage takes frame 1 as soon as it arrives (one batch waits between two stages), so the
    outputs are 0, 1, 3; in turn they are 0, 3.
    """
    with RosGraph() as graph:
        node = graph.segmentation_node(model_path=str(tiny_model), image_topics=["/kl/image_raw"], overlap=overlap)
        pub = graph.publisher(Image, "/kl/image_raw")
        labels = graph.collect(Image, "/kl/segmentation/labels")
        wait_matched(pub, [labels])
        backend = node._segmenter.backend
        real_infer = backend._infer
        busy, release = threading.Event(), threading.Event()

        def blocked(batch: np.ndarray):  # type: ignore[no-untyped-def]
            busy.set()
            release.wait(TIMEOUT_S)
            return real_infer(batch)

        stats = node._cameras[0].stats
        backend._infer = blocked
        try:
            pub.publish(image_message(synthetic_frame(64, 48, 0), "rgb8", stamp=stamp(0)))
            assert busy.wait(TIMEOUT_S), "the worker never started frame 0"
            pub.publish(image_message(synthetic_frame(64, 48, 1), "rgb8", stamp=stamp(1)))
            wait_until(lambda: stats.frames_in == 2, what="frame 1 to reach the slot")
            if overlap == "always":
                wait_until(lambda: node._cameras[0].pending is None, what="the prepare stage to take frame 1")
            for i in (2, 3):
                pub.publish(image_message(synthetic_frame(64, 48, i), "rgb8", stamp=stamp(i)))
            wait_until(lambda: stats.frames_in == 4, what="frames 2-3 to reach the slot")
        finally:
            backend._infer = real_infer
            release.set()
        want = [0, 1, 3] if overlap == "always" else [0, 3]
        got = labels.wait_for(len(want))
        wait_until(lambda: stats.frames_out + stats.drops == 4, what="every frame accounted for")
    assert [m.header.stamp for m in got] == [stamp(i) for i in want]
    assert stats.drops == 4 - len(want)


def test_overlay_alpha_changes_at_run_time(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """`ros2 param set /segmentation_node overlay_alpha 0.9` (the parameter service) changes the next overlay."""
    msg = image_message(synthetic_frame(64, 48, 1), "rgb8")
    rgb = synthetic_frame(64, 48, 1)
    ref = reference_segmenter(tiny_model)
    color = ref.color(ref.run([rgb])[0].labels)
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/oa/image_raw"], overlay_alpha=0.2)
        pub = graph.publisher(Image, "/oa/image_raw")
        overlay = graph.collect(Image, "/oa/segmentation/overlay")
        wait_matched(pub, [overlay])
        pub.publish(msg)
        overlay.wait_for(1)
        client = AsyncParameterClient(graph.node, "segmentation_node")
        assert client.wait_for_services(TIMEOUT_S)
        future = client.set_parameters([Parameter("overlay_alpha", value=0.9)])
        wait_until(future.done, what="the parameter service to answer")
        assert future.result().results[0].successful
        pub.publish(msg)
        first, second = overlay.wait_for(2)[:2]
    np.testing.assert_array_equal(as_array(first), blend(rgb, color, 0.2))
    np.testing.assert_array_equal(as_array(second), blend(rgb, color, 0.9))
    assert not np.array_equal(as_array(first), as_array(second))


def test_every_parameter_can_be_read_at_once_through_the_parameter_service(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """What `ros2 param dump` does: list every parameter, then get them all in one request. The list parameters
    without a default (class_colors, ground.*_classes) answer an empty string array; one unset parameter used to
    empty the whole answer. Their types (`ros2 param get-types`) say the same (they said NOT_SET)."""
    from rcl_interfaces.msg import ParameterType

    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(tiny_model), image_topics=["/pd/image_raw"],
                                class_colors=["Sky=1,2,3"])
        client = AsyncParameterClient(graph.node, "segmentation_node")
        assert client.wait_for_services(TIMEOUT_S)
        listed = client.list_parameters()
        wait_until(listed.done, what="list_parameters to answer")
        names = list(listed.result().result.names)
        got = client.get_parameters(names)
        wait_until(got.done, what="get_parameters to answer")
        values = dict(zip(names, got.result().values, strict=True))
        typed = client.get_parameter_types(names)
        wait_until(typed.done, what="get_parameter_types to answer")
        types = dict(zip(names, typed.result().types, strict=True))
    assert {"class_colors", "ground.free_classes", "ground.obstacle_classes", "model_path"} <= set(values)
    assert list(values["class_colors"].string_array_value) == ["Sky=1,2,3"]
    for name in ("ground.free_classes", "ground.obstacle_classes"):
        assert values[name].type == ParameterType.PARAMETER_STRING_ARRAY
        assert list(values[name].string_array_value) == []
        assert types[name] == ParameterType.PARAMETER_STRING_ARRAY, "get-types must say what get says"
    assert {name: types[name] for name in names} == {name: values[name].type for name in names}
    assert values["model_path"].string_value == str(tiny_model)
