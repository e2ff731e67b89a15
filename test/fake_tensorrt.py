"""Stand-ins for the GPU side, for tests without TensorRT or CUDA: host-memory ``CudaApi``, a fake ``tensorrt``
module (runtime: engine, context; build: builder, network, parser, config) for TensorRT 10 or 11, and a fake
cuda-python ``cudart`` that returns chosen error codes."""

from __future__ import annotations

import enum
import types
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from unet_perception.backends.base import BackendError
from unet_perception.backends.cuda_memory import CudaApi
from unet_perception.backends.tensorrt_builder import BuildSettings, Log


class HostCuda(CudaApi):
    """CudaApi over host memory: pointers index ``memory``; copies happen at once; every call is counted.

    ``fail`` maps an operation name to the call number (1-based) that raises, to test failure paths.
    """

    library = "host"

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.name = "NVIDIA H100 80GB HBM3"
        self.memory: dict[int, np.ndarray] = {}
        self.pinned: list[int] = []
        self.streams: set[int] = set()
        self.calls: Counter[str] = Counter()
        self.copies: list[tuple[str, int, str]] = []
        self.events: list[tuple[str, int]] = []  # (htod | execute | dtoh | synchronize, stream), in call order
        self.next_ptr = 0x1000
        self.next_stream = 7
        self.fail = fail or {}

    def _count(self, op: str) -> None:
        self.calls[op] += 1
        if self.fail.get(op) == self.calls[op]:
            raise BackendError(f"CUDA error during {op}: cudaErrorMemoryAllocation (planted)")

    def device_count(self) -> int:
        return 1

    def device_name(self, gpu_id: int) -> str:
        return self.name

    def compute_capability(self, gpu_id: int) -> tuple[int, int]:
        return 9, 0

    def use_device(self, gpu_id: int) -> AbstractContextManager[None]:
        self._count("use_device")
        return nullcontext()

    def create_stream(self) -> int:
        self._count("create_stream")
        stream, self.next_stream = self.next_stream, self.next_stream + 1
        self.streams.add(stream)
        return stream

    def destroy_stream(self, stream: int) -> None:
        self._count("destroy_stream")
        self.streams.remove(stream)

    def alloc_pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        self._count("alloc_pinned")
        array = np.zeros(shape, dtype)
        self.pinned.append(array.ctypes.data)
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        self.pinned.remove(array.ctypes.data)
        self._count("free_pinned")

    def alloc_device(self, nbytes: int, what: str) -> int:
        self._count("alloc_device")
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + 0x100000
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free_device(self, ptr: int) -> None:
        del self.memory[ptr]
        self._count("free_device")

    def copy_to_device(self, dst: int, src: np.ndarray, nbytes: int, stream: int, what: str) -> None:
        self.copies.append(("htod", nbytes, what))
        self.events.append(("htod", stream))
        self.memory[dst][:nbytes] = src.reshape(-1).view(np.uint8)[:nbytes]

    def copy_to_host(self, dst: np.ndarray, src: int, nbytes: int, stream: int, what: str) -> None:
        self.copies.append(("dtoh", nbytes, what))
        self.events.append(("dtoh", stream))
        dst.reshape(-1).view(np.uint8)[:nbytes] = self.memory[src][:nbytes]

    def synchronize(self, stream: int) -> None:
        self.calls["synchronize"] += 1
        self.events.append(("synchronize", stream))


class FakeBuilder:
    """The engine-builder seam: returns bytes and records the settings of each build."""

    def __init__(self, fail: bool = False) -> None:
        self.builds: list[BuildSettings] = []
        self.fail = fail

    def __call__(self, settings: BuildSettings, cuda: CudaApi, log: Log) -> bytes:
        self.builds.append(settings)
        if self.fail:
            raise BackendError("TensorRT failed to build")
        return b"serialized-engine:" + settings.precision.encode()


