"""Backend factory: explicit kinds, ``auto`` by device (cpu: ONNX Runtime, nothing else tried; cuda: TensorRT, then
ONNX Runtime's CUDA provider, never the CPU unasked) and its log line, and option validation."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from unet_perception.backends.base import BackendError
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.backends.onnxruntime import OnnxRuntimeBackend
from unet_perception.model_contract import ModelError, read_model_info


def tensorrt_usable(options: BackendOptions) -> bool:
    try:
        module = importlib.import_module("unet_perception.backends.tensorrt")
    except ImportError:
        return False
    return module.unavailable_reason(options) is None


def test_onnxruntime_by_name_from_a_path_or_model_info(tiny_model: Path) -> None:
    for model in (tiny_model, str(tiny_model), read_model_info(tiny_model)):
        with create_backend("onnxruntime", model) as backend:
            assert isinstance(backend, OnnxRuntimeBackend) and backend.max_batch == 4
            labels = backend.infer(np.zeros((2, 32, 48, 3), np.uint8)).labels
            assert labels.shape == (2, 32, 48) and labels.dtype == np.uint8


def test_auto_on_cpu_is_onnxruntime_on_cpu(tiny_model: Path) -> None:
    lines: list[str] = []
    backend = create_backend("auto", tiny_model, BackendOptions(max_batch=2), log=lines.append)
    try:
        assert isinstance(backend, OnnxRuntimeBackend) and backend.active and backend.max_batch == 2
        assert backend.device == "cpu" and lines == ["backend auto: using onnxruntime on cpu"]
    finally:
        backend.close()


def test_auto_on_cuda_without_a_gpu_backend_lists_every_reason(tiny_model: Path) -> None:
    options = BackendOptions(device="cuda")
    if tensorrt_usable(options):
        pytest.skip("TensorRT can run here")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here")
    with pytest.raises(BackendError, match=r"no backend can run on cuda here: tensorrt is not usable: .*; "
                                           r"onnxruntime is not usable: .*pip install onnxruntime-gpu.*; "
                                           "set device cpu to run on the CPU"):
        create_backend("auto", tiny_model, options, log=lambda line: None)


@pytest.mark.parametrize("kind, options, match", [
    ("tensorflow", BackendOptions(), r"backend must be one of \('auto', 'tensorrt', 'onnxruntime', 'torch'\)"),
    ("onnxruntime", BackendOptions(precision="fp8"), r"precision must be one of .*got 'fp8'"),
    ("onnxruntime", BackendOptions(device="tensorrt"), r"device must be one of \('cpu', 'cuda'\), got 'tensorrt'"),
    ("onnxruntime", BackendOptions(max_batch=0), "max_batch must be >= 1, got 0"),
    ("onnxruntime", BackendOptions(threads=-1), "threads must be >= 0, got -1"),
    ("onnxruntime", BackendOptions(spin_us=-1), "spin_us must be >= 0, got -1"),
    ("auto", BackendOptions(gpu_id=-1), "gpu_id must be >= 0, got -1"),
    ("tensorrt", BackendOptions(workspace_mb=8), "workspace_mb must be >= 16, got 8"),
])
def test_bad_kind_and_options_are_refused(tiny_model: Path, kind: str, options: BackendOptions,
                                          match: str) -> None:
    with pytest.raises(BackendError, match=match):
        create_backend(kind, tiny_model, options)


def test_missing_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        create_backend("onnxruntime", tmp_path / "nope.onnx")
