"""Independent references for what the node and the pipeline output, written here with cv2, NumPy, onnx and
ONNX Runtime directly: no unet_perception pipeline, backend, codec or class table, so a bug there (a colour
order swapped, a nearest resize instead of a bilinear one) cannot hide in the reference as well.

The contract they follow is the documented one (docs/models.md "The model contract", model_contract's
docstring): RGB frames resized bilinearly to the model input, uint8 NHWC into input ``image``, ``labels`` (and
``confidence``) out, resized back to the frame's size by nearest neighbour; colours from the ``classes`` metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class Expected:
    labels: np.ndarray
    confidence: np.ndarray | None


def model_table(model: Path | str) -> tuple[tuple[int, int], np.ndarray]:
    """(input height, width) and the 256x3 palette, read from the file's metadata with onnx and json."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    palette = np.zeros((256, 3), np.uint8)
    for entry in json.loads(meta["classes"]):
        palette[entry["id"]] = entry["color"]
    return (int(meta["input_height"]), int(meta["input_width"])), palette


def resize_to_model(frame: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    h, w = input_hw
    return frame if frame.shape[:2] == (h, w) else cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)


def back_to_frame(small: np.ndarray, frame_hw: tuple[int, ...]) -> np.ndarray:
    if small.shape == tuple(frame_hw):
        return small
    return cv2.resize(small, (frame_hw[1], frame_hw[0]), interpolation=cv2.INTER_NEAREST)


class Reference:
    """``run(rgb_frames) -> [Expected]`` at each frame's size, and ``palette``, for one ONNX model file."""

    def __init__(self, model: Path | str) -> None:
        import onnxruntime as ort

        self.input_hw, self.palette = model_table(model)
        self.session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, frames: list[np.ndarray]) -> list[Expected]:
        out = []
        for frame in frames:
            assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
            results: dict[str, Any] = dict(zip(self.outputs, self.session.run(
                None, {"image": resize_to_model(frame, self.input_hw)[None]}), strict=True))
            confidence = results.get("confidence")
            out.append(Expected(back_to_frame(results["labels"][0], frame.shape[:2]),
                                None if confidence is None else back_to_frame(confidence[0], frame.shape[:2])))
        return out

    def color(self, labels: np.ndarray) -> np.ndarray:
        return self.palette[labels]

