"""Real TensorRT: build strongly typed engines (fp32, fp16, int8 Q/DQ) from the tiny contract model, check labels
and confidence against ONNX Runtime on the CPU, and the engine cache.

Runs where the TensorRT Python bindings, cuda-python (or pycuda) and a CUDA GPU are present. Skips with the reason
where something is missing, except that a GPU the kernel shows but CUDA cannot use (a driver too old for the
wheels, a broken install) is a failure, never a skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qdq import make_qdq_model

from unet_perception.backends import tensorrt as trt_backend
from unet_perception.backends.cuda_memory import gpu_visible
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.model_contract import read_model_info

REASON = trt_backend.unavailable_reason(BackendOptions(device="cuda"))
BROKEN = REASON is not None and gpu_visible() and "not importable" not in REASON and "missing" not in REASON
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu,
              pytest.mark.skipif(REASON is not None and not BROKEN, reason=f"TensorRT backend unavailable: {REASON}")]


def test_cuda_works_where_a_gpu_is_visible() -> None:
    assert not BROKEN, f"a GPU is visible but the TensorRT backend cannot use it: {REASON}"


@pytest.mark.parametrize("precision, min_agreement", [("fp32", 0.999), ("fp16", 0.98), ("int8", 0.9)])
def test_engine_labels_match_onnxruntime(tiny_model: Path, tmp_path: Path, precision: str,
                                         min_agreement: float) -> None:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_model.read_bytes())
    if precision == "int8":
        make_qdq_model(model, tmp_path / "tiny_int8.onnx")
    cache = tmp_path / "cache"
    options = BackendOptions(max_batch=4, device="cuda", precision=precision, engine_cache_dir=str(cache),
                             workspace_mb=256)
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    logs: list[str] = []
    reference = BackendOptions(max_batch=4, precision=precision, engine_cache_dir=str(cache))  # same file, ORT CPU
    with trt_backend.TensorRTBackend(read_model_info(model), options, log=logs.append) as engine_backend, \
            create_backend("onnxruntime", model, reference) as ort_backend:
        want = ort_backend.infer(frames)
        for n in (4, 1, 3):  # smaller batches reuse the max_batch buffers
            got = engine_backend.infer(frames[:n])
            assert got.labels.shape == (n, 32, 48) and got.labels.dtype == np.uint8
            assert (got.labels == want.labels[:n]).mean() >= min_agreement
            assert got.confidence is not None and want.confidence is not None
            assert np.abs(got.confidence.astype(int) - want.confidence[:n]).mean() <= 4
    assert any("building a" in line for line in logs)
    assert len(list(cache.glob("*.engine"))) == 1 and len(list(cache.glob("timing-*.cache"))) == 1

    logs.clear()  # a second backend loads the cached engine instead of building
    with trt_backend.TensorRTBackend(read_model_info(model), options, log=logs.append) as again:
        np.testing.assert_array_equal(again.infer(frames[:2]).labels, engine_backend.infer(frames[:2]).labels)
    assert any("using cached engine" in line for line in logs) and not any("building" in line for line in logs)


def test_auto_on_cuda_picks_tensorrt(tiny_model: Path, tmp_path: Path) -> None:
    logs: list[str] = []
    backend = create_backend("auto", tiny_model, BackendOptions(max_batch=2, device="cuda",
                                                                engine_cache_dir=str(tmp_path)), log=logs.append)
    try:
        assert backend.name == "tensorrt" and "backend auto: using tensorrt on cuda" in logs
    finally:
        backend.close()
