"""Data-parallel training through torchrun: two gloo processes on the CPU, as several GPUs would run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, REPO

from unet_perception.class_table import load_class_table
from unet_perception.training.data import SegmentationDataset

CAMVID = DATA / "camvid"
LIMIT, BATCH = 8, 2

pytestmark = [pytest.mark.slow,  # 12-20 s on 2 busy cores: two processes import torch
              pytest.mark.skipif(not (CAMVID / "train.txt").is_file(),
                                 reason=f"CamVid is not at {CAMVID} (see ../shared/data/README.md)"),
              pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="this torch build has no gloo process groups")]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "unet_perception.training.train", "--dataset", "camvid", "--data", str(CAMVID),
           "--out", str(out), "--input-size", "32x48", "--epochs", "2", "--batch-size", str(BATCH),
           "--limit", str(LIMIT), "--width", "4", "--workers", "0", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_two_processes_train_and_rank_0_alone_writes(ddp_run: Path) -> None:
    out = ddp_run
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    assert not list(out.glob("*.tmp"))
    log = (out / "train.log").read_text()
    assert log.count("unet-train:") == 1 and "world 2" in log  # logged once, by rank 0
    ckpt = torch.load(out / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 2
    # The sampler gives each process half of the frames: half the steps of a single-process run.
    assert ckpt["scheduler"]["total_steps"] == 2 * (LIMIT // 2 // BATCH)
    # Plain (not DDP-wrapped) weights, loadable without a process group.
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_validation_confusion_is_summed_over_both_ranks(ddp_run: Path) -> None:
    out = ddp_run
    ckpt = torch.load(out / "last.pt", weights_only=False)
    table = load_class_table("camvid")
    val = SegmentationDataset(CAMVID, table, "val", limit=LIMIT)
    expected = sum(np.bincount(lab.ravel(), minlength=256)[:table.num_classes] for lab in val.labels)
    # Each rank scores every other val frame; only the all-reduced matrix counts every frame's pixels.
    got = ckpt["history"][-1]["val"]["truth_pixels"]
    assert [got[name] for name in table.names] == expected.tolist()
