"""TensorRT backend parts that need no GPU: cache key and rebuild decisions, calibration batching, buffer and
shape bookkeeping (through a fake ``tensorrt`` module and a host-memory ``CudaApi``), the auto fallback chain.

The real library path is covered by test_tensorrt_integration.py (skipped without TensorRT and a GPU) and the
API usage by test_typecheck.py (mypy against tensorrt-stubs).
"""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from unet_perception.backends import tensorrt as trt_backend
from unet_perception.backends import tensorrt_build as tb
from unet_perception.backends.base import BackendError
from unet_perception.backends.cuda_memory import CudaApi, cuda_unavailable_reason
from unet_perception.backends.factory import BackendOptions, create_backend
from unet_perception.model_contract import read_model_info

KEY_ARGS = dict(input_hw=(32, 48), precision="fp16", max_batch=4, gpu_name="NVIDIA H100 80GB HBM3",
                compute_capability=(9, 0), tensorrt_version="10.13.0.35")


# --- cache key and rebuild decisions -----------------------------------------------------------------------

def test_key_changes_with_every_field(tiny_model: Path, tmp_path: Path) -> None:
    base = tb.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    assert base == tb.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    assert base.profile == ((1, 32, 48, 3), (4, 32, 48, 3), (4, 32, 48, 3))
    other_onnx = tmp_path / "other.onnx"
    other_onnx.write_bytes(tiny_model.read_bytes() + b"\0")
    variants = {
        "onnx_sha256": tb.make_key(other_onnx, **KEY_ARGS),  # type: ignore[arg-type]
        "gpu_name": tb.make_key(tiny_model, **{**KEY_ARGS, "gpu_name": "NVIDIA GeForce RTX 5090"}),  # type: ignore[arg-type]
        "compute_capability": tb.make_key(tiny_model, **{**KEY_ARGS, "compute_capability": (12, 0)}),  # type: ignore[arg-type]
        "tensorrt_version": tb.make_key(tiny_model, **{**KEY_ARGS, "tensorrt_version": "10.0.1.6"}),  # type: ignore[arg-type]
        "precision": tb.make_key(tiny_model, **{**KEY_ARGS, "precision": "int8"}),  # type: ignore[arg-type]
        "profile": tb.make_key(tiny_model, **{**KEY_ARGS, "max_batch": 2}),  # type: ignore[arg-type]
    }
    digests = {base.digest} | {key.digest for key in variants.values()}
    assert len(digests) == 1 + len(variants)
    for field, key in variants.items():
        changed = [k for k, v in key.fields().items() if v != base.fields()[k]]
        assert changed == [field]


def test_key_rejects_unknown_precision(tiny_model: Path) -> None:
    with pytest.raises(BackendError, match="precision must be one of"):
        tb.make_key(tiny_model, **{**KEY_ARGS, "precision": "fp8"})  # type: ignore[arg-type]


def test_plan_builds_then_loads_and_says_what_changed(tiny_model: Path, tmp_path: Path) -> None:
    key = tb.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    plan = tb.plan_engine(tmp_path, key)
    assert (plan.action, plan.engine.name) == ("build", f"{key.digest}.engine")
    assert "no cached engine" in plan.reason
    tb.store_engine(plan, key, b"engine-bytes", 1.0)
    assert tb.plan_engine(tmp_path, key).action == "load"
    assert json.loads(plan.sidecar.read_text())["tensorrt_version"] == "10.13.0.35"
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind

    upgraded = replace(key, tensorrt_version="10.14.1.0")
    plan2 = tb.plan_engine(tmp_path, upgraded)
    assert plan2.action == "build" and plan2.engine != plan.engine
    assert "tensorrt_version '10.13.0.35' -> '10.14.1.0'" in plan2.reason


