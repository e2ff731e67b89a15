"""Segmentation metrics from a confusion matrix (rows = truth, columns = prediction)."""

from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(truth: torch.Tensor, pred: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """Accumulate a [C, C] int64 confusion matrix with ``torch.bincount``; ignored and out-of-range
    truth pixels are dropped."""
    truth = truth.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = (truth >= 0) & (truth < num_classes)
    if ignore_index is not None:
        keep &= truth != ignore_index
    idx = truth[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU of each class; NaN where the class is neither in the truth nor predicted."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray | torch.Tensor) -> float:
    """Mean IoU over the classes present in the truth (classes absent from it are not averaged)."""
    cm = np.asarray(cm, dtype=np.float64)
    present = cm.sum(1) > 0
    if not present.any():
        return float("nan")
    return float(np.nanmean(iou_per_class(cm)[present]))


def pixel_accuracy(cm: np.ndarray | torch.Tensor) -> float:
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def summarize(cm: np.ndarray | torch.Tensor, names: list[str] | tuple[str, ...]) -> dict:
    """A JSON-ready report: pixel accuracy, mIoU and per-class IoU (null where undefined)."""
    cm = np.asarray(cm)
    ious = iou_per_class(cm)
    return {
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_iou": mean_iou(cm),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, ious)},
        "truth_pixels": {n: int(v) for n, v in zip(names, cm.sum(1))},
    }
