"""CUDA memory and streams for the TensorRT backend: one small seam over cuda-python or pycuda.

The backend needs only a handful of operations: pick the device, make a stream, allocate pinned host
arrays and device buffers once, copy asynchronously, synchronise, free. ``CudaApi`` names them;
``CudaPython`` implements them with ``cuda.bindings.runtime`` (cuda-python, preferred: it is the CUDA
runtime TensorRT itself uses) and ``PyCuda`` with ``pycuda.driver`` on the device's primary context
(what TensorRT uses too). Tests implement ``CudaApi`` with host memory to check the backend's
bookkeeping without a GPU.

Every cuda-python call returns an error code first; ``check`` raises ``CudaError`` with what was being
done (the tensor name, the byte count) and CUDA's own error name and text.
"""

from __future__ import annotations

import ctypes
import importlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from unet_perception.backends.base import BackendError


class CudaError(BackendError):
    """A CUDA call that failed, with the operation and CUDA's error text."""


# What to do about the CUDA errors a first run on a new machine meets.
HINTS = {
    "cudaErrorInsufficientDriver": "the NVIDIA driver is older than this CUDA build needs: update the driver, "
                                   "or install the tensorrt/cuda-python pair for an older CUDA major "
                                   "(requirements/gpu.txt)",
    "cudaErrorNoDevice": "no CUDA GPU is visible (nvidia-smi; in a container, --gpus all)",
    "cudaErrorInitializationError": "the CUDA driver failed to initialise (nvidia-smi shows why)",
    "cudaErrorSystemDriverMismatch": "the NVIDIA kernel module and user-space driver versions differ: reboot or "
                                     "reinstall the driver",
    "cudaErrorCompatNotSupportedOnDevice": "CUDA forward compatibility is not supported on this GPU: update the driver",
}