def test_plan_never_loads_an_engine_whose_sidecar_disagrees(tiny_model: Path, tmp_path: Path) -> None:
    key = tb.make_key(tiny_model, **KEY_ARGS)  # type: ignore[arg-type]
    plan = tb.plan_engine(tmp_path, key)
    tb.store_engine(plan, key, b"engine-bytes", 1.0)
    sidecar = json.loads(plan.sidecar.read_text())
    plan.sidecar.write_text(json.dumps({**sidecar, "precision": "fp32"}))
    tampered = tb.plan_engine(tmp_path, key)
    assert tampered.action == "build" and "precision 'fp32' != 'fp16'" in tampered.reason
    plan.sidecar.unlink()
    assert tb.plan_engine(tmp_path, key).action == "build"


class FakeBuilder:
    """The builder seam: returns bytes and counts builds."""

    def __init__(self, fail: bool = False) -> None:
        self.builds: list[tb.BuildSettings] = []
        self.fail = fail

    def __call__(self, settings: tb.BuildSettings, cuda: CudaApi, log: tb.Log) -> bytes:
        self.builds.append(settings)
        if self.fail:
            raise BackendError("TensorRT failed to build")
        return b"serialized-engine:" + settings.precision.encode()


def test_ensure_engine_builds_once_then_reuses(tiny_model: Path, tmp_path: Path) -> None:
    builder, logs = FakeBuilder(), []
    info = read_model_info(tiny_model)
    options = BackendOptions(precision="fp16", engine_cache_dir=str(tmp_path), workspace_mb=256)
    cuda = HostCuda()
    path, key = tb.engine_for(info, options, cuda, logs.append, builder, version="10.13.0.35")
    assert path.read_bytes() == b"serialized-engine:fp16" and len(builder.builds) == 1
    settings = builder.builds[0]
    assert (settings.max_batch, settings.workspace_mb, settings.input_hw) == (4, 256, (32, 48))
    assert settings.timing_cache.parent == tmp_path and settings.timing_cache.name.startswith("timing-")
    assert any("building a fp16 engine" in line for line in logs)
    assert any(line.startswith("tensorrt: built ") and " s" in line for line in logs)

    again, _ = tb.engine_for(info, options, cuda, logs.append, builder, version="10.13.0.35")
    assert again == path and len(builder.builds) == 1 and "using cached engine" in logs[-1]

    # Another TensorRT, GPU or precision: a new engine, the old file untouched.
    for opts, version in ((options, "10.14.1.0"), (replace(options, precision="fp32"), "10.13.0.35")):
        new, _ = tb.engine_for(info, opts, cuda, logs.append, builder, version=version)
        assert new != path
    cuda.name = "NVIDIA GeForce RTX 5090"
    tb.engine_for(info, options, cuda, logs.append, builder, version="10.13.0.35")
    assert len(builder.builds) == 4 and path.read_bytes() == b"serialized-engine:fp16"


def test_failed_build_leaves_no_engine(tiny_model: Path, tmp_path: Path) -> None:
    options = BackendOptions(engine_cache_dir=str(tmp_path))
    with pytest.raises(BackendError, match="failed to build"):
        tb.engine_for(read_model_info(tiny_model), options, HostCuda(), lambda _: None, FakeBuilder(fail=True),
                      version="10.13.0.35")
    assert not list(tmp_path.glob("*.engine")) and not list(tmp_path.glob("*.json"))


# --- INT8 calibration data -----------------------------------------------------------------------------------

def test_calibration_feed_batches_and_cache(tmp_path: Path) -> None:
    frames = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 6, 3), np.uint8)
    feed = tb.CalibrationFeed(frames, 4, (4, 6), tmp_path / "calib.cache")
    batches = list(feed.batches())
    assert [b.shape for b in batches] == [(4, 4, 6, 3), (4, 4, 6, 3)]  # the partial last batch is dropped
    assert [int(b[i, 0, 0, 0]) for b in batches for i in range(4)] == list(range(8))
    assert all(b.flags.c_contiguous for b in batches)
    assert feed.read_cache() is None
    feed.write_cache(b"TRT-100-EntropyCalibration2\nimage: 3c010a14\n")
    assert feed.read_cache() == b"TRT-100-EntropyCalibration2\nimage: 3c010a14\n"
    assert list(tb.CalibrationFeed(None, 4, (4, 6), feed.cache_path).batches()) == []
    with pytest.raises(BackendError, match="the model needs"):
        tb.CalibrationFeed(frames, 4, (8, 6), feed.cache_path)