def fake_labels(images: np.ndarray) -> np.ndarray:
    """What the fake engine computes: a label from the red channel."""
    return (images[..., 0] // 32).astype(np.uint8)


def fake_confidence(images: np.ndarray) -> np.ndarray:
    """And a confidence from the green channel."""
    return (255 - images[..., 1]).astype(np.uint8)


class FakeContext:
    """IExecutionContext's few methods the backend calls, executing the fake model on HostCuda memory."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.input_shapes: list[tuple[int, ...]] = []
        self.executions = 0
        self.execute_ok = True
        self.unresolved: set[str] = set()  # outputs whose non-batch dims stay -1 after set_input_shape

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return name in self.engine.tensors

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.input_shapes.append(tuple(shape))
        return name == "image" and 1 <= shape[0] <= self.engine.max_batch

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        rest = self.engine.tensors[name][1][1:]
        return (self.input_shapes[-1][0], *((-1,) * len(rest) if name in self.unresolved else rest))

    def execute_async_v3(self, stream: int) -> bool:
        self.executions += 1
        self.engine.cuda.events.append(("execute", stream))
        n, h, w, _ = self.input_shapes[-1]
        memory = self.engine.cuda.memory
        images = memory[self.addresses["image"]][:n * h * w * 3].reshape(n, h, w, 3)
        memory[self.addresses["labels"]][:n * h * w] = fake_labels(images).reshape(-1)
        if "confidence" in self.addresses and self.engine.tensors["confidence"][2] == "UINT8":
            memory[self.addresses["confidence"]][:n * h * w] = fake_confidence(images).reshape(-1)
        return self.execute_ok


class FakeEngine:
    """ICudaEngine's tensor-name queries for the contract's tensors (plus any extras a test adds)."""

    def __init__(self, cuda: HostCuda, hw: tuple[int, int], max_batch: int, confidence: bool = True) -> None:
        h, w = hw
        self.cuda, self.max_batch = cuda, max_batch
        self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {
            "image": ("INPUT", (-1, h, w, 3), "UINT8"), "labels": ("OUTPUT", (-1, h, w), "UINT8")}
        if confidence:
            self.tensors["confidence"] = ("OUTPUT", (-1, h, w), "UINT8")
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


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class FakeLoggerBase:
    Severity = Severity

    def __init__(self) -> None:
        pass


class Strict:
    """An object that refuses attributes it does not declare: what TensorRT 11 does with removed API."""

    declared: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.declared:
            raise AttributeError(f"'{type(self).__name__}' has no attribute '{name}' (removed in TensorRT 11)")
        object.__setattr__(self, name, value)


class FakeConfig(Strict):
    """IBuilderConfig. ``timing_accepts`` says which caches ``set_timing_cache`` takes: "any", "new" (an empty
    one only: the saved cache is from another GPU) or "none"; it returns False otherwise, as the real one can.
    "unreadable": ``create_timing_cache`` returns None for saved bytes, as the real one does for a bad file."""

    declared = ("progress_monitor", "flags", "cleared", "profiles", "timing", "workspace", "timing_accepts")

    def __init__(self, timing_accepts: str = "any") -> None:
        self.flags: set[str] = {"TF32"}  # TensorRT's default
        self.cleared: list[str] = []
        self.profiles: list[Any] = []
        self.timing: bytes | None = None  # the attached cache; None: none attached
        self.workspace = 0
        self.timing_accepts = timing_accepts

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.workspace = size

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)
        self.cleared.append(flag)

    def add_optimization_profile(self, profile: Any) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> bytes | None:
        """None for bytes TensorRT cannot read (the real binding returns createTimingCache's null as None)."""
        if self.timing_accepts == "unreadable" and data:
            return None
        return bytes(data)

    def set_timing_cache(self, cache: bytes | None, ignore_mismatch: bool) -> bool:
        if cache is None:  # pybind refuses None for the ITimingCache argument
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if self.timing_accepts == "none" or (self.timing_accepts == "new" and cache):
            return False
        self.timing = cache
        return True

    def get_timing_cache(self) -> Any:
        """None when no cache is attached (the real binding's documented return)."""
        timing = self.timing
        return None if timing is None else types.SimpleNamespace(serialize=lambda: b"timing:" + timing)


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, Any, Any]] = {}

    def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
        self.shapes[name] = (lo, opt, hi)


class CreationFlag10(enum.IntEnum):
    """``NetworkDefinitionCreationFlag`` in TensorRT 10.x (tensorrt-stubs 10.13's tensorrt.pyi)."""

    EXPLICIT_BATCH = 0  # deprecated, ignored
    STRONGLY_TYPED = 1
    PREFER_JIT_PYTHON_PLUGINS = 2
    PREFER_AOT_PYTHON_PLUGINS = 3


class CreationFlag11(enum.IntEnum):
    """In TensorRT 11.x (NVIDIA/TensorRT include/NvInfer.h at 11.1.0.106): EXPLICIT_BATCH is gone, STRONGLY_TYPED
    is deprecated and ignored (strong typing is the only mode) and now 0; the plugin flags moved down by one."""

    STRONGLY_TYPED = 0
    PREFER_JIT_PYTHON_PLUGINS = 1
    PREFER_AOT_PYTHON_PLUGINS = 2


def _nptype(dtype: str) -> type:
    """``tensorrt.nptype``: NumPy has no bf16, fp8, int4 or fp4, and the real one raises TypeError for them."""
    types_ = {"UINT8": np.uint8, "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
              "INT64": np.int64, "BOOL": np.bool_}
    if dtype not in types_:
        raise TypeError(f"Could not resolve TensorRT datatype to an equivalent numpy datatype. ({dtype})")
    return types_[dtype]


