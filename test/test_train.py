"""Short real training runs of unet-train on a few CamVid frames: loss, checkpoints, resume, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA

from unet_perception.training import train

CAMVID = DATA / "camvid"
pytestmark = pytest.mark.skipif(not (CAMVID / "train.txt").is_file(),
                                reason=f"CamVid is not at {CAMVID} (see ../shared/data/README.md)")

# 6 frames at 48x64, width 8 with batch norm: 3 steps per epoch, about half a second per epoch on 2 cores.
TINY = ["--dataset", "camvid", "--data", str(CAMVID), "--input-size", "48x64", "--batch-size", "2",
        "--limit", "6", "--arch", "seed", "--width", "8", "--norm", "batch", "--lr", "3e-3", "--workers", "0",
        "--threads", "1", "--no-progress", "--seed", "7"]


def run(out: Path, epochs: int, *extra: str) -> dict[str, Any]:
    assert train.main([*TINY, "--out", str(out), "--epochs", str(epochs), *extra]) == 0
    return torch.load(out / "last.pt", weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    run(out, 12, "--val-every", "6")
    return out


def test_training_lowers_the_loss(trained: Path) -> None:
    losses = [h["loss"] for h in json.loads((trained / "history.json").read_text())]
    assert len(losses) == 12
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses


def test_checkpoints_hold_what_export_and_resume_need(trained: Path) -> None:
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(trained / name, weights_only=False)
        assert {"model", "optimizer", "scheduler", "epoch", "args", "model_config", "input_size",
                "class_table", "history", "best_miou", "rng"} <= set(ckpt)
        assert ckpt["model_config"] == {"arch": "seed", "num_classes": 11, "width": 8, "dropout": 0.3, "norm": "batch"}
        assert ckpt["input_size"] == [48, 64] and ckpt["dataset"] == "camvid"
    last = torch.load(trained / "last.pt", weights_only=False)
    assert last["epoch"] == 11 and len(last["history"]) == 12
    validated = [h for h in last["history"] if "val_miou" in h]
    assert [h["epoch"] for h in validated] == [6, 12]  # --val-every 6
    assert last["best_miou"] == max(h["val_miou"] for h in validated)
    assert list(validated[-1]["val"]["per_class_iou"]) == [c["name"] for c in last["class_table"]]
    assert "val mIoU" in (trained / "train.log").read_text()


def test_same_seed_gives_the_same_loss_history(trained: Path, tmp_path: Path) -> None:
    again = run(tmp_path / "again", 12, "--val-every", "6")
    first = json.loads((trained / "history.json").read_text())
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first]
    assert [h.get("val_miou") for h in again["history"]] == [h.get("val_miou") for h in first]


def test_resume_continues_an_interrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real_save = train.save_checkpoint

    def save_then_crash(path: Path, state: dict[str, Any]) -> None:
        real_save(path, state)
        if path.name == "last.pt" and state["epoch"] == 1:
            raise KeyboardInterrupt  # as if stopped with Ctrl-C after the second epoch

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(out, 3)
    interrupted = torch.load(out / "last.pt", weights_only=False)
    assert interrupted["epoch"] == 1 and len(interrupted["history"]) == 2

    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed = run(out, 3, "--resume")
    assert resumed["epoch"] == 2 and [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == interrupted["history"]
    assert resumed["scheduler"]["last_epoch"] == 3 * 3  # the one-cycle schedule ran to its end, not restarted
    assert "resumed from" in (out / "train.log").read_text()
    pairs = zip(interrupted["model"].values(), resumed["model"].values(), strict=True)
    moved = [not torch.equal(a, b) for a, b in pairs if a.is_floating_point()]
    assert any(moved)


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--resume: no checkpoint at '.*last\.pt'"):
        run(tmp_path / "empty", 1, "--resume")
    assert not (tmp_path / "empty").exists()  # refused before --out is made


def test_resume_with_another_schedule_is_refused(trained: Path) -> None:
    with pytest.raises(SystemExit, match="resume with the same --epochs"):
        run(trained, 20, "--resume")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the AMP path)")
def test_cuda_training_uses_mixed_precision(tmp_path: Path) -> None:
    ckpt = run(tmp_path / "cuda", 2, "--device", "cuda")
    assert ckpt["scaler"] is not None  # GradScaler state: autocast float16 was on
    assert all(h["loss"] == h["loss"] for h in ckpt["history"])  # finite, not NaN


@pytest.mark.parametrize("size", ["50x64", "48x", "big"])
def test_bad_input_size_is_rejected_with_a_hint(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--data", "x", "--input-size", size])
    err = capsys.readouterr().err
    assert "48x64" in err or "HEIGHTxWIDTH" in err
