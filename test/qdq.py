"""Int8 Q/DQ twins of test models: through ``unet-quantize``'s own ``quantize`` (the kind TensorRT builds:
symmetric int8, zero point 0, float biases) and, for the rule checks, with ONNX Runtime's default quantization
(asymmetric activations, int32 biases: the kind TensorRT refuses). Calibrated on random frames."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from unet_perception.model_contract import INPUT_NAME, read_model_info


def random_frames(src: Path, count: int) -> list[np.ndarray]:
    h, w = read_model_info(src).input_hw
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(count)]


def make_qdq_model(src: Path, dst: Path, *, tensorrt_kind: bool = True, frames: int = 4) -> Path:
    """Quantize ``src`` statically to Q/DQ at ``dst``."""
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing on every call
    if tensorrt_kind:
        from unet_perception.training.quantize import quantize

        return quantize(src, dst, random_frames(src, frames))
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: f[None]} for f in random_frames(src, frames)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Frames(), quant_format=QuantFormat.QDQ)
    return dst
