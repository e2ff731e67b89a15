"""Cross-validation by sequence on the real CamVid lists: the folds leak no frame, the driver runs end to end
(a few steps at 48x64), its table is the mean of the folds, and the final fit selects nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from conftest import DATA

from unet_perception.class_table import load_class_table
from unet_perception.torch_contract import load_checkpoint
from unet_perception.training import folds, train
from unet_perception.training.options import RECIPES, build_parser, expand_recipe

CAMVID = DATA / "camvid"
pytestmark = pytest.mark.skipif(not (CAMVID / "train.txt").is_file(),
                                reason=f"CamVid is not at {CAMVID} (see ../shared/data/README.md)")

# The seed U-Net at width 8 on 48x64 crops: a fold run is a few seconds; recipe 'today' is overridden here.
TINY = ["--input-size", "48x64", "--crop-size", "48x64", "--scale", "0.15", "0.2", "--batch-size", "2",
        "--limit", "4", "--arch", "seed", "--width", "8", "--norm", "batch", "--workers", "0", "--threads", "1",
        "--no-progress", "--epochs", "2", "--val-every", "1"]


def listed_names(*splits: str) -> list[str]:
    """Frame file names of the split list files, read here with plain string operations."""
    return [line.split()[0].rsplit("/", 1)[-1] for s in splits
            for line in (CAMVID / f"{s}.txt").read_text().splitlines() if line.strip()]


def test_camvid_sequences_are_what_the_card_says() -> None:
    def count(names: list[str]) -> dict[str, int]:
        return {s: sum(n.startswith(s + "_") for n in names) for s in ("0001TP", "0006R0", "0016E5", "Seq05VD")}
    assert count(listed_names("train")) == {"0001TP": 62, "0006R0": 101, "0016E5": 204, "Seq05VD": 0}
    assert count(listed_names("val")) == {"0001TP": 0, "0006R0": 0, "0016E5": 101, "Seq05VD": 0}


@pytest.mark.parametrize("sequence, held", [("0006R0", 101), ("0001TP", 62)])  # the two folds
def test_a_fold_trains_on_no_frame_of_its_held_out_sequence(sequence: str, held: int) -> None:
    args = build_parser().parse_args(["--data", str(CAMVID), "--holdout-sequence", sequence])
    train_set, eval_set, name, selects = train.build_datasets(args, load_class_table("camvid"))
    everything = listed_names("train", "val")
    trained = [p.image.name for p in train_set.pairs]
    scored = [p.image.name for p in eval_set.pairs] if eval_set else []
    assert not [n for n in trained if n.startswith(sequence + "_")]
    assert sorted(scored) == sorted(n for n in everything if n.startswith(sequence + "_")) and len(scored) == held
    assert sorted(trained + scored) == sorted(everything)  # train+val, nothing else, nothing twice
    assert len(train_set.images) == 468 - held  # the frames in memory are those pairs
    assert name == f"held-out {sequence}" and not selects


def test_an_unknown_sequence_names_the_ones_there(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"'Seq05VD'.*0001TP \(62\), 0006R0 \(101\), 0016E5 \(305\)"):
        train.main(["--data", str(CAMVID), "--holdout-sequence", "Seq05VD", "--out", str(tmp_path)])



def test_a_missing_dataset_or_unknown_table_is_one_line_and_makes_no_out(tmp_path: Path) -> None:
    # was: FileNotFoundError / ValueError tracebacks, after --out was already made
    with pytest.raises(SystemExit, match=r"^unet-train: dataset root '.*none' does not exist$"):
        train.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^unet-train: .*nosuch"):
        train.main(["--data", str(CAMVID), "--dataset", "nosuch", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_recipes_put_their_options_first_so_the_command_line_wins() -> None:
    args = build_parser().parse_args(expand_recipe(["--recipe", "lovasz", "--data", "x", "--epochs", "3"]))
    assert args.lovasz == 0.5 and args.epochs == 3 and args.input_size == (288, 384) and args.recipe == "lovasz"


@pytest.mark.parametrize("main", [train.main, folds.main])
def test_help_lists_every_recipe(main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in RECIPES) and "hardest 25% of pixels" in text
    assert ("unet-train --recipe today --holdout-sequence 0006R0" if main is train.main else
            "Cross-validation by video sequence") in text  # the program's own description


def _iou_mean(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    present = cm.sum(1) > 0
    return float(np.mean(tp[present] / union[present]))


def _rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _confusion_at(run: Path, names: list[str], hw: tuple[int, int]) -> np.ndarray:
    """The fold's last weights scored here with cv2 and NumPy: bilinear down to ``hw``, argmax, nearest up."""
    model, _ = load_checkpoint(run / "last.pt")
    cm = np.zeros((11, 11), np.int64)
    for name in names:  # both folds' sequences are in CamVid's train split
        rgb = _rgb(CAMVID / "train" / name)
        truth = cv2.imread(str(CAMVID / "trainannot" / name), cv2.IMREAD_UNCHANGED)
        assert truth is not None
        small = cv2.resize(rgb, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        with torch.no_grad():
            logits = model(torch.from_numpy(small).float().permute(2, 0, 1)[None] / 255.0)
        pred = cv2.resize(logits[0].argmax(0).numpy().astype(np.uint8), (truth.shape[1], truth.shape[0]),
                          interpolation=cv2.INTER_NEAREST)
        keep = truth < 11
        cm += np.bincount(truth[keep].astype(np.int64) * 11 + pred[keep], minlength=121).reshape(11, 11)
    return cm


def _fold_argv(root: Path) -> list[str]:
    return ["--recipe", "today", "--data", str(CAMVID), "--out", str(root), "--eval-size", "32x48", *TINY]


@pytest.fixture(scope="module")
def fold_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folds")
    assert folds.main(_fold_argv(root)) == 0
    return root


def test_folds_driver_runs_both_folds_and_tabulates_their_mean(fold_root: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    table = json.loads((fold_root / "today" / "folds.json").read_text())
    fold_mious = []
    for sequence in folds.FOLDS:
        run = fold_root / "today" / sequence
        frames = json.loads((run / "frames.json").read_text())
        assert frames["eval"] and all(n.startswith(sequence + "_") for n in frames["eval"])
        assert frames["train"] and not [n for n in frames["train"] if n.startswith(sequence + "_")]
        report = json.loads((run / "final_eval.json").read_text())
        assert report["eval_size"] == [32, 48] and report["epochs"] == 2 and report["frames"] == 4
        cm = np.array(report["confusion_matrix"])
        np.testing.assert_array_equal(cm, _confusion_at(run, frames["eval"], (32, 48)))  # at --eval-size
        fold_mious.append(_iou_mean(cm))
        assert table["folds"][sequence]["mean_iou"] == pytest.approx(fold_mious[-1])
        assert not (run / "best.pt").exists()  # nothing is selected on the held-out frames
        last = torch.load(run / "last.pt", weights_only=False)
        assert last["epoch"] == 1 and last["history"][-1]["val_miou"] == pytest.approx(fold_mious[-1])
    assert table["mean_iou"] == pytest.approx(sum(fold_mious) / 2)
    text = (fold_root / "today" / "folds.md").read_text()
    assert f"**{table['mean_iou']:.3f}**" in text and "held-out 0006R0 (4 frames)" in text
    assert "--epochs 2" in text.splitlines()[0] and "2 epochs on 4 frames" in text  # what ran, not the recipe's 110
    # Asked again with the same options, the finished folds are reused, not trained again.
    log = (fold_root / "today" / "0006R0" / "train.log").read_text()
    capsys.readouterr()
    assert folds.main(_fold_argv(fold_root)) == 0
    assert (fold_root / "today" / "0006R0" / "train.log").read_text() == log
    assert "reusing" in capsys.readouterr().out
    assert folds.main(["--compare", str(fold_root)]) == 0
    assert f"| today | 0006R0, 0001TP | {table['mean_iou']:.3f} | +0.0 |" in (fold_root / "compare.md").read_text()


def test_folds_onnx_scores_fp32_and_int8_calibrated_on_the_folds_own_training_frames(
        fold_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unet_perception.training import fold_onnx

    calibrations: list[list[np.ndarray]] = []
    real_quantize = fold_onnx.quantize

    def recording_quantize(fp32: Path, out: Path, calibration: list[np.ndarray]) -> Path:
        calibrations.append(calibration)
        return real_quantize(fp32, out, calibration)

    monkeypatch.setattr(fold_onnx, "quantize", recording_quantize)
    assert folds.main([*_fold_argv(fold_root), "--onnx", "32x48"]) == 0
    tables = json.loads((fold_root / "today" / "folds_onnx_32x48.json").read_text())
    assert tables["int8_minus_fp32_points"] == pytest.approx(
        (tables["int8"]["mean_iou"] - tables["fp32"]["mean_iou"]) * 100)
    for sequence, calibration in zip(folds.FOLDS, calibrations, strict=True):
        run = fold_root / "today" / sequence
        frames = json.loads((run / "frames.json").read_text())
        # fp32 ONNX labels as the torch weights' (computed with cv2 here): at most a few boundary pixels differ
        onnx_cm = np.array(json.loads((run / "onnx_32x48.json").read_text())["fp32"]["confusion_matrix"])
        reference = _confusion_at(run, frames["eval"], (32, 48))
        assert np.abs(onnx_cm - reference).sum() / reference.sum() < 0.01
        trained = [cv2.resize(_rgb(CAMVID / "train" / n), (48, 32), interpolation=cv2.INTER_LINEAR)
                   for n in frames["train"]]
        assert len(calibration) == len(trained)
        assert all(any(np.array_equal(c, t) for t in trained) for c in calibration)  # never a held-out frame


def test_an_interrupted_fold_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = train.save_checkpoint

    def save_then_crash(path: Path, state: dict[str, Any]) -> None:
        real_save(path, state)
        if path.name == "last.pt" and state["epoch"] == 0:
            raise KeyboardInterrupt  # stopped after the first epoch, as by Ctrl-C or a lost machine

    argv = [*_fold_argv(tmp_path), "--folds", "0001TP"]
    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        folds.main(argv)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert folds.main(argv) == 0
    run = tmp_path / "today" / "0001TP"
    assert "resumed from" in (run / "train.log").read_text()
    last = torch.load(run / "last.pt", weights_only=False)
    assert [h["epoch"] for h in last["history"]] == [1, 2] and (run / "final_eval.json").is_file()


def test_final_fit_on_train_and_val_selects_nothing(tmp_path: Path) -> None:
    out = tmp_path / "final"
    assert train.main(["--recipe", "today", "--dataset", "camvid", "--data", str(CAMVID), "--train-splits",
                       "train,val", "--out", str(out), *TINY]) == 0
    last = torch.load(out / "last.pt", weights_only=False)
    assert not (out / "best.pt").exists() and not (out / "final_eval.json").exists()
    assert all("val_miou" not in h for h in last["history"]) and len(last["history"]) == 2
    assert "0 eval frames (none)" in (out / "train.log").read_text()
