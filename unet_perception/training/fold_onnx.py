"""The files that would ship, scored on a fold: the fold's last weights exported to ONNX at a given size and
quantized to int8 (calibrated on that fold's own training frames, never on the held-out ones), both scored on the
held-out frames through the node's ONNX Runtime pipeline, as ``unet-evaluate`` scores a model.

This answers "int8 within 1 point of fp32 on the folds" and "export at 288x384" without training again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from unet_perception.image_files import read_rgb
from unet_perception.metrics import summarize
from unet_perception.pipeline import preprocess
from unet_perception.torch_contract import checkpoint_table, load_checkpoint
from unet_perception.training.data import Pair, SegmentationDataset, pairs_of_splits
from unet_perception.training.engine import confusion_on_frames
from unet_perception.training.evaluate import load_model
from unet_perception.training.export import export_onnx
from unet_perception.training.quantize import quantize


def size_tag(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def score_fold_onnx(run: Path, data: str, hw: tuple[int, int], calibration_frames: int = 96) -> dict[str, Any]:
    """{'fp32': report, 'int8': report} of fold ``run`` exported at ``hw``; also written to onnx_HxW.json.
    Each report's ``seconds`` is the scoring time, not the training time."""
    model, ckpt = load_checkpoint(run / "last.pt")
    table = checkpoint_table(ckpt)
    frames = json.loads((run / "frames.json").read_text())
    splits = ckpt["args"].get("train_splits") or ["train", "val"]
    by_name: dict[str, Pair] = {p.image.name: p for p in pairs_of_splits(Path(data), table, splits)}
    held = SegmentationDataset(data, table, ckpt.get("eval_set", "held-out"),
                               pairs=[by_name[n] for n in frames["eval"]])
    trained = frames["train"]
    picks = np.linspace(0, len(trained) - 1, min(calibration_frames, len(trained))).round().astype(int)
    calibration = list(preprocess([read_rgb(by_name[trained[i]].image) for i in picks], hw))
    tag = size_tag(hw)
    fp32 = export_onnx(model, run / f"fold_{tag}.onnx", table, hw)
    int8 = quantize(fp32, run / f"fold_{tag}_int8.onnx", calibration)
    reports: dict[str, Any] = {}
    for kind, path in (("fp32", fp32), ("int8", int8)):
        loaded = load_model(path, "cpu")
        start = time.perf_counter()
        try:
            cm = confusion_on_frames(loaded.predict, held.images, held.labels, table.num_classes, table.ignore_index)
        finally:
            loaded.close()
        reports[kind] = {"model": str(path), "frames": len(held), "train_frames": len(trained),
                         "epochs": ckpt["epoch"] + 1, "eval_size": list(hw),
                         "seconds": round(time.perf_counter() - start, 1),
                         **summarize(cm, table.names), "confusion_matrix": cm.tolist()}
    (run / f"onnx_{tag}.json").write_text(json.dumps(reports, indent=1))
    return reports
