"""TensorRT runtime backend and CUDA helper parts that need no GPU: buffer and shape bookkeeping, the confidence
output, freeing on every failure path (through a fake ``tensorrt`` module and host-memory ``CudaApi``), CUDA
driver errors named (through a fake cuda-python runtime), availability and the ``auto`` choice.

The engine cache and the builder have their own files (test_tensorrt_cache.py, test_tensorrt_builder.py); the
real library path is test_tensorrt_integration.py (skipped without TensorRT and a GPU) and the API usage
test_typecheck.py (mypy against tensorrt-stubs).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fake_tensorrt import (CudaRtError, FakeBuilder, FakeEngine, HostCuda, fake_confidence, fake_cudart,
                           fake_labels, fake_tensorrt)

from unet_perception.backends import cuda_memory
from unet_perception.backends import tensorrt as trt_backend
from unet_perception.backends.base import BackendError
from unet_perception.backends.cuda_memory import CudaError, CudaPython, cuda_unavailable_reason
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.model_contract import read_model_info
from unet_perception.tools import build_engine


def tensorrt_installed() -> bool:
    spec = importlib.util.find_spec("tensorrt")
    if spec is None:
        return False
    import tensorrt

    return hasattr(tensorrt, "Builder")


absent_only = pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed here: the absence checks do not "
                                                              "apply (test_tensorrt_integration.py runs instead)")


@pytest.fixture
def fake_trt(tiny_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    cuda = HostCuda()
    info = read_model_info(tiny_model)
    engine = FakeEngine(cuda, info.input_hw, 4)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    options = BackendOptions(max_batch=4, device="cuda", precision="fp16", engine_cache_dir=str(tmp_path))
    backend = trt_backend.TensorRTBackend(info, options, cuda=cuda, builder=FakeBuilder(), log=lambda _: None)
    return types.SimpleNamespace(cuda=cuda, engine=engine, backend=backend, info=info, options=options)


def frames(n: int, hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def all_freed(cuda: HostCuda) -> bool:
    return cuda.memory == {} and cuda.pinned == [] and cuda.streams == set()


# --- runtime bookkeeping ---------------------------------------------------------------------------------------

def test_buffers_allocated_once_and_smaller_batches_reuse_them(fake_trt: Any) -> None:
    cuda, engine, backend = fake_trt.cuda, fake_trt.engine, fake_trt.backend
    h, w = fake_trt.info.input_hw
    with backend:
        allocations = (cuda.calls["alloc_device"], cuda.calls["alloc_pinned"], cuda.calls["create_stream"])
        assert allocations == (3, 3, 1) and backend.has_confidence
        context = engine.contexts[0]
        assert set(context.addresses) == {"image", "labels", "confidence"}
        assert sorted(cuda.memory[p].nbytes for p in context.addresses.values()) == [4 * h * w] * 2 + [4 * h * w * 3]
        for n, seed in ((4, 0), (2, 1), (2, 2), (1, 3), (4, 4)):
            batch = frames(n, (h, w), seed)
            pred = backend.infer(batch)
            assert pred.labels.shape == (n, h, w) and pred.labels.dtype == np.uint8
            np.testing.assert_array_equal(pred.labels, fake_labels(batch))
            assert pred.confidence is not None
            np.testing.assert_array_equal(pred.confidence, fake_confidence(batch))
        # the shape is set only when the batch size changes; addresses are set once, to the buffers made once
        assert context.input_shapes == [(4, h, w, 3), (2, h, w, 3), (1, h, w, 3), (4, h, w, 3)]
        assert (cuda.calls["alloc_device"], cuda.calls["alloc_pinned"], cuda.calls["create_stream"]) == allocations
        assert [c for c in cuda.copies if c[0] == "htod"][1] == ("htod", 2 * h * w * 3, "input 'image'")
        dtoh = [c for c in cuda.copies if c[0] == "dtoh"]
        assert dtoh[6:8] == [("dtoh", h * w, "output 'labels'"), ("dtoh", h * w, "output 'confidence'")]
        assert context.executions == 5 and cuda.calls["synchronize"] == 5
        assert backend.device == "cuda:0 (NVIDIA H100 80GB HBM3, fp16)"
    assert all_freed(cuda) and cuda.calls["free_device"] == 3 and cuda.calls["destroy_stream"] == 1


def test_engine_without_confidence_returns_none(fake_trt: Any) -> None:
    del fake_trt.engine.tensors["confidence"]
    h, w = fake_trt.info.input_hw
    with fake_trt.backend as backend:
        pred = backend.infer(frames(2, (h, w), 0))
        assert pred.confidence is None and not backend.has_confidence
        assert fake_trt.cuda.calls["alloc_pinned"] == 2


def test_extra_outputs_get_device_buffers_only(fake_trt: Any) -> None:
    h, w = fake_trt.info.input_hw
    fake_trt.engine.tensors["logits"] = ("OUTPUT", (-1, 12, h, w), "FLOAT")
    with fake_trt.backend as backend:
        backend.infer(frames(3, (h, w), 0))
        assert fake_trt.cuda.calls["alloc_device"] == 4 and fake_trt.cuda.calls["alloc_pinned"] == 3
        address = fake_trt.engine.contexts[0].addresses["logits"]
        assert fake_trt.cuda.memory[address].nbytes == 4 * 12 * h * w * 4


@pytest.mark.parametrize("tensor, change, match", [
    ("image", ("INPUT", None, "FLOAT"), "engine tensor 'image' is input float32"),
    ("labels", ("OUTPUT", (-1, 16, 16), "UINT8"), "engine tensor 'labels' is output uint8 \\[-1, 16, 16\\]"),
    ("confidence", ("OUTPUT", None, "FLOAT"), "engine tensor 'confidence' is output float32"),
    ("mask", ("INPUT", (-1, 8), "UINT8"), "extra input 'mask'"),
    ("logits", ("OUTPUT", (-1, 12, 16, 16), "BF16"), "engine tensor 'logits' is BF16, which NumPy has no type for"),
])
def test_contract_mismatch_is_a_clear_error(fake_trt: Any, tensor: str, change: tuple, match: str) -> None:
    old = fake_trt.engine.tensors.get(tensor, change)
    fake_trt.engine.tensors[tensor] = (change[0], change[1] or old[1], change[2])
    with pytest.raises(BackendError, match=match):
        fake_trt.backend.activate()
    assert all_freed(fake_trt.cuda)


def test_outputs_with_dynamic_height_and_width_are_refused_clearly(fake_trt: Any) -> None:
    """Real engines report -1 for dims computed in the graph (a Resize fed by a Shape chain)."""
    fake_trt.engine.tensors["labels"] = ("OUTPUT", (-1, -1, -1), "UINT8")
    with pytest.raises(BackendError, match=r"engine tensor 'labels' has dynamic non-batch dims \[-1, -1, -1\]; only "
                                           r"the batch axis may be dynamic.*unet-export"):
        fake_trt.backend.activate()
    assert all_freed(fake_trt.cuda)


def test_an_output_the_context_cannot_resolve_is_refused_clearly(fake_trt: Any) -> None:
    h, w = fake_trt.info.input_hw
    with fake_trt.backend as backend:
        fake_trt.engine.contexts[0].unresolved.add("confidence")
        with pytest.raises(BackendError, match=r"output 'confidence' has shape \[2, -1, -1\] for batch 2, expected "
                                               r"\[2, 32, 48\]; -1 means TensorRT could not compute"):
            backend.infer(frames(2, (h, w), 0))


@pytest.mark.parametrize("op, call", [("alloc_device", 1), ("alloc_device", 3), ("alloc_pinned", 1),
                                      ("alloc_pinned", 3), ("create_stream", 1)])
def test_every_allocation_failure_frees_what_was_allocated(fake_trt: Any, op: str, call: int) -> None:
    fake_trt.cuda.fail = {op: call}
    with pytest.raises(BackendError, match="planted"):
        fake_trt.backend.activate()
    assert all_freed(fake_trt.cuda) and not fake_trt.backend.active


def test_a_failing_free_does_not_stop_the_others(fake_trt: Any) -> None:
    fake_trt.backend.activate()
    fake_trt.cuda.fail = {"free_device": 1}
    with pytest.raises(BackendError, match="planted"):
        fake_trt.backend.close()
    cuda = fake_trt.cuda
    assert len(cuda.memory) == 0 and cuda.pinned == [] and cuda.streams == set()


def test_profile_smaller_than_max_batch_is_refused(fake_trt: Any) -> None:
    fake_trt.engine.max_batch = 2
    with pytest.raises(BackendError, match="profile allows batch up to 2, max_batch is 4"):
        fake_trt.backend.activate()


def test_failed_execute_names_the_batch(fake_trt: Any) -> None:
    h, w = fake_trt.info.input_hw
    with fake_trt.backend as backend:
        fake_trt.engine.contexts[0].execute_ok = False
        with pytest.raises(BackendError, match="execute_async_v3 failed for a batch of 2"):
            backend.infer(frames(2, (h, w), 0))


def test_undeserializable_engine_says_rebuild(fake_trt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(None))
    with pytest.raises(BackendError, match="could not deserialize engine .* built with TensorRT 10.13.0.35"
                                           ".*rebuild: unet-build-engine .* --precision fp16"):
        fake_trt.backend.activate()


def test_runtime_construction_failure_is_a_backend_error(fake_trt: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    trt = fake_tensorrt(fake_trt.engine)

    def no_runtime(logger: Any) -> None:
        logger.log(trt.ILogger.Severity.ERROR, "CUDA initialization failure with error: 35")  # type: ignore[attr-defined]
        raise TypeError("__init__(): incompatible constructor arguments")

    trt.Runtime = no_runtime  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(BackendError, match="could not create its Runtime.*error: 35"):
        fake_trt.backend.activate()
    assert all_freed(fake_trt.cuda)


def test_tensorrt_needs_device_cuda(tiny_model: Path) -> None:
    with pytest.raises(BackendError, match="runs on CUDA only; device is 'cpu'"):
        create_backend("tensorrt", tiny_model, BackendOptions())
    assert trt_backend.unavailable_reason(BackendOptions()) == "device is 'cpu' (TensorRT runs on cuda only)"


# --- CUDA errors are named, never "no GPU" ---------------------------------------------------------------------

def driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel: bool, library: bool) -> None:
    """Point the driver probe at a kernel-driver folder that exists or not, and a library that loads or not."""
    proc = tmp_path / "proc-driver-nvidia"
    if kernel:
        proc.mkdir(exist_ok=True)
    monkeypatch.setattr(cuda_memory, "DRIVER_PROC", (proc,))
    monkeypatch.setattr(cuda_memory, "LIBCUDA", "libc.so.6" if library else "libcuda-not-here.so.1")


def test_old_driver_is_named_not_no_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    driver(monkeypatch, tmp_path, kernel=True, library=True)
    cuda = CudaPython(fake_cudart(CudaRtError.cudaErrorInsufficientDriver))
    with pytest.raises(CudaError, match="cudaGetDeviceCount: cudaErrorInsufficientDriver \\(CUDA driver version is "
                                        "insufficient.*update the driver"):
        cuda.device_count()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart(CudaRtError.cudaErrorInsufficientDriver))
    reason = cuda_unavailable_reason()
    assert reason is not None and "cudaErrorInsufficientDriver" in reason and "no CUDA GPU" not in reason


@pytest.mark.parametrize("kernel, library, said", [
    (False, False, "no NVIDIA driver: libcuda-not-here.so.1 cannot be loaded and there is no .*; install the NVIDIA "
                   "driver"),
    (True, False, "kernel driver is loaded but its user-space library libcuda-not-here.so.1 cannot be loaded; in a "
                  "container run with --gpus all"),
    (False, True, "libc.so.6 is installed but no NVIDIA kernel driver is loaded")])
def test_a_missing_driver_is_not_told_to_update_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel: bool,
                                                    library: bool, said: str) -> None:
    """The CUDA runtime says cudaErrorInsufficientDriver when there is no driver at all, as for an old one."""
    driver(monkeypatch, tmp_path, kernel, library)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart(CudaRtError.cudaErrorInsufficientDriver))
    reason = cuda_unavailable_reason()
    assert reason is not None and re.search(said, reason), reason
    assert "update the driver" not in reason and "older than" not in reason
    for name in ("cuda.bindings.runtime", "cuda.cudart", "pycuda.driver"):  # no CUDA library either: both said
        monkeypatch.setitem(sys.modules, name, None)
    reason = cuda_unavailable_reason()
    assert reason is not None and reason.startswith("cuda-python/pycuda missing; and ") and re.search(said, reason)


def test_no_device_is_zero_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CudaPython(fake_cudart(CudaRtError.cudaErrorNoDevice)).device_count() == 0
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart(CudaRtError.cudaErrorNoDevice))
    reason = cuda_unavailable_reason()
    assert reason is not None and reason.startswith("no CUDA GPU")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart(count=2))
    assert cuda_unavailable_reason(1) is None and cuda_unavailable_reason(2) == "gpu_id 2 but only 2 CUDA GPU(s) " \
                                                                                 "visible"


def test_cuda_errors_name_the_operation() -> None:
    with pytest.raises(CudaError, match=r"cudaMalloc\(\d+ bytes\) for tensor 'image': cudaErrorMemoryAllocation"):
        CudaPython(fake_cudart()).alloc_device(1 << 41, "tensor 'image'")


def test_streams_do_not_wait_for_the_legacy_default_stream() -> None:
    """Each batch in flight gets a non-blocking stream: work another library (ONNX Runtime, torch) puts on the
    process's default stream must not hold it up."""
    assert CudaPython(fake_cudart()).create_stream() == 0x5000 + 1  # cudaStreamCreateWithFlags(NonBlocking)


