"""Evaluate a training checkpoint or an exported ONNX model on a dataset split.

    unet-evaluate runs/camvid/best.pt --data ../shared/data/camvid --out runs/camvid/eval
    unet-evaluate models/unet_camvid.onnx --data ../shared/data/camvid --out eval/onnx

Frames are scored at their own resolution: each frame is resized (bilinear) to the model input, and
the predicted labels are upscaled (nearest) to the truth's size, exactly as the runtime node does.
Void / ignored pixels are left out; mIoU averages the classes present in the truth.

Writes into --out: ``report.json`` (pixel accuracy, per-class IoU, mIoU, confusion matrix),
``confusion.png`` (row-normalised) and ``samples.png`` (input / truth / prediction per frame), and
prints the per-class IoU table in Markdown (ready for the model card).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from unet_perception.class_table import ClassTable, available_tables, load_class_table
from unet_perception.metrics import summarize
from unet_perception.model_contract import ModelError, check_model_file

Predict = Callable[[list[np.ndarray]], list[np.ndarray]]  # RGB frames (any size) -> labels at that size


@dataclass
class LoadedModel:
    """A model ready to label frames, whatever file it came from."""

    predict: Predict
    table: ClassTable
    input_hw: tuple[int, int]
    kind: str  # "checkpoint" or "onnx"
    close: Callable[[], None]


def load_model(path: str | Path, device: str = "auto", batch_size: int = 4) -> LoadedModel:
    """Open a training checkpoint (``.pt``) or an exported ONNX model (``.onnx``) for evaluation."""
    path = Path(path)
    check_model_file(path)  # ModelError: missing, a folder, a device, a FIFO
    if path.suffix == ".onnx":
        return _load_onnx(path, device, batch_size)
    if path.suffix in (".pt", ".pth"):
        return _load_checkpoint(path, device, batch_size)
    raise ValueError(f"model '{path}' is neither a checkpoint (.pt) nor an ONNX model (.onnx)")


def _load_checkpoint(path: Path, device: str, batch_size: int) -> LoadedModel:
    import torch

    from unet_perception.training.engine import predict_labels
    from unet_perception.torch_contract import checkpoint_table, load_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    model, ckpt = load_checkpoint(path, dev)
    input_hw = (int(ckpt["input_size"][0]), int(ckpt["input_size"][1]))
    return LoadedModel(lambda frames: predict_labels(model, frames, input_hw, dev, batch_size),
                       checkpoint_table(ckpt), input_hw, "checkpoint", lambda: None)


def _load_onnx(path: Path, device: str, batch_size: int) -> LoadedModel:
    """Through the node's own ONNX Runtime backend and pre/post-processing, so the score is the node's."""
    from unet_perception.backends.factory import BackendOptions, create_backend
    from unet_perception.pipeline import Segmenter

    options = BackendOptions(max_batch=batch_size, device="cpu" if device == "auto" else device)
    backend = create_backend("onnxruntime", path, options).activate()
    segmenter = Segmenter(backend, backend.info.classes)

    def predict(frames: list[np.ndarray]) -> list[np.ndarray]:
        return [s.labels for s in segmenter.run(frames)]

    return LoadedModel(predict, backend.info.classes, backend.input_hw, "onnx", backend.close)


def dataset_table(model_table: ClassTable, dataset: str | None) -> ClassTable:
    """The dataset's table (with its layout), checked against the classes the model predicts."""
    table = load_class_table(dataset or model_table.name)
    if table.names != model_table.names:
        raise ValueError(f"the model predicts {model_table.num_classes} classes of '{model_table.name}' "
                         f"{list(model_table.names)[:4]}..., but dataset '{table.name}' has "
                         f"{table.num_classes} {list(table.names)[:4]}...; pass the matching --dataset")
    return table


def iou_table_markdown(report: dict[str, Any]) -> str:
    """The per-class IoU table of a report in Markdown, for the model card."""
    total = sum(report["truth_pixels"].values()) or 1
    lines = ["| id | class | IoU | share of pixels |", "|---:|---|---:|---:|"]
    for i, (name, iou) in enumerate(report["per_class_iou"].items()):
        pixels = report["truth_pixels"][name]
        shown = "n/a" if iou is None or pixels == 0 else f"{iou:.3f}"
        lines.append(f"| {i} | {name} | {shown} | {pixels / total:.2%} |")
    lines.append(f"| | **mIoU** ({report['classes_present']} classes present) | **{report['mean_iou']:.3f}** | |")
    lines.append(f"| | pixel accuracy | {report['pixel_accuracy']:.3f} | |")
    return "\n".join(lines)


