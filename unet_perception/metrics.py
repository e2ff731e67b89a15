"""Segmentation metrics from a confusion matrix (rows = truth, columns = prediction).

NumPy only: training, evaluation and the runtime's demo all score with these.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int,
                     ignore_index: int | None = None) -> np.ndarray:
    """A [C, C] int64 confusion matrix; ignored and out-of-range truth pixels are dropped, predictions
    beyond the classes are clipped into the last column (argmax never makes them; to score the unknown label
    255 as a miss, pass C + 1 classes with it mapped to C, as ``tools.demo.score`` does)."""
    truth = np.asarray(truth).reshape(-1).astype(np.int64)
    pred = np.asarray(pred).reshape(-1).astype(np.int64)
    keep = (truth >= 0) & (truth < num_classes)
    if ignore_index is not None:
        keep &= truth != ignore_index
    idx = truth[keep] * num_classes + np.clip(pred[keep], 0, num_classes - 1)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN where the class is neither in the truth nor predicted."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes present in the truth (classes absent from it are not averaged)."""
    cm = np.asarray(cm, dtype=np.float64)
    present = cm.sum(1) > 0
    if not present.any():
        return float("nan")
    return float(np.nanmean(iou_per_class(cm)[present]))


def pixel_accuracy(cm: np.ndarray) -> float:
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def summarize(cm: np.ndarray, names: list[str] | tuple[str, ...]) -> dict:
    """A JSON-ready report: pixel accuracy, mIoU and per-class IoU (null where undefined)."""
    cm = np.asarray(cm)
    ious = iou_per_class(cm)
    return {
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_iou": mean_iou(cm),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, ious)},
        "truth_pixels": {n: int(v) for n, v in zip(names, cm.sum(1))},
    }
