"""Frames in, label maps and coloured images out: everything between the codec and the publishers.

No ROS here, so the whole path is testable and benchmarkable on its own. The resize choices (bilinear
down to the model input, nearest back up to the camera size) are the ones ``training.engine.predict_labels``
uses, so the runtime reproduces the evaluated accuracy. Confidence is upscaled the same way, so it stays
aligned with the labels pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from unet_perception.backends.base import Backend, Pending, Prediction
from unet_perception.class_table import ClassTable
from unet_perception.model_contract import UNKNOWN_LABEL


def _check_frame(frame: np.ndarray, index: int) -> None:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame {index} must be a uint8 [H, W, 3] RGB array (decode it with "
                         f"unet_perception.codec), got {frame.dtype} {list(frame.shape)}")


def preprocess(frames: Sequence[np.ndarray], input_hw: tuple[int, int]) -> np.ndarray:
    """RGB frames of any sizes -> uint8 [N, H, W, 3] at ``input_hw`` (bilinear, as in training)."""
    if not frames:
        raise ValueError("preprocess needs at least one frame")
    h, w = input_hw
    batch = np.empty((len(frames), h, w, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        _check_frame(frame, i)
        if frame.shape[:2] == (h, w):
            batch[i] = frame
        else:
            cv2.resize(frame, (w, h), dst=batch[i], interpolation=cv2.INTER_LINEAR)
    return batch


def upscale_labels(labels: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Class ids [h, w] -> [H, W] by nearest neighbour (never blends ids), as in training."""
    if labels.shape == tuple(out_hw):
        return labels
    return cv2.resize(labels, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_NEAREST)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class ids [H, W] -> RGB [H, W, 3] through a 256x3 uint8 palette (``ClassTable.palette()``)."""
    if palette.shape != (256, 3) or palette.dtype != np.uint8:
        raise ValueError(f"palette must be uint8 [256, 3], got {palette.dtype} {list(palette.shape)}")
    return np.take(palette, labels, axis=0)


# What the node publishes and the bag tool writes per camera, in this order; each output's ROS encoding is fixed
# except the overlay's, which follows the input's colour order (codec.overlay_encoding).
OUTPUT_KINDS = ("labels", "confidence", "color", "overlay")


def check_alpha(alpha: float) -> float:
    """``alpha`` when it is a usable overlay weight (0..1), else ValueError; call it before any work."""
    if not 0.0 <= alpha <= 1.0:  # also false for NaN
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    return alpha


def blend(image: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * image + alpha * color``, rounded, uint8; both arrays [H, W, 3]."""
    check_alpha(alpha)
    if image.shape != color.shape:
        raise ValueError(f"cannot blend image {list(image.shape)} with colour labels {list(color.shape)}")
    return cv2.addWeighted(image, 1.0 - alpha, color, alpha, 0.0)


@dataclass(frozen=True)
class Segmentation:
    """One frame's result at the frame's own size."""

    labels: np.ndarray                 # uint8 [H, W] class ids, UNKNOWN_LABEL under the unknown threshold
    confidence: np.ndarray | None      # uint8 [H, W] or None when the model has no confidence output


@dataclass(frozen=True)
class Rendered:
    """The coloured outputs of one frame; None where not asked for."""

    color: np.ndarray | None
    overlay: np.ndarray | None


