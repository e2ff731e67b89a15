"""Metric functions against confusion matrices worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from unet_perception.metrics import (
    confusion_matrix,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
    summarize,
)

# 3 classes + void (id 3). Rows are truth, columns prediction.
TRUTH = np.array([[0, 0, 1, 1],
                      [2, 2, 3, 3]])
PRED = np.array([[0, 1, 1, 1],
                     [2, 0, 0, 2]])


def test_confusion_matrix_counts_truth_rows_and_prediction_columns() -> None:
    cm = confusion_matrix(TRUTH, PRED, num_classes=3, ignore_index=3)
    # truth 0: pred 0, 1; truth 1: pred 1, 1; truth 2: pred 2, 0; the two void pixels are dropped.
    assert cm.tolist() == [[1, 1, 0],
                           [0, 2, 0],
                           [1, 0, 1]]
    assert cm.dtype == np.int64


def test_out_of_range_truth_is_dropped_without_ignore_index() -> None:
    cm = confusion_matrix(TRUTH, PRED, num_classes=3)
    assert int(cm.sum()) == 6


def test_predictions_beyond_the_classes_count_in_the_last_column() -> None:
    cm = confusion_matrix(np.array([0, 1]), np.array([7, 1]), num_classes=2)
    assert cm.tolist() == [[0, 1], [0, 1]]


def test_iou_pixel_accuracy_and_miou_by_hand() -> None:
    cm = np.array([[1, 1, 0],
                   [0, 2, 0],
                   [1, 0, 1]])
    # IoU = tp / (row + column - tp): 1/(2+2-1), 2/(2+3-2), 1/(2+1-1)
    np.testing.assert_allclose(iou_per_class(cm), [1 / 3, 2 / 3, 1 / 2])
    assert pixel_accuracy(cm) == pytest.approx(4 / 6)
    assert mean_iou(cm) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_class_absent_from_truth_and_prediction_is_nan_and_not_averaged() -> None:
    cm = np.array([[3, 1, 0],
                   [0, 4, 0],
                   [0, 0, 0]])
    iou = iou_per_class(cm)
    np.testing.assert_allclose(iou[:2], [3 / 4, 4 / 5])
    assert math.isnan(iou[2])
    assert mean_iou(cm) == pytest.approx((3 / 4 + 4 / 5) / 2)


def test_class_only_predicted_has_zero_iou_but_is_not_in_miou() -> None:
    # Class 2 never in the truth but predicted once: IoU 0, yet mIoU averages classes present in truth.
    cm = np.array([[3, 0, 1],
                   [0, 4, 0],
                   [0, 0, 0]])
    assert iou_per_class(cm)[2] == 0.0
    assert mean_iou(cm) == pytest.approx((3 / 4 + 4 / 4) / 2)


def test_class_present_but_never_predicted_counts_as_zero() -> None:
    cm = np.array([[2, 0],
                   [2, 0]])
    np.testing.assert_allclose(iou_per_class(cm), [0.5, 0.0])
    assert mean_iou(cm) == pytest.approx(0.25)


def test_empty_matrix_gives_nan_not_an_error() -> None:
    cm = np.zeros((3, 3), dtype=np.int64)
    assert math.isnan(mean_iou(cm)) and math.isnan(pixel_accuracy(cm))


def test_summarize_is_json_ready_with_null_for_undefined_iou() -> None:
    cm = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    report = summarize(cm, ["a", "b", "c"])
    assert report["per_class_iou"] == {"a": 0.75, "b": 0.8, "c": None}
    assert report["truth_pixels"] == {"a": 4, "b": 4, "c": 0}
    assert report["pixel_accuracy"] == pytest.approx(7 / 8)
    assert report["mean_iou"] == pytest.approx(0.775)


def test_an_ignore_id_inside_the_class_range_is_dropped() -> None:
    # CARLA's class 0 "Unlabeled" is both a valid id and the ignore id: its pixels must not count.
    truth = np.array([0, 0, 1, 2])
    pred = np.array([1, 2, 1, 2])
    cm = confusion_matrix(truth, pred, num_classes=3, ignore_index=0)
    assert cm.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert mean_iou(cm) == pytest.approx(1.0)