class CudaApi(ABC):
    """The CUDA operations the TensorRT backend uses; pointers and streams are ints."""

    library: str = ""

    @abstractmethod
    def device_count(self) -> int:
        """Number of visible CUDA devices: 0 when there is no GPU; CudaError when the driver fails (too old...)."""

    @abstractmethod
    def device_name(self, gpu_id: int) -> str: ...

    @abstractmethod
    def compute_capability(self, gpu_id: int) -> tuple[int, int]: ...

    @abstractmethod
    def use_device(self, gpu_id: int) -> AbstractContextManager[None]:
        """Make ``gpu_id`` current in the calling thread for the ``with`` block (workers call from any thread)."""

    @abstractmethod
    def create_stream(self) -> int: ...

    @abstractmethod
    def destroy_stream(self, stream: int) -> None: ...

    @abstractmethod
    def alloc_pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A page-locked host array (needed for truly asynchronous copies)."""

    @abstractmethod
    def free_pinned(self, array: np.ndarray) -> None: ...

    @abstractmethod
    def alloc_device(self, nbytes: int, what: str) -> int: ...

    @abstractmethod
    def free_device(self, ptr: int) -> None: ...

    @abstractmethod
    def copy_to_device(self, dst: int, src: np.ndarray, nbytes: int, stream: int, what: str) -> None:
        """Enqueue a copy of the first ``nbytes`` of the pinned array ``src`` to ``dst``."""

    @abstractmethod
    def copy_to_host(self, dst: np.ndarray, src: int, nbytes: int, stream: int, what: str) -> None:
        """Enqueue a copy of ``nbytes`` from ``src`` into the start of the pinned array ``dst``."""

    @abstractmethod
    def synchronize(self, stream: int) -> None: ...


class CudaPython(CudaApi):
    """``CudaApi`` over cuda-python's runtime bindings (``cuda.bindings.runtime``, or the older ``cuda.cudart``)."""

    library = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def check(self, result: Any, what: str) -> Any:
        """Unpack a ``(cudaError_t, *values)`` tuple; raise CudaError naming ``what`` unless it is cudaSuccess."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(err)
            name = getattr(err, "name", str(err))
            hint = HINTS.get(name, "")
            if name == "cudaErrorInsufficientDriver":  # what the runtime also says when there is no driver at all
                hint = nvidia_driver_problem() or hint
            raise CudaError(f"CUDA error during {what}: {name} ({text.decode() if isinstance(text, bytes) else text})"
                            + (f"; {hint}" if hint else ""))
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        result = self.rt.cudaGetDeviceCount()
        if result[0] == self.rt.cudaError_t.cudaErrorNoDevice:
            return 0
        return int(self.check(result, "cudaGetDeviceCount"))

    def _properties(self, gpu_id: int) -> Any:
        return self.check(self.rt.cudaGetDeviceProperties(gpu_id), f"cudaGetDeviceProperties(gpu {gpu_id})")

    def device_name(self, gpu_id: int) -> str:
        name = self._properties(gpu_id).name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()

    def compute_capability(self, gpu_id: int) -> tuple[int, int]:
        props = self._properties(gpu_id)
        return int(props.major), int(props.minor)

    def use_device(self, gpu_id: int) -> AbstractContextManager[None]:
        # cudaSetDevice is per thread and cheap: set it on entry, nothing to undo.
        self.check(self.rt.cudaSetDevice(gpu_id), f"cudaSetDevice({gpu_id})")
        return nullcontext()

    def create_stream(self) -> int:
        # Non-blocking: a stream made by cudaStreamCreate waits for all work another library puts on the legacy
        # default stream of the process (ONNX Runtime, torch), which would tie the in-flight batches to it.
        return int(self.check(self.rt.cudaStreamCreateWithFlags(self.rt.cudaStreamNonBlocking),
                              "cudaStreamCreateWithFlags(cudaStreamNonBlocking)"))

    def destroy_stream(self, stream: int) -> None:
        self.check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def alloc_pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        ptr = int(self.check(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes} bytes)"))
        raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
        return raw.view(dtype).reshape(shape)

    def free_pinned(self, array: np.ndarray) -> None:
        self.check(self.rt.cudaFreeHost(array.ctypes.data), "cudaFreeHost")

    def alloc_device(self, nbytes: int, what: str) -> int:
        return int(self.check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes) for {what}"))

    def free_device(self, ptr: int) -> None:
        self.check(self.rt.cudaFree(ptr), "cudaFree")

    def copy_to_device(self, dst: int, src: np.ndarray, nbytes: int, stream: int, what: str) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, nbytes, kind, stream),
                   f"host-to-device copy of {nbytes} bytes for {what}")

    def copy_to_host(self, dst: np.ndarray, src: int, nbytes: int, stream: int, what: str) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, nbytes, kind, stream),
                   f"device-to-host copy of {nbytes} bytes for {what}")

    def synchronize(self, stream: int) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class PyCuda(CudaApi):
    """``CudaApi`` over pycuda, on each device's primary context (the context TensorRT's runtime uses).

    pycuda raises ``pycuda.driver.Error`` itself; those are re-raised as CudaError naming the operation.
    """

    library = "pycuda"

    def __init__(self, driver: Any) -> None:
        self.drv = driver
        self._call("cuInit", self.drv.init)
        self._contexts: dict[int, Any] = {}
        self._streams: dict[int, Any] = {}
        self._device: dict[int, Any] = {}

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.drv.Error as exc:
            raise CudaError(f"CUDA error during {what}: {exc}") from exc

    def device_count(self) -> int:
        return int(self._call("cuDeviceGetCount", self.drv.Device.count))

    def device_name(self, gpu_id: int) -> str:
        return str(self._call(f"cuDeviceGetName(gpu {gpu_id})", lambda: self.drv.Device(gpu_id).name()))

    def compute_capability(self, gpu_id: int) -> tuple[int, int]:
        major, minor = self._call(f"cuDeviceComputeCapability(gpu {gpu_id})",
                                  lambda: self.drv.Device(gpu_id).compute_capability())
        return int(major), int(minor)

    def use_device(self, gpu_id: int) -> AbstractContextManager[None]:
        if gpu_id not in self._contexts:
            self._contexts[gpu_id] = self._call(f"retain_primary_context(gpu {gpu_id})",
                                                lambda: self.drv.Device(gpu_id).retain_primary_context())
        return _PushedContext(self._contexts[gpu_id])

    def create_stream(self) -> int:
        stream = self._call("Stream()", self.drv.Stream)
        self._streams[int(stream.handle)] = stream
        return int(stream.handle)

    def destroy_stream(self, stream: int) -> None:
        self._streams.pop(stream, None)  # pycuda destroys it when the object goes

    def alloc_pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        array: np.ndarray = self._call(f"pagelocked_empty({shape})", self.drv.pagelocked_empty, shape, np.dtype(dtype))
        return array

    def free_pinned(self, array: np.ndarray) -> None:
        allocation: Any = array.base  # pycuda's HostAllocation
        self._call("free pinned memory", allocation.free)

    def alloc_device(self, nbytes: int, what: str) -> int:
        allocation = self._call(f"mem_alloc({nbytes} bytes) for {what}", self.drv.mem_alloc, nbytes)
        self._device[int(allocation)] = allocation
        return int(allocation)

    def free_device(self, ptr: int) -> None:
        self._call("mem_free", self._device.pop(ptr).free)

    def copy_to_device(self, dst: int, src: np.ndarray, nbytes: int, stream: int, what: str) -> None:
        flat = src.reshape(-1).view(np.uint8)[:nbytes]
        self._call(f"host-to-device copy of {nbytes} bytes for {what}", self.drv.memcpy_htod_async,
                   dst, flat, self._streams[stream])

    def copy_to_host(self, dst: np.ndarray, src: int, nbytes: int, stream: int, what: str) -> None:
        flat = dst.reshape(-1).view(np.uint8)[:nbytes]
        self._call(f"device-to-host copy of {nbytes} bytes for {what}", self.drv.memcpy_dtoh_async,
                   flat, src, self._streams[stream])

    def synchronize(self, stream: int) -> None:
        self._call("stream synchronize", self._streams[stream].synchronize)


class _PushedContext(AbstractContextManager[None]):
    """pycuda contexts are per thread: push on entry, pop on exit."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def __enter__(self) -> None:
        self.context.push()

    def __exit__(self, *exc: object) -> None:
        self.context.pop()