class Segmenter:
    """A backend plus the class table: ``run(frames) -> [Segmentation]`` at each frame's own size.

    ``unknown_threshold`` (0-255, 0 = off): pixels whose confidence is below it get label UNKNOWN_LABEL (255).
    """

    def __init__(self, backend: Backend, classes: ClassTable, unknown_threshold: int = 0) -> None:
        if not 0 <= unknown_threshold <= 255:
            raise ValueError(f"unknown_threshold must be 0..255, got {unknown_threshold}")
        self.backend = backend
        self.classes = classes
        self.palette = classes.palette()
        self.unknown_threshold = unknown_threshold

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.backend.input_hw

    def run(self, frames: Sequence[np.ndarray]) -> list[Segmentation]:
        """Labels (and confidence) for RGB frames of any count and sizes, in order.

        Raises ValueError when the model emits a class id outside its class table: such labels could be
        neither coloured nor named, so they are never published.
        """
        out: list[Segmentation] = []
        for chunk in self.chunks(frames):
            out += self.finish(chunk, self.predict(self.prepare(chunk)))
        return out

    # The three steps of ``run``, for callers that overlap them (the node runs each in its own thread).
    def chunks(self, frames: Sequence[np.ndarray]) -> list[Sequence[np.ndarray]]:
        """``frames`` in backend batches of at most ``max_batch``."""
        step = self.backend.max_batch
        return [frames[start:start + step] for start in range(0, len(frames), step)]

    def prepare(self, chunk: Sequence[np.ndarray]) -> np.ndarray:
        """One chunk -> the model's input batch (the one copy of the pixels, resized on the way)."""
        return preprocess(chunk, self.input_hw)

    def predict(self, batch: np.ndarray) -> Prediction:
        """The backend's labels (and confidence) at the model's size; ValueError for ids outside the table."""
        return self.collect(self.backend.submit(batch))

    def collect(self, pending: Pending) -> Prediction:
        """``predict`` in two steps: ``backend.submit(batch)``, then this (the node overlaps what lies between)."""
        pred = pending.result()
        top = int(pred.labels.max())
        n = self.classes.num_classes
        if top >= n:
            raise ValueError(f"the model emitted class id {top} but has {n} classes (0..{n - 1}); "
                             "its output does not match its metadata")
        return pred

    def finish(self, chunk: Sequence[np.ndarray], pred: Prediction) -> list[Segmentation]:
        """The unknown threshold, then labels and confidence at each frame's own size."""
        out: list[Segmentation] = []
        for i, frame in enumerate(chunk):
            labels = pred.labels[i]
            confidence = None if pred.confidence is None else pred.confidence[i]
            if confidence is not None and self.unknown_threshold > 0:
                labels = np.where(confidence < self.unknown_threshold, np.uint8(UNKNOWN_LABEL), labels)
            labels = upscale_labels(labels, frame.shape[:2])
            if confidence is not None:
                confidence = upscale_labels(confidence, frame.shape[:2])
            out.append(Segmentation(labels, confidence))
        return out

    def outputs(self, frame: np.ndarray, labels: np.ndarray, *, color: bool = True, overlay: bool = True,
                alpha: float = 0.5, overlay_bgr: bool = False) -> Rendered:
        """Colour labels (RGB) and/or the frame blended with them (RGB, or BGR when ``overlay_bgr``)."""
        if not (color or overlay):
            return Rendered(None, None)
        colored = colorize(labels, self.palette)
        blended = None
        if overlay:
            blended = blend(frame, colored, alpha)
            if overlay_bgr:
                blended = cv2.cvtColor(blended, cv2.COLOR_RGB2BGR)
        return Rendered(colored if color else None, blended)

    def render(self, frame: np.ndarray, seg: Segmentation, kinds: Collection[str], *, alpha: float = 0.5,
               overlay_encoding: str = "rgb8") -> dict[str, tuple[np.ndarray, str]]:
        """Every wanted output of one frame as ``{kind: (array, ROS encoding)}``, in ``OUTPUT_KINDS`` order.

        The one render step of the node and the bag tool: ``labels`` (mono8), ``confidence`` (mono8; left out
        when the model has no confidence output), ``color`` (rgb8) and ``overlay`` (``overlay_encoding``: rgb8,
        or bgr8 for a BGR camera). Only what is asked for is computed.
        """
        unknown = set(kinds) - set(OUTPUT_KINDS)
        if unknown:
            raise ValueError(f"unknown output kinds {sorted(unknown)}; known: {', '.join(OUTPUT_KINDS)}")
        if overlay_encoding not in ("rgb8", "bgr8"):
            raise ValueError(f"overlay_encoding must be rgb8 or bgr8, got '{overlay_encoding}'")
        rendered = self.outputs(frame, seg.labels, color="color" in kinds, overlay="overlay" in kinds, alpha=alpha,
                                overlay_bgr=overlay_encoding == "bgr8")
        arrays = {"labels": (seg.labels, "mono8"), "confidence": (seg.confidence, "mono8"),
                  "color": (rendered.color, "rgb8"), "overlay": (rendered.overlay, overlay_encoding)}
        return {kind: (array, enc) for kind, (array, enc) in arrays.items() if kind in kinds and array is not None}
