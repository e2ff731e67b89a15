"""Shared fixtures: an isolated ROS domain per test session and small real ONNX models.

Models are made with the project's own export code from a narrow, randomly initialised U-Net, so the
tests never depend on the shipped model (one test uses it when present).
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

import pytest

# Each pytest process gets its own DDS domain, so parallel runs on one machine never hear each other.
# Set before any rclpy import; child processes (nodes started by tests) inherit it.
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 200))
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHIPPED_MODEL = REPO / "models" / "unet_camvid.onnx"
# onnxruntime 1.26 brought session.intra_op.spin_duration_us: before it, a bounded spin is no spin
ORT_BOUNDS_SPIN = tuple(int(x) for x in version("onnxruntime").split(".")[:2]) >= (1, 26)


def make_tiny_unet(dataset: str = "camvid", width: int = 4, seed: int = 0):  # type: ignore[no-untyped-def]
    """A narrow random U-Net (eval mode) and its class table; the same seed gives the same weights."""
    import torch

    from unet_perception.class_table import load_class_table
    from unet_perception.networks.seed_unet import UNet

    torch.manual_seed(seed)
    table = load_class_table(dataset)
    model = UNet(table.num_classes, width=width, norm="batch").eval()
    # Random BN statistics make the random net's labels vary across the image (not one class everywhere).
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model, table


def make_tiny_model(path: Path, dataset: str = "camvid", input_hw: tuple[int, int] = (32, 48),
                    width: int = 4, seed: int = 0) -> Path:
    """Export a narrow random U-Net through unet_perception.training.export (the real export path)."""
    from unet_perception.training.export import export_onnx

    model, table = make_tiny_unet(dataset, width, seed)
    return export_onnx(model, path, table, input_hw, metrics={"note": "random weights, for tests"})


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CamVid-table ONNX model (input 32x48) following the model contract."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny_camvid.onnx")


@pytest.fixture(scope="session")
def tiny_carla_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CARLA-table (23 classes) ONNX model (input 48x64)."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny_carla.onnx", "carla", (48, 64))


def bag_messages(path: Path) -> dict[str, list[tuple[int, bytes]]]:
    """topic -> [(timestamp, serialized message)] of a rosbag2, in bag order: compares bags byte for byte."""
    from rosbags.rosbag2 import Reader

    out: dict[str, list[tuple[int, bytes]]] = {}
    with Reader(path) as reader:
        for conn, ts, raw in reader.messages():
            out.setdefault(conn.topic, []).append((ts, bytes(raw)))
    return out
