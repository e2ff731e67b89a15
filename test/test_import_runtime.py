"""An imported model where ours run: the node on a real rclpy graph and unet-bag label, with 150 ADE20K classes,
logits at 1/4, BGR and mean/std. The reference is the SOURCE model run by ONNX Runtime, with the node's resize,
the preprocessing, the bilinear logits resize and the nearest upscale done here by NumPy and OpenCV.

Planted and seen failing: nearest instead of bilinear logits resize, no BGR swap.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from foreign_models import MmsegLike, export
from rosbags.rosbag2 import Reader
from sensor_msgs.msg import Image

from ros_graph import RosGraph, wait_matched
from unet_perception.class_table import load_class_table
from unet_perception.model_contract import read_model_info
from unet_perception.tools import bag
from unet_perception.tools.bag_cli import main as bag_main
from unet_perception.tools.camera_sim import image_message, synthetic_frame
from unet_perception.tools.import_model import main

HW = (48, 64)
MEAN, STD = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("import")
    torch.manual_seed(3)
    source = export(MmsegLike(150), folder / "mmseg.onnx", HW, dynamic_hw=True, opset=11)
    out = folder / "ade.onnx"
    assert main([str(source), str(out), "--classes", "ade20k", "--channels", "bgr", "--input-size", "48x64",
                 "--mean", *[str(v) for v in MEAN], "--std", *[str(v) for v in STD]]) == 0
    return source, out


def reference_labels(source: Path, frame: np.ndarray) -> np.ndarray:
    """The source model on one RGB frame of any size, everything around it by OpenCV/NumPy."""
    h, w = HW
    small = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    x = ((small - MEAN) / STD)[..., ::-1].transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": np.ascontiguousarray(x)})[0][0]
    up = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in logits])
    labels = up.argmax(0).astype(np.uint8)
    return cv2.resize(labels, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_NEAREST)


def test_node_serves_an_imported_model(imported: tuple[Path, Path]) -> None:
    source, model = imported
    frames = [synthetic_frame(80, 60, i) for i in range(2)]
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(model), image_topics=["/imp/image_raw"])
        pub = graph.publisher(Image, "/imp/image_raw")
        labels = graph.collect(Image, "/imp/segmentation/labels")
        confidence = graph.collect(Image, "/imp/segmentation/confidence")
        wait_matched(pub, [labels, confidence])
        for i, frame in enumerate(frames):
            pub.publish(image_message(frame, "rgb8", frame_id="imp"))
            labels.wait_for(i + 1)
            confidence.wait_for(i + 1)
    for frame, msg in zip(frames, labels.messages):
        got = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width)
        want = reference_labels(source, frame)
        assert len(np.unique(want)) > 2
        assert (got == want).mean() >= 0.995
        assert got.max() < 150
    assert len(confidence.messages) == len(frames)


def test_node_label_info_comes_from_the_table(imported: tuple[Path, Path]) -> None:
    vision_msgs = pytest.importorskip("vision_msgs.msg", reason="vision_msgs is not installed (make venv builds it)")
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    _, model = imported
    with RosGraph() as graph:
        graph.segmentation_node(model_path=str(model), image_topics=["/li/image_raw"], unknown_threshold=100)
        info = graph.collect(vision_msgs.LabelInfo, "/li/segmentation/label_info", latched).wait_for(1)[0]
    table = load_class_table("ade20k")
    assert [(c.class_id, c.class_name) for c in info.class_map] == [*enumerate(table.names), (255, "unknown")]
    assert info.threshold == pytest.approx(100 / 255)


def test_unet_bag_labels_with_an_imported_model(imported: tuple[Path, Path], tmp_path: Path) -> None:
    source, model = imported
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [synthetic_frame(80, 60, i) for i in range(3)]
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), frame[..., ::-1])
    src, out = tmp_path / "in_bag", tmp_path / "out_bag"
    assert bag_main(["from-images", str(folder), str(src), "--topic", "/cam/image_raw"]) == 0
    assert bag_main(["label", str(src), str(out), "--model", str(model), "--backend", "onnxruntime"]) == 0
    store = bag.typestore()
    with Reader(out) as reader:
        got = [store.deserialize_cdr(raw, c.msgtype) for c, _, raw in reader.messages()
               if c.topic == "/cam/segmentation/labels"]
    assert len(got) == len(frames)
    for frame, msg in zip(frames, got):
        labels = msg.data.reshape(msg.height, msg.width)
        assert (labels == reference_labels(source, frame)).mean() >= 0.995
    assert read_model_info(model).classes.num_classes == 150


@pytest.mark.fleet
@pytest.mark.slow
def test_label_many_with_an_imported_model_equals_label(imported: tuple[Path, Path], tmp_path: Path) -> None:
    """label-many on a local Ray writes, byte for byte, what unet-bag label writes with the imported model."""
    pytest.importorskip("ray", reason="label-many needs Ray: pip install -r requirements/fleet.txt")
    from conftest import bag_messages

    from unet_perception.fleet.driver import ray_session

    _, model = imported
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i:03d}.png"), synthetic_frame(64, 48, i))
    bags = tmp_path / "bags"
    bags.mkdir()
    for name in ("a", "b"):
        assert bag_main(["from-images", str(folder), str(bags / name)]) == 0
    common = ["--model", str(model), "--backend", "onnxruntime", "--threads", "1"]
    assert bag_main(["label", str(bags / "a"), str(tmp_path / "single"), *common]) == 0
    with ray_session(num_cpus=2):
        assert bag_main(["label-many", str(bags / "a"), str(bags / "b"), "--out", str(tmp_path / "many"),
                         "--workers", "2", *common]) == 0
    assert bag_messages(tmp_path / "many" / "a") == bag_messages(tmp_path / "single")
