"""Segmenter.render: the one render step of the node and the bag tool (kinds, encodings, confidence)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from unet_perception.class_table import load_class_table
from unet_perception.pipeline import OUTPUT_KINDS, Segmentation, Segmenter, check_alpha, colorize

RNG = np.random.default_rng(2)
FRAME = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
LABELS = RNG.integers(0, 11, (6, 8), dtype=np.uint8)
CONFIDENCE = RNG.integers(0, 256, (6, 8), dtype=np.uint8)


@pytest.fixture
def segmenter() -> Segmenter:
    class NoBackend:  # render never touches the backend
        input_hw = (4, 4)
        max_batch = 1

    return Segmenter(NoBackend(), load_class_table("camvid"))  # type: ignore[arg-type]


def test_every_kind_with_its_encoding(segmenter: Segmenter) -> None:
    out = segmenter.render(FRAME, Segmentation(LABELS, CONFIDENCE), OUTPUT_KINDS, alpha=0.25,
                           overlay_encoding="bgr8")
    assert list(out) == list(OUTPUT_KINDS)
    assert {k: enc for k, (_, enc) in out.items()} == {"labels": "mono8", "confidence": "mono8", "color": "rgb8",
                                                       "overlay": "bgr8"}
    color = colorize(LABELS, segmenter.palette)
    np.testing.assert_array_equal(out["labels"][0], LABELS)
    np.testing.assert_array_equal(out["confidence"][0], CONFIDENCE)
    np.testing.assert_array_equal(out["color"][0], color)
    rgb_overlay = cv2.addWeighted(FRAME, 0.75, color, 0.25, 0.0)
    np.testing.assert_array_equal(out["overlay"][0], rgb_overlay[:, :, ::-1])


def test_only_what_is_asked_and_no_confidence_without_one(segmenter: Segmenter) -> None:
    out = segmenter.render(FRAME, Segmentation(LABELS, None), {"labels", "confidence"})
    assert list(out) == ["labels"]
    assert segmenter.render(FRAME, Segmentation(LABELS, None), ()) == {}


@pytest.mark.parametrize("kwargs, match", [
    ({"kinds": ["labels", "depth"]}, r"unknown output kinds \['depth'\]"),
    ({"kinds": ["overlay"], "overlay_encoding": "mono8"}, "overlay_encoding must be rgb8 or bgr8"),
    ({"kinds": ["overlay"], "alpha": 2.0}, r"alpha must be in \[0, 1\], got 2.0"),
])
def test_refusals(segmenter: Segmenter, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        segmenter.render(FRAME, Segmentation(LABELS, None), **kwargs)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_check_alpha(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha must be in"):
        check_alpha(alpha)
    assert check_alpha(0.0) == 0.0 and check_alpha(1.0) == 1.0