def plot_confusion(cm: np.ndarray, names: tuple[str, ...], path: Path, title: str) -> None:
    """Row-normalised confusion matrix (truth rows sum to 1) with class names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    n = len(names)
    size = max(6.0, 0.42 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90)
    ax.set_yticks(range(n), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title)
    if n <= 24:
        for r in range(n):
            for c in range(n):
                if norm[r, c] >= 0.005:
                    ax.text(c, r, f"{norm[r, c]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[r, c] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(images: list[np.ndarray], truths: list[np.ndarray], preds: list[np.ndarray],
                 table: ClassTable, path: Path) -> None:
    """One row per frame: input, truth, prediction, coloured with the class table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lut = table.palette()
    n = len(images)
    aspect = images[0].shape[0] / images[0].shape[1]
    fig, axes = plt.subplots(n, 3, figsize=(10, 10 / 3 * aspect * n + 0.5), squeeze=False)
    for row, (img, truth, pred) in enumerate(zip(images, truths, preds, strict=True)):
        for ax, picture, title in zip(axes[row], (img, lut[truth], lut[pred]),
                                      ("input", "truth", "prediction"), strict=True):
            ax.imshow(picture)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate(model_path: str | Path, data: str | Path, out: str | Path, *, dataset: str | None = None,
             split: str = "val", limit: int | None = None, samples: int = 4, device: str = "auto",
             batch_size: int = 4) -> dict[str, Any]:
    """Score ``model_path`` on a split, write the report and figures into ``out``; returns the report."""
    from unet_perception.training.data import SegmentationDataset
    from unet_perception.training.engine import confusion_on_frames

    out = Path(out)
    loaded = load_model(model_path, device, batch_size)
    try:
        table = dataset_table(loaded.table, dataset)
        frames = SegmentationDataset(data, table, split, limit=limit)
        start = time.perf_counter()
        cm = confusion_on_frames(loaded.predict, frames.images, frames.labels, table.num_classes,
                                 table.ignore_index, batch_size)
        seconds = time.perf_counter() - start
        # Spread over the split: neighbouring video frames would show the same scene N times.
        picks = np.linspace(0, len(frames) - 1, min(samples, len(frames))).round().astype(int).tolist()
        sample_preds = loaded.predict([frames.images[i] for i in picks]) if picks else []
    finally:
        loaded.close()
    report: dict[str, Any] = {
        "model": str(model_path), "model_kind": loaded.kind,
        "input_size": list(loaded.input_hw), "dataset": table.name, "data": str(data), "split": split,
        "frames": len(frames), "frame_size": list(frames.images[0].shape[:2]),
        **summarize(cm, table.names),
        "classes_present": int((cm.sum(1) > 0).sum()),
        "ignore_index": table.ignore_index,
        "confusion_matrix": cm.tolist(),
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3), "frames_per_s": round(len(frames) / seconds, 3) if seconds else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    plot_confusion(cm, table.names, out / "confusion.png",
                   f"{Path(model_path).name} on {table.name} {split} (mIoU {report['mean_iou']:.3f})")
    if picks:
        plot_samples([frames.images[i] for i in picks], [frames.labels[i] for i in picks], sample_preds, table,
                     out / "samples.png")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unet-evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="training checkpoint (.pt) or exported ONNX model (.onnx)")
    p.add_argument("--dataset", default=None,
                   help=f"class table / layout of the data: one of {available_tables()} or a table JSON "
                        "path (default: the model's own)")
    p.add_argument("--data", required=True, help="dataset root folder (e.g. ../shared/data/camvid)")
    p.add_argument("--split", default="val", help="split to score (default: val)")
    p.add_argument("--out", default="eval", help="folder for report.json, confusion.png, samples.png")
    p.add_argument("--limit", type=int, default=None, help="score only the first N frames")
    p.add_argument("--samples", type=int, default=4,
                   help="frames shown in samples.png, spread over the split (0: no figure)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda[:N] for a checkpoint; cpu | cuda | tensorrt (ONNX Runtime provider) "
                        "for an ONNX model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"--limit must be >= 1, got {args.limit}")
    if args.samples < 0 or args.batch_size < 1:
        raise SystemExit(f"--samples must be >= 0 and --batch-size >= 1, got {args.samples} and {args.batch_size}")
    try:
        report = evaluate(args.model, args.data, args.out, dataset=args.dataset, split=args.split,
                          limit=args.limit, samples=args.samples, device=args.device,
                          batch_size=args.batch_size)
    except (FileNotFoundError, ValueError, ModelError) as exc:
        print(f"unet-evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{report['model']} on {report['dataset']} {report['split']}: {report['frames']} frames at "
          f"{report['frame_size'][0]}x{report['frame_size'][1]}, model input "
          f"{report['input_size'][0]}x{report['input_size'][1]}, {report['frames_per_s']} frames/s\n")
    print(iou_table_markdown(report))
    print(f"\nwrote {Path(args.out) / 'report.json'}, confusion.png, samples.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