def test_calibration_frames_are_rgb_resized_like_the_node(tmp_path: Path) -> None:
    for i in range(5):
        bgr = np.zeros((60, 80, 3), np.uint8)
        bgr[..., 2] = 200 + i  # red in OpenCV's BGR order
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), bgr)
    (tmp_path / "notes.txt").write_text("not an image")
    frames = tb.calibration_frames(tmp_path, (30, 40), limit=3)
    assert frames.shape == (3, 30, 40, 3) and frames.dtype == np.uint8
    assert [int(f[0, 0, 0]) for f in frames] == [200, 202, 204]  # evenly spread, RGB order
    assert int(frames[..., 1:].max()) == 0


def test_calibration_feed_needs_data_or_cache(tmp_path: Path) -> None:
    settings = tb.BuildSettings(tmp_path / "m.onnx", (30, 40), "int8", 2, 256, tmp_path / "timing.cache",
                                tmp_path / "calib.cache")
    with pytest.raises(BackendError, match="--calibration-data"):
        tb.calibration_feed(settings, print)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackendError, match="no .png"):
        tb.calibration_feed(replace(settings, calibration_data=str(empty)), print)
    settings.calibration_cache.write_bytes(b"cache")
    feed = tb.calibration_feed(settings, print)
    assert feed.frames is None and feed.read_cache() == b"cache"


# --- runtime bookkeeping through a fake tensorrt module and host-memory CUDA -------------------------------

class HostCuda(CudaApi):
    """CudaApi over host memory: pointers index ``memory``; copies happen at once; every call is counted."""

    library = "host"

    def __init__(self) -> None:
        self.name = "NVIDIA H100 80GB HBM3"
        self.memory: dict[int, np.ndarray] = {}
        self.pinned: list[int] = []
        self.calls: Counter[str] = Counter()
        self.copies: list[tuple[str, int, str]] = []
        self.next_ptr = 0x1000

    def device_count(self) -> int:
        return 1

    def device_name(self, gpu_id: int) -> str:
        return self.name

    def compute_capability(self, gpu_id: int) -> tuple[int, int]:
        return 9, 0

    def use_device(self, gpu_id: int) -> AbstractContextManager[None]:
        self.calls["use_device"] += 1
        return nullcontext()

    def create_stream(self) -> int:
        self.calls["create_stream"] += 1
        return 7

    def destroy_stream(self, stream: int) -> None:
        self.calls["destroy_stream"] += 1

    def alloc_pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self.calls["alloc_pinned"] += 1
        array = np.zeros(shape, dtype)
        self.pinned.append(array.ctypes.data)
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        self.calls["free_pinned"] += 1
        self.pinned.remove(array.ctypes.data)

    def alloc_device(self, nbytes: int, what: str) -> int:
        self.calls["alloc_device"] += 1
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + 0x100000
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free_device(self, ptr: int) -> None:
        self.calls["free_device"] += 1
        del self.memory[ptr]

    def copy_to_device(self, dst: int, src: np.ndarray, nbytes: int, stream: int, what: str) -> None:
        self.copies.append(("htod", nbytes, what))
        self.memory[dst][:nbytes] = src.reshape(-1).view(np.uint8)[:nbytes]

    def copy_to_host(self, dst: np.ndarray, src: int, nbytes: int, stream: int, what: str) -> None:
        self.copies.append(("dtoh", nbytes, what))
        dst.reshape(-1).view(np.uint8)[:nbytes] = self.memory[src][:nbytes]

    def synchronize(self, stream: int) -> None:
        self.calls["synchronize"] += 1