def fake_tensorrt(engine: FakeEngine | None = None, version: str = "10.13.0.35", *,
                  builder_error: str = "", plan: bytes | None = b"plan", parse_errors: tuple[str, ...] = (),
                  timing_accepts: str = "any") -> types.ModuleType:
    """A stand-in ``tensorrt`` module. Version 11.x drops EXPLICIT_BATCH, BuilderFlag.FP16/INT8 and
    ``platform_has_fast_fp16`` and renumbers STRONGLY_TYPED to 0; ``builder_error`` makes ``Builder()`` log it
    and raise TypeError as pybind does; ``timing_accepts`` is passed to the builder config (``FakeConfig``)."""
    eleven = version.startswith("11.")
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version  # type: ignore[attr-defined]
    mod.ILogger = FakeLoggerBase  # type: ignore[attr-defined]
    mod.Logger = FakeLoggerBase  # type: ignore[attr-defined]
    mod.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})  # type: ignore[attr-defined]
    mod.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")  # type: ignore[attr-defined]
    mod.nptype = _nptype  # type: ignore[attr-defined]
    mod.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    flags = {"TF32": "TF32"} if eleven else {"TF32": "TF32", "FP16": "FP16", "INT8": "INT8"}
    mod.BuilderFlag = types.SimpleNamespace(**flags)  # type: ignore[attr-defined]
    creation = CreationFlag11 if eleven else CreationFlag10
    mod.NetworkDefinitionCreationFlag = creation  # type: ignore[attr-defined]
    mod.Dims = tuple  # type: ignore[attr-defined]
    built: dict[str, Any] = {}
    mod.built = built  # type: ignore[attr-defined]

    built["live_parsers"] = 0

    class Parser:
        """Counts live instances: the real parser owns the network's weights (it must outlive the build)."""

        def __init__(self, network: Any, logger: Any) -> None:
            self.num_errors = len(parse_errors)
            built["live_parsers"] += 1

        def __del__(self) -> None:
            built["live_parsers"] -= 1

        def parse_from_file(self, path: str) -> bool:
            built["parsed"] = path
            return not parse_errors

        def get_error(self, i: int) -> Any:
            return types.SimpleNamespace(node_name=lambda: f"n{i}", node_operator=lambda: "Op",
                                         desc=lambda: parse_errors[i])

    class Builder(Strict):
        declared = ()

        def __init__(self, logger: Any) -> None:
            if builder_error:
                logger.log(Severity.ERROR, builder_error)
                raise TypeError("__init__(): incompatible constructor arguments")
            if not eleven:
                object.__setattr__(self, "platform_has_fast_fp16", True)

        def create_network(self, flags: int) -> Any:
            if flags >> len(creation):  # a bit no member of this version's enum has
                raise ValueError(f"invalid NetworkDefinitionCreationFlag bits {flags:#x} for TensorRT {version}")
            built["network_flags"] = flags
            return types.SimpleNamespace()

        def create_builder_config(self) -> FakeConfig:
            built["config"] = FakeConfig(timing_accepts)
            return built["config"]

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network: Any, config: FakeConfig) -> bytes | None:
            built["parsers_at_build"] = built["live_parsers"]
            return plan

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine | None:
            built.setdefault("deserialized", []).append(bytes(data))  # what reached TensorRT: the trust tests
            return engine if data.startswith(b"serialized-engine") else None

    mod.OnnxParser = Parser  # type: ignore[attr-defined]
    mod.Builder = Builder  # type: ignore[attr-defined]
    mod.Runtime = Runtime  # type: ignore[attr-defined]
    return mod


class CudaRtError(enum.IntEnum):
    """The cudaError_t values the tests use (their real numbers)."""

    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


def fake_cudart(count_error: CudaRtError = CudaRtError.cudaSuccess, count: int = 1) -> types.SimpleNamespace:
    """cuda-python's runtime module, as far as ``CudaPython`` uses it, failing cudaGetDeviceCount as told."""
    texts = {CudaRtError.cudaErrorInsufficientDriver: b"CUDA driver version is insufficient for CUDA runtime version",
             CudaRtError.cudaErrorNoDevice: b"no CUDA-capable device is detected",
             CudaRtError.cudaErrorMemoryAllocation: b"out of memory"}
    return types.SimpleNamespace(
        cudaError_t=CudaRtError,
        cudaGetErrorString=lambda err: (CudaRtError.cudaSuccess, texts.get(err, b"")),
        cudaGetDeviceCount=lambda: (count_error, count if count_error == CudaRtError.cudaSuccess else 0),
        cudaMalloc=lambda n: (CudaRtError.cudaErrorMemoryAllocation, 0) if n > 1 << 40 else (CudaRtError.cudaSuccess,
                                                                                             0x7000),
        # the two stream flags of the real module (cudaStreamDefault 0, cudaStreamNonBlocking 1); the stream's
        # handle tells which flags made it
        cudaStreamDefault=0, cudaStreamNonBlocking=1,
        cudaStreamCreate=lambda: (CudaRtError.cudaSuccess, 0x5000),
        cudaStreamCreateWithFlags=lambda flags: (CudaRtError.cudaSuccess, 0x5000 + flags),
    )
