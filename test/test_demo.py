"""unet-demo end to end: a real node process, a real bag replayed and recorded, PNGs and a summary."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA, REPO
from rosbags.rosbag2 import Reader

CAMVID_VAL = DATA / "camvid" / "val"


def _demo(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unet_perception.tools.demo", *args], cwd=REPO, env=os.environ,
                          capture_output=True, text=True, timeout=timeout)


def check_what_it_says(run: subprocess.CompletedProcess[str], out: Path) -> dict[str, tuple[str, int]]:
    """The topics the demo says it records are exactly the output bag's, and the outputs it names are exactly
    what it wrote (each there); returns the bag's topic -> (type, count)."""
    (recording,) = [line.split(", recording ", 1)[1] for line in run.stdout.splitlines() if ", recording " in line]
    (written,) = [line.split(" (", 1)[1].removesuffix(")") for line in run.stdout.splitlines()
                  if line.startswith("outputs: ")]
    with Reader(out / "output_bag") as reader:
        conns = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
    assert re.split(r", | and ", recording) == list(conns), run.stdout
    names = written.split(", ")
    assert names == json.loads((out / "summary.json").read_text())["written"]
    assert [n for n in names if not (out / n).exists()] == []
    assert sorted(names) == sorted(p.name for p in out.iterdir()), "a file the line does not name"
    return conns