def test_cuda_reason_without_cuda_libraries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    driver(monkeypatch, tmp_path, kernel=True, library=True)
    for name in ("cuda.bindings.runtime", "cuda.cudart", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    assert cuda_unavailable_reason() == "cuda-python/pycuda missing"


# --- availability, the CLI and the auto choice on this machine -------------------------------------------------

@absent_only
def test_unavailable_reason_here() -> None:
    reason = trt_backend.unavailable_reason(BackendOptions(device="cuda"))
    assert reason is not None and reason.startswith("tensorrt Python bindings not importable")


@absent_only
def test_cli_build_fails_clearly_without_tensorrt(tiny_model: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert build_engine.main([str(tiny_model), "--build-only", "--cache-dir", str(tmp_path)]) == 1
    assert "tensorrt Python bindings not importable" in capsys.readouterr().err


def test_cli_builds_and_runs_through_the_seams(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cuda = HostCuda()
    engine = FakeEngine(cuda, (32, 48), 2)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    monkeypatch.setattr("unet_perception.backends.tensorrt_builder.load_cuda", lambda: cuda)
    monkeypatch.setattr("unet_perception.backends.tensorrt.load_cuda", lambda: cuda)
    monkeypatch.setattr("unet_perception.backends.tensorrt_builder.build_serialized_engine", FakeBuilder())
    assert build_engine.main([str(tiny_model), "--max-batch", "2", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "test inference on cuda:0 (NVIDIA H100 80GB HBM3, fp32): batch 2 -> labels [2, 32, 48], " \
           "confidence [2, 32, 48]" in out
    assert out[-1].endswith(".engine") and Path(out[-1]).is_file() and all_freed(cuda)


def test_auto_on_cpu_never_tries_cuda(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_backend, "unavailable_reason", lambda options: pytest.fail("auto tried TensorRT"))
    logs: list[str] = []
    backend = create_backend("auto", tiny_model, BackendOptions(max_batch=2), log=logs.append)
    try:
        assert backend.name == "onnxruntime" and backend.device == "cpu"
        assert logs == ["backend auto: using onnxruntime on cpu"]
    finally:
        backend.close()


def test_auto_on_cuda_falls_back_when_the_engine_build_fails(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    def failing_create(info: Any, options: BackendOptions) -> trt_backend.TensorRTBackend:
        return trt_backend.TensorRTBackend(info, options, cuda=HostCuda(), builder=FakeBuilder(fail=True))

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(None))
    monkeypatch.setattr(trt_backend, "unavailable_reason", lambda options: None)
    monkeypatch.setattr(trt_backend, "create", failing_create)
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here, so auto starts it after TensorRT (no error to check)")
    with pytest.raises(BackendError, match="no backend can run on cuda here: tensorrt is not usable: failed to start "
                                           r"\(BackendError: TensorRT failed to build\); onnxruntime is not usable: "
                                           ".*onnxruntime-gpu.*; set device cpu"):
        create_backend("auto", tiny_model, BackendOptions(max_batch=2, device="cuda",
                                                          engine_cache_dir=str(tmp_path)))