def _import_first(*names: str) -> Any:
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def load_cuda() -> CudaApi:
    """cuda-python when it imports, else pycuda; raises BackendError saying what to install."""
    cudart = _import_first("cuda.bindings.runtime", "cuda.cudart")
    if cudart is not None:
        return CudaPython(cudart)
    driver = _import_first("pycuda.driver")
    if driver is not None:
        return PyCuda(driver)
    raise BackendError("cuda-python/pycuda missing: install one of them (pip install cuda-python) "
                       "to give TensorRT its CUDA memory and stream")


# Where the two halves of the NVIDIA driver show themselves (module level: tests point them elsewhere).
DRIVER_PROC = (Path("/proc/driver/nvidia"), Path("/dev/nvhost-ctrl-gpu"))  # desktop/server kernel module, Jetson
LIBCUDA = "libcuda.so.1"  # the user-space driver library every CUDA runtime loads


def libcuda_loadable() -> bool:
    try:
        ctypes.CDLL(LIBCUDA)
    except OSError:
        return False
    return True


def nvidia_driver_problem() -> str:
    """What is missing of the NVIDIA driver ("" when both halves are there), with what to do.

    The CUDA runtime reports a missing driver as cudaErrorInsufficientDriver, the same error as a driver that is
    too old; this tells the two apart, so a machine without a driver is not told to update it."""
    kernel = any(path.exists() for path in DRIVER_PROC)
    library = libcuda_loadable()
    if kernel and library:
        return ""
    if not kernel and not library:
        return (f"no NVIDIA driver: {LIBCUDA} cannot be loaded and there is no {DRIVER_PROC[0]}; install the NVIDIA "
                "driver (in a container: run it with --gpus all and the NVIDIA Container Toolkit), or set device cpu")
    if kernel:
        return (f"the NVIDIA kernel driver is loaded but its user-space library {LIBCUDA} cannot be loaded; in a "
                "container run with --gpus all (NVIDIA Container Toolkit), else reinstall the driver")
    return (f"{LIBCUDA} is installed but no NVIDIA kernel driver is loaded (no {DRIVER_PROC[0]}): load it "
            "(reboot after installing the driver, or modprobe nvidia) and check nvidia-smi")


def cuda_unavailable_reason(gpu_id: int = 0) -> str | None:
    """None when a CUDA library imports and sees GPU ``gpu_id``; else the reason, naming any CUDA error and a
    missing driver ("no NVIDIA driver" is never reported as "driver too old")."""
    try:
        cuda = load_cuda()
    except BackendError:
        driver = nvidia_driver_problem()
        return "cuda-python/pycuda missing" + (f"; and {driver}" if driver else "")
    try:
        count = cuda.device_count()
    except CudaError as exc:  # the driver is there but fails: say so, never just "no GPU"
        return str(exc)
    except Exception as exc:  # a broken install raises from inside the bindings
        return f"CUDA error from {cuda.library}: {type(exc).__name__}: {exc}"
    if count == 0:
        driver = nvidia_driver_problem()
        return "no CUDA GPU" + (f" ({driver})" if driver else
                                " (but the kernel driver lists one: check nvidia-smi)" if gpu_visible() else "")
    return None if gpu_id < count else f"gpu_id {gpu_id} but only {count} CUDA GPU(s) visible"


def gpu_visible() -> bool:
    """Whether the kernel shows an NVIDIA GPU (desktop/server driver or Jetson), whatever CUDA libraries say.

    Tests and the GPU check fail, rather than skip, when a GPU is visible but CUDA cannot use it.
    """
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists() \
        or Path("/dev/nvhost-ctrl-gpu").exists()