def fake_labels(images: np.ndarray) -> np.ndarray:
    """What the fake engine computes: a label from the red channel."""
    return (images[..., 0] // 32).astype(np.uint8)


class FakeContext:
    """IExecutionContext's few methods the backend calls, executing ``fake_labels`` on HostCuda memory."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.input_shapes: list[tuple[int, ...]] = []
        self.executions = 0
        self.execute_ok = True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return name in self.engine.tensors

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.input_shapes.append(tuple(shape))
        return name == "image" and 1 <= shape[0] <= self.engine.max_batch

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.input_shapes[-1][0], *self.engine.tensors[name][1][1:])

    def execute_async_v3(self, stream: int) -> bool:
        self.executions += 1
        n, h, w, _ = self.input_shapes[-1]
        memory = self.engine.cuda.memory
        images = memory[self.addresses["image"]][:n * h * w * 3].reshape(n, h, w, 3)
        memory[self.addresses["labels"]][:n * h * w] = fake_labels(images).reshape(-1)
        return self.execute_ok


class FakeEngine:
    """ICudaEngine's tensor-name queries for the contract's two tensors (plus any extras a test adds)."""

    def __init__(self, cuda: HostCuda, hw: tuple[int, int], max_batch: int) -> None:
        h, w = hw
        self.cuda, self.max_batch = cuda, max_batch
        self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {
            "image": ("INPUT", (-1, h, w, 3), "UINT8"), "labels": ("OUTPUT", (-1, h, w), "UINT8")}
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def get_tensor_dtype(self, name: str) -> str:
        return self.tensors[name][2]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        shape = self.tensors[name][1][1:]
        return [(1, *shape), (self.max_batch, *shape), (self.max_batch, *shape)]

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def fake_tensorrt(engine: FakeEngine | None) -> types.ModuleType:
    """A stand-in ``tensorrt`` module: enums as strings, ``Runtime`` deserializing to ``engine``."""
    mod = types.ModuleType("tensorrt")
    mod.__version__ = "10.13.0.35"  # type: ignore[attr-defined]
    mod.Builder = object  # type: ignore[attr-defined]
    mod.Logger = type("Logger", (), {"WARNING": "WARNING", "__init__": lambda self, severity: None})  # type: ignore[attr-defined]
    mod.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    mod.nptype = {"UINT8": np.uint8, "FLOAT": np.float32}.__getitem__  # type: ignore[attr-defined]

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            return engine if data.startswith(b"serialized-engine") else None

    mod.Runtime = Runtime  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def fake_trt(tiny_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    cuda = HostCuda()
    info = read_model_info(tiny_model)
    engine = FakeEngine(cuda, info.input_hw, 4)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    options = BackendOptions(max_batch=4, engine_cache_dir=str(tmp_path))
    backend = trt_backend.TensorRTBackend(info, options, cuda=cuda, builder=FakeBuilder(), log=lambda _: None)
    return types.SimpleNamespace(cuda=cuda, engine=engine, backend=backend, info=info, options=options)


def frames(n: int, hw: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *hw, 3), dtype=np.uint8)


def test_buffers_allocated_once_and_smaller_batches_reuse_them(fake_trt: Any) -> None:
    cuda, engine, backend = fake_trt.cuda, fake_trt.engine, fake_trt.backend
    h, w = fake_trt.info.input_hw
    with backend:
        allocations = (cuda.calls["alloc_device"], cuda.calls["alloc_pinned"], cuda.calls["create_stream"])
        assert allocations == (2, 2, 1)
        context = engine.contexts[0]
        assert set(context.addresses) == {"image", "labels"}
        assert sorted(cuda.memory[p].nbytes for p in context.addresses.values()) == [4 * h * w, 4 * h * w * 3]
        for n, seed in ((4, 0), (2, 1), (2, 2), (1, 3), (4, 4)):
            batch = frames(n, (h, w), seed)
            got = backend.infer(batch).labels
            assert got.shape == (n, h, w) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, fake_labels(batch))
        # the shape is set only when the batch size changes; addresses are set once, to the buffers made once
        assert context.input_shapes == [(4, h, w, 3), (2, h, w, 3), (1, h, w, 3), (4, h, w, 3)]
        assert (cuda.calls["alloc_device"], cuda.calls["alloc_pinned"], cuda.calls["create_stream"]) == allocations
        assert [c for c in cuda.copies if c[0] == "htod"][1] == ("htod", 2 * h * w * 3, "input 'image'")
        assert [c for c in cuda.copies if c[0] == "dtoh"][3] == ("dtoh", 1 * h * w, "output 'labels'")
        assert context.executions == 5 and cuda.calls["synchronize"] == 5
        assert backend.device == "cuda:0 (NVIDIA H100 80GB HBM3, fp16)"
    assert cuda.memory == {} and cuda.pinned == []
    assert cuda.calls["free_device"] == 2 and cuda.calls["destroy_stream"] == 1


def test_extra_outputs_get_device_buffers_only(fake_trt: Any) -> None:
    h, w = fake_trt.info.input_hw
    fake_trt.engine.tensors["confidence"] = ("OUTPUT", (-1, h, w), "FLOAT")
    with fake_trt.backend as backend:
        backend.infer(frames(3, (h, w), 0))
        assert fake_trt.cuda.calls["alloc_device"] == 3 and fake_trt.cuda.calls["alloc_pinned"] == 2
        address = fake_trt.engine.contexts[0].addresses["confidence"]
        assert fake_trt.cuda.memory[address].nbytes == 4 * h * w * 4


@pytest.mark.parametrize("tensor, change, match", [
    ("image", ("INPUT", None, "FLOAT"), "engine tensor 'image' is input float32"),
    ("labels", ("OUTPUT", (-1, 16, 16), "UINT8"), "engine tensor 'labels' is output uint8 \\[-1, 16, 16\\]"),
    ("mask", ("INPUT", (-1, 8), "UINT8"), "extra input 'mask'"),
])
def test_contract_mismatch_is_a_clear_error(fake_trt: Any, tensor: str, change: tuple, match: str) -> None:
    old = fake_trt.engine.tensors.get(tensor, change)
    fake_trt.engine.tensors[tensor] = (change[0], change[1] or old[1], change[2])
    with pytest.raises(BackendError, match=match):
        fake_trt.backend.activate()
    assert fake_trt.cuda.memory == {}  # nothing allocated or all freed


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
                                           ".*rebuild: unet-build-engine"):
        fake_trt.backend.activate()


# --- availability, the CLI and the auto fallback chain on this machine -------------------------------------

def test_unavailable_reason_here() -> None:
    reason = trt_backend.unavailable_reason(BackendOptions())
    assert reason is not None and reason.startswith("tensorrt Python bindings not importable")


def test_cuda_reason_without_cuda_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cuda.bindings.runtime", "cuda.cudart", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    assert cuda_unavailable_reason() == "cuda-python/pycuda missing"


def test_cli_build_fails_clearly_without_tensorrt(tiny_model: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert tb.main([str(tiny_model), "--build-only", "--cache-dir", str(tmp_path)]) == 1
    assert "tensorrt Python bindings not importable" in capsys.readouterr().err


def test_auto_falls_back_to_onnxruntime_saying_why(tiny_model: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has CUDA here, so auto picks onnxruntime (cuda)")
    logs: list[str] = []
    backend = create_backend("auto", tiny_model, BackendOptions(max_batch=2), log=logs.append)
    try:
        assert backend.name == "onnxruntime"
        assert len(logs) == 1 and "using onnxruntime" in logs[0]
        assert "tensorrt is not usable: tensorrt Python bindings not importable" in logs[0]
        assert "onnxruntime (cuda) is not usable: " in logs[0]  # tried before the CPU provider
        assert backend.options.device == "cpu"  # type: ignore[attr-defined]
    finally:
        backend.close()


def test_auto_falls_back_when_the_engine_build_fails(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_create(info: Any, options: BackendOptions) -> trt_backend.TensorRTBackend:
        return trt_backend.TensorRTBackend(info, options, cuda=HostCuda(), builder=FakeBuilder(fail=True))

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(None))
    monkeypatch.setattr(trt_backend, "unavailable_reason", lambda options: None)
    monkeypatch.setattr(trt_backend, "create", failing_create)
    logs: list[str] = []
    options = BackendOptions(max_batch=2, engine_cache_dir=str(Path(tiny_model).parent / "engines"))
    backend = create_backend("auto", tiny_model, options, log=logs.append)
    try:
        assert backend.name == "onnxruntime"
        assert "tensorrt is not usable: failed to start (BackendError: TensorRT failed to build)" in logs[0]
    finally:
        backend.close()