@pytest.mark.skipif(not CAMVID_VAL.is_dir(), reason=f"CamVid val frames not found at {CAMVID_VAL}")
def test_demo_end_to_end(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "demo"
    run = _demo(["--images", str(CAMVID_VAL), "--model", str(tiny_model), "--frames", "6", "--rate", "5",
                 "--pngs", "3", "--out", str(out)])
    assert run.returncode == 0, run.stdout + run.stderr + (out / "node.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == 6
    # the node keeps only the newest frame per camera, so a frame can be dropped, never invented
    assert 1 <= summary["frames_out"] <= 6
    assert summary["node_frames_in"] == 6
    assert summary["frames_out"] + summary["node_drops"] == 6 and summary["node_errors"] == 0
    assert summary["backend"] == "onnxruntime" and summary["latency_mean_ms"] > 0
    assert summary["miou_frames"] == summary["frames_out"]
    assert summary["miou"] == pytest.approx(miou_of_recorded_labels(out), abs=1e-9)
    assert "mIoU vs ground truth" in run.stdout and "frames out (labels received)" in run.stdout

    conns = check_what_it_says(run, out)
    assert list(conns) == [f"/camera/segmentation/{k}" for k in ("labels", "color", "overlay", "confidence",
                                                                   "label_info")] + ["/diagnostics"]
    for kind in ("labels", "color", "overlay", "confidence"):  # every image output, as the node publishes it
        assert conns[f"/camera/segmentation/{kind}"] == ("sensor_msgs/msg/Image", summary["frames_out"])
    assert conns["/camera/segmentation/label_info"] == ("vision_msgs/msg/LabelInfo", 1)  # transient local, once
    assert conns["/diagnostics"][1] >= 1
    with Reader(out / "input_bag") as reader:
        assert [c.msgcount for c in reader.connections] == [6]

    pngs = sorted(out.glob("overlay_*.png"))
    assert [p.name for p in pngs] == [f"overlay_{i:03d}.png" for i in range(min(3, summary["frames_out"]))]
    first_frame = cv2.imread(str(sorted(CAMVID_VAL.iterdir())[0]))
    assert cv2.imread(str(pngs[0])).shape == first_frame.shape
    assert not [p for p in out.iterdir() if ".partial-" in p.name]


def miou_of_recorded_labels(out: Path) -> float:
    """The mIoU of the recorded labels against CamVid's truth, computed here: each label message is matched to
    its val PNG through the recorded input frame with the same stamp (by pixels), then one confusion matrix
    with NumPy; void (11) is not scored, unknown (255) is a miss, classes absent from the truth are not averaged."""
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_JAZZY)

    def images(bag: Path, topic: str) -> dict[int, np.ndarray]:
        with Reader(bag) as reader:
            conns = [c for c in reader.connections if c.topic == topic]
            msgs = (store.deserialize_cdr(raw, c.msgtype) for c, _, raw in reader.messages(connections=conns))
            return {m.header.stamp.sec * 10**9 + m.header.stamp.nanosec:
                    m.data.reshape(m.height, m.step)[:, : m.width * (m.step // m.width)].reshape(m.height, m.width, -1)
                    for m in msgs}

    inputs = images(out / "input_bag", "/camera/image_raw")
    labels = images(out / "output_bag", "/camera/segmentation/labels")
    val = {p: cv2.imread(str(p)) for p in sorted(CAMVID_VAL.iterdir())}
    n = 11
    cm = np.zeros((n, n + 1), np.int64)  # truth rows; predictions 0..10 and a last column for unknown
    for stamp, pred in labels.items():
        rgb = inputs[stamp]
        (source,) = [p for p, bgr in val.items() if bgr.shape == rgb.shape and np.array_equal(bgr[:, :, ::-1], rgb)]
        truth = cv2.imread(str(CAMVID_VAL.parent / "valannot" / source.name), cv2.IMREAD_GRAYSCALE).ravel()
        pred = np.minimum(pred[:, :, 0].ravel(), n)
        keep = truth < n
        np.add.at(cm, (truth[keep], pred[keep]), 1)
    present = cm.sum(1) > 0
    tp = np.diag(cm[:, :n]).astype(np.float64)
    union = cm.sum(1) + cm[:, :n].sum(0) - tp
    return float(np.mean(tp[present] / union[present]))


def test_demo_without_a_model_says_how_to_get_one(tmp_path: Path) -> None:
    run = _demo(["--images", str(tmp_path), "--model", str(tmp_path / "missing.onnx"), "--out", str(tmp_path)])
    assert run.returncode == 1
    assert "no model at" in run.stderr and "--model" in run.stderr
    assert "make model" in run.stderr  # a target the Makefile has (there is no `make train`)


def test_demo_on_a_clone_without_data_uses_synthetic_frames(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "demo"
    run = _demo(["--images", str(tmp_path / "no-shared-data"), "--model", str(tiny_model), "--frames", "4",
                 "--rate", "5", "--pngs", "1", "--out", str(out)])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "using synthetic frames" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == 4 and summary["node_frames_in"] == 4 and summary["frames_out"] >= 1
    assert summary["miou_frames"] == 0  # no ground truth for synthetic frames: no mIoU claimed
    assert cv2.imread(str(out / "overlay_000.png")).shape == (480, 640, 3)
    assert "/camera/segmentation/confidence" in check_what_it_says(run, out)
    assert summary["written"][0] == "synthetic_frames"


def test_score_counts_unknown_pixels_as_misses_not_as_the_last_class(tmp_path: Path) -> None:
    """Truth [Sky, Sky, Bicyclist, Bicyclist], the node says [Sky, unknown, Bicyclist, Bicyclist]: Sky 1/2,
    Bicyclist 2/2, mIoU 0.75. Clipping 255 to the last class (Bicyclist, id 10) made it 2/3 and mIoU 0.58."""
    from types import SimpleNamespace

    import cv2
    import numpy as np

    from unet_perception.class_table import load_class_table
    from unet_perception.tools.demo import score

    classes = load_class_table("camvid")
    (tmp_path / "valannot").mkdir()
    cv2.imwrite(str(tmp_path / "valannot" / "f.png"), np.array([[0, 0, 10, 10]], np.uint8))
    msg = SimpleNamespace(data=np.array([0, 255, 10, 10], np.uint8), height=1, width=4, step=4)
    miou, scored = score({7: msg}, {7: tmp_path / "val" / "f.png"}, tmp_path / "valannot", classes)
    assert scored == 1 and abs(miou - 0.75) < 1e-9


@pytest.mark.skipif(not CAMVID_VAL.is_dir(), reason=f"CamVid val frames not found at {CAMVID_VAL}")
def test_demo_ground_records_points_and_grid(tmp_path: Path, tiny_model: Path) -> None:
    """--ground: the assumed CamVid camera's CameraInfo goes out, points and ground_grid come back into the bag."""
    out = tmp_path / "demo"
    run = _demo(["--images", str(CAMVID_VAL), "--model", str(tiny_model), "--frames", "4", "--rate", "4",
                 "--pngs", "1", "--out", str(out), "--ground"])
    assert run.returncode == 0, run.stdout + run.stderr + (out / "node.log").read_text()
    assert "CamVid has no calibration: assumed pinhole" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ground_clouds"] >= 1 and summary["ground_grids"] >= 1
    assert summary["ground_cells"]["free"] + summary["ground_cells"]["obstacle"] > 0
    conns = check_what_it_says(run, out)  # points and ground_grid said and recorded, ground_grid.png named
    assert "ground_grid.png" in summary["written"]
    assert conns["/camera/segmentation/points"] == ("sensor_msgs/msg/PointCloud2", summary["ground_clouds"])
    assert conns["/camera/segmentation/ground_grid"] == ("nav_msgs/msg/OccupancyGrid", summary["ground_grids"])
    grid_png = cv2.imread(str(out / "ground_grid.png"))
    assert grid_png is not None and grid_png.shape == (600, 600, 3)  # 200 x 200 cells, x3
