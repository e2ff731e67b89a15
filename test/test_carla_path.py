"""The CARLA lab's 23-class path end to end on its 14 frames: train, evaluate, export, run the ONNX model.

The frames are too few to judge accuracy; these tests check that every program works on the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import DATA

from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.model_contract import read_model_info
from unet_perception.training import evaluate, export, train
from unet_perception.image_files import read_rgb

CARLA = DATA / "carla"
pytestmark = pytest.mark.skipif(not (CARLA / "CameraRGB").is_dir(),
                                reason=f"the CARLA lab frames are not at {CARLA} (see ../shared/data/README.md)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("carla")
    assert train.main(["--dataset", "carla", "--data", str(CARLA), "--out", str(out / "run"),
                       "--input-size", "48x64", "--epochs", "2", "--batch-size", "5", "--decoder", "16,16,8,8",
                       "--workers", "0", "--threads", "1", "--no-progress"]) == 0
    assert export.main([str(out / "run" / "best.pt"), str(out / "carla.onnx"), "--check-data", str(CARLA),
                        "--check-frames", "4"]) == 0
    return out


def test_training_uses_the_block_split(run_dir: Path) -> None:
    log = (run_dir / "run" / "train.log").read_text()
    assert "carla, 10 train frames (train), 4 eval frames (val, selects best.pt), 23 classes, model lite" in log
    assert (run_dir / "run" / "best.pt").is_file() and (run_dir / "run" / "last.pt").is_file()


def test_evaluate_checkpoint_writes_report_figures_and_the_23_class_table(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_dir / "eval_pt"
    assert evaluate.main([str(run_dir / "run" / "best.pt"), "--data", str(CARLA), "--split", "all",
                          "--out", str(out), "--samples", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == 14 and report["frame_size"] == [480, 640] and report["dataset"] == "carla"
    assert report["model_kind"] == "checkpoint" and report["input_size"] == [48, 64]
    assert report["split"] == "all" and report["seconds"] > 0 and report["evaluated_at"]
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (23, 23) and cm.sum() == 14 * 480 * 640  # no ignore id in CARLA: every pixel counts
    assert len(report["per_class_iou"]) == 23 and 0 <= report["mean_iou"] <= 1
    assert report["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    for png, min_hw in (("confusion.png", (500, 500)), ("samples.png", (200, 300))):
        img = cv2.imread(str(out / png))
        assert img is not None and img.shape[0] >= min_hw[0] and img.shape[1] >= min_hw[1], png
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == 23 and "| 7 | Road |" in table and "**mIoU**" in table


def test_exported_model_carries_the_carla_table_and_labels_in_range(run_dir: Path) -> None:
    info = read_model_info(run_dir / "carla.onnx")
    assert info.classes.num_classes == 23 and info.classes.names[13] == "Sky" and info.input_hw == (48, 64)
    frames = np.stack([cv2.resize(read_rgb(p), (64, 48), interpolation=cv2.INTER_LINEAR)
                       for p in sorted((CARLA / "CameraRGB").glob("*.png"))[:3]])
    with create_backend("onnxruntime", info, BackendOptions(max_batch=3)) as backend:
        labels = backend.infer(frames).labels
    assert labels.shape == (3, 48, 64) and labels.dtype == np.uint8 and labels.max() <= 22


def test_evaluating_the_onnx_model_scores_like_its_checkpoint(run_dir: Path) -> None:
    reports = [evaluate.evaluate(run_dir / name, CARLA, run_dir / f"eval_{i}", split="val", samples=0)
               for i, name in enumerate(("run/best.pt", "carla.onnx"))]
    assert [r["model_kind"] for r in reports] == ["checkpoint", "onnx"]
    pt, onnx = (np.array(r["confusion_matrix"]) for r in reports)
    # Same resize in, same nearest upscale out: the confusion matrices agree to 0.1% of the pixels.
    assert np.abs(pt - onnx).sum() / 2 <= 0.001 * pt.sum()
    assert not (run_dir / "eval_1" / "samples.png").exists()  # --samples 0


def test_evaluate_refuses_a_dataset_the_model_was_not_trained_for(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main([str(run_dir / "carla.onnx"), "--dataset", "camvid", "--data", str(CARLA),
                          "--out", str(run_dir / "bad")]) == 2
    assert "pass the matching --dataset" in capsys.readouterr().err


def test_evaluate_names_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main([str(tmp_path / "missing.onnx"), "--data", str(CARLA), "--out", str(tmp_path)]) == 2
    assert "missing.onnx' does not exist" in capsys.readouterr().err
