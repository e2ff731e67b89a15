"""Real TensorRT: build an engine from the tiny contract model, check labels against ONNX Runtime and the cache.

Runs when the TensorRT Python bindings, cuda-python (or pycuda) and a CUDA GPU are all present; skips with
the reason otherwise (on the CPU-only dev machine: "tensorrt Python bindings not importable").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unet_perception.backends import tensorrt as trt_backend
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.model_contract import read_model_info

REASON = trt_backend.unavailable_reason(BackendOptions())
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu,
              pytest.mark.skipif(REASON is not None, reason=f"TensorRT backend unavailable: {REASON}")]


@pytest.mark.parametrize("precision, min_agreement", [("fp32", 0.999), ("fp16", 0.98)])
def test_engine_labels_match_onnxruntime(tiny_model: Path, tmp_path: Path, precision: str,
                                         min_agreement: float) -> None:
    options = BackendOptions(max_batch=4, precision=precision, engine_cache_dir=str(tmp_path), workspace_mb=256)
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    logs: list[str] = []
    with trt_backend.TensorRTBackend(read_model_info(tiny_model), options,
                                     log=logs.append) as engine_backend, \
            create_backend("onnxruntime", tiny_model, BackendOptions(max_batch=4)) as ort_backend:
        want = ort_backend.infer(frames).labels
        for n in (4, 1, 3):  # smaller batches reuse the max_batch buffers
            got = engine_backend.infer(frames[:n]).labels
            assert got.shape == (n, 32, 48) and got.dtype == np.uint8
            assert (got == want[:n]).mean() >= min_agreement
    assert any("building a" in line for line in logs)
    assert len(list(tmp_path.glob("*.engine"))) == 1 and len(list(tmp_path.glob("timing-*.cache"))) == 1

    logs.clear()  # a second backend loads the cached engine instead of building
    with trt_backend.TensorRTBackend(read_model_info(tiny_model), options,
                                     log=logs.append) as again:
        np.testing.assert_array_equal(again.infer(frames[:2]).labels, engine_backend.infer(frames[:2]).labels)
    assert any("using cached engine" in line for line in logs) and not any("building" in line for line in logs)


def test_int8_engine_with_calibration_cache(tiny_model: Path, tmp_path: Path) -> None:
    import cv2

    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        cv2.imwrite(str(frames_dir / f"{i}.png"), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    options = BackendOptions(max_batch=2, precision="int8", engine_cache_dir=str(tmp_path / "cache"),
                             calibration_data=str(frames_dir), workspace_mb=256)
    with trt_backend.TensorRTBackend(read_model_info(tiny_model), options) as backend:
        labels = backend.infer(rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)).labels
    assert labels.shape == (2, 32, 48)
    assert len(list((tmp_path / "cache").glob("calib-*.cache"))) == 1


def test_auto_picks_tensorrt(tiny_model: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    backend = create_backend("auto", tiny_model, BackendOptions(max_batch=2, engine_cache_dir=str(tmp_path)),
                             log=logs.append)
    try:
        assert backend.name == "tensorrt" and logs == ["backend auto: using tensorrt"]
    finally:
        backend.close()
