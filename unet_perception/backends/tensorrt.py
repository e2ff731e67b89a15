"""TensorRT runtime backend: a cached engine (built on first use), run on its own CUDA stream.

TensorRT 10 tensor-name API only: tensors are looked up by name (``get_tensor_name``/``get_tensor_mode``),
buffers kept in a dict by name, ``set_input_shape`` when the batch size changes, ``set_tensor_address`` once
per buffer and ``execute_async_v3`` per batch. Pinned host buffers for the input and ``labels`` and device
buffers for every I/O tensor are allocated once, for ``max_batch``, in ``activate()``; a smaller batch
uses the front of the same buffers. Every TensorRT return value is checked; CUDA calls are checked in
``cuda_memory``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from unet_perception.backends.base import Backend, BackendError
from unet_perception.backends.cuda_memory import CudaApi, cuda_unavailable_reason, load_cuda
from unet_perception.backends.factory import BackendOptions
from unet_perception.backends.tensorrt_build import EngineBuilder, Log, engine_for, engine_paths, require_tensorrt
from unet_perception.model_contract import INPUT_NAME, OUTPUT_NAME, ModelInfo

if TYPE_CHECKING:
    import tensorrt


def dims(shape: tensorrt.Dims) -> tuple[int, ...]:
    """TensorRT ``Dims`` as a tuple (-1 for a dynamic axis)."""
    return tuple(int(shape[i]) for i in range(len(shape)))


@dataclass
class TensorBuffer:
    """One I/O tensor's memory, sized for max_batch; ``host`` is pinned (None for outputs we do not read)."""

    name: str
    is_input: bool
    item_shape: tuple[int, ...]   # shape without the batch axis
    dtype: np.dtype
    device: int
    host: np.ndarray | None

    @property
    def item_bytes(self) -> int:
        return int(np.prod(self.item_shape)) * self.dtype.itemsize


class TensorRTBackend(Backend):
    """The contract's model as a TensorRT engine on ``cuda:<gpu_id>``; ``cuda`` and ``builder`` are seams for tests."""

    name = "tensorrt"

    def __init__(self, info: ModelInfo, options: BackendOptions, cuda: CudaApi | None = None,
                 builder: EngineBuilder | None = None, log: Log | None = None) -> None:
        super().__init__(info, options.max_batch)
        self.options = options
        self._cuda = cuda
        self._builder = builder
        self._log = log or logging.getLogger("unet_perception").info
        self._gpu_name = ""
        self._runtime: tensorrt.Runtime | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._context: tensorrt.IExecutionContext | None = None
        self._stream = 0
        self._buffers: dict[str, TensorBuffer] = {}
        self._batch = 0  # the batch size the context's input shape is set to

    @property
    def device(self) -> str:
        gpu = f"cuda:{self.options.gpu_id}"
        return f"{gpu} ({self._gpu_name}, {self.options.precision})" if self._gpu_name else gpu

    def _activate(self) -> None:
        import tensorrt as trt

        require_tensorrt(trt)
        cuda = self._cuda = self._cuda or load_cuda()
        gpu = self.options.gpu_id
        path, key = engine_for(self.info, self.options, cuda, self._log, self._builder, str(trt.__version__))
        self._gpu_name = key.gpu_name
        with cuda.use_device(gpu):
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                built = json.loads(engine_paths(path.parent, key)[1].read_text()).get("tensorrt_version", "?")
                raise BackendError(f"TensorRT {trt.__version__} could not deserialize engine '{path}' (engine built "
                                   f"with TensorRT {built} for {key.gpu_name}); delete it and rebuild: "
                                   f"unet-build-engine {self.info.path} --precision {self.options.precision} "
                                   f"--max-batch {self.max_batch} --cache-dir {path.parent}")
            self._engine = engine
            try:
                specs = self._io_tensors(engine)
                context = engine.create_execution_context()
                if context is None:
                    raise BackendError(f"TensorRT could not create an execution context for '{path}' "
                                       "(out of GPU memory?); close other GPU programs or lower max_batch")
                self._context = context
                self._stream = cuda.create_stream()
                for name, (is_input, item_shape, dtype) in specs.items():
                    self._allocate(cuda, context, name, is_input, item_shape, dtype)
            except BaseException:
                self._deactivate()
                raise
        self._batch = 0

    def _io_tensors(self, engine: tensorrt.ICudaEngine) -> dict[str, tuple[bool, tuple[int, ...], np.dtype]]:
        """Name -> (is input, shape without batch, dtype) for every I/O tensor, checked against the contract."""
        import tensorrt as trt

        h, w = self.input_hw
        expected = {INPUT_NAME: (True, (h, w, 3)), OUTPUT_NAME: (False, (h, w))}
        specs: dict[str, tuple[bool, tuple[int, ...], np.dtype]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = dims(engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if name in expected and (expected[name] != (is_input, shape[1:]) or dtype != np.uint8):
                want_input, want_shape = expected[name]
                raise BackendError(f"engine tensor '{name}' is {'input' if is_input else 'output'} {dtype} "
                                   f"{list(shape)}, the contract needs {'input' if want_input else 'output'} uint8 "
                                   f"[N, {', '.join(map(str, want_shape))}]; rebuild the engine from the model")
            if is_input and name != INPUT_NAME:
                raise BackendError(f"engine has an extra input '{name}'; the contract has only '{INPUT_NAME}'")
            if any(d < 0 for d in shape[1:]):
                raise BackendError(f"engine tensor '{name}' has dynamic non-batch dims {list(shape)}; only the batch "
                                   "axis may be dynamic (re-export with unet-export)")
            specs[name] = (is_input, shape[1:], dtype)
        missing = set(expected) - set(specs)
        if missing:
            raise BackendError(f"engine lacks tensor(s) {sorted(missing)}; rebuild it from a contract model")
        top = engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]
        if top < self.max_batch:
            raise BackendError(f"engine profile allows batch up to {top}, max_batch is {self.max_batch}; "
                               f"rebuild it with --max-batch {self.max_batch}")
        return specs

    def _allocate(self, cuda: CudaApi, context: tensorrt.IExecutionContext, name: str, is_input: bool,
                  item_shape: tuple[int, ...], dtype: np.dtype) -> None:
        what = f"tensor '{name}'"
        nbytes = self.max_batch * int(np.prod(item_shape)) * dtype.itemsize
        device = cuda.alloc_device(nbytes, what)
        host = cuda.alloc_pinned((self.max_batch, *item_shape), dtype) if name in (INPUT_NAME, OUTPUT_NAME) else None
        self._buffers[name] = TensorBuffer(name, is_input, item_shape, dtype, device, host)
        if not context.set_tensor_address(name, device):
            raise BackendError(f"TensorRT set_tensor_address('{name}', {device:#x}) failed")

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        assert self._context is not None and self._cuda is not None
        cuda, context, n = self._cuda, self._context, len(batch)
        image, labels = self._buffers[INPUT_NAME], self._buffers[OUTPUT_NAME]
        assert image.host is not None and labels.host is not None
        with cuda.use_device(self.options.gpu_id):
            if n != self._batch:
                shape = (n, *image.item_shape)
                if not context.set_input_shape(INPUT_NAME, shape):
                    raise BackendError(f"TensorRT set_input_shape('{INPUT_NAME}', {list(shape)}) failed; the engine "
                                       f"profile allows batch 1..{self.max_batch} at {list(image.item_shape)}")
                out_shape = dims(context.get_tensor_shape(OUTPUT_NAME))
                if out_shape != (n, *labels.item_shape):
                    raise BackendError(f"TensorRT output '{OUTPUT_NAME}' has shape {list(out_shape)} for batch {n}, "
                                       f"expected {[n, *labels.item_shape]}")
                self._batch = n
            image.host[:n] = batch
            cuda.copy_to_device(image.device, image.host, n * image.item_bytes, self._stream, f"input '{INPUT_NAME}'")
            if not context.execute_async_v3(self._stream):
                raise BackendError(f"TensorRT execute_async_v3 failed for a batch of {n} on {self.device}")
            cuda.copy_to_host(labels.host, labels.device, n * labels.item_bytes, self._stream,
                              f"output '{OUTPUT_NAME}'")
            cuda.synchronize(self._stream)
            return labels.host[:n].copy(), None  # the pinned buffer is reused by the next batch

    def _deactivate(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            with cuda.use_device(self.options.gpu_id):
                for buf in self._buffers.values():
                    cuda.free_device(buf.device)
                    if buf.host is not None:
                        cuda.free_pinned(buf.host)
                if self._stream:
                    cuda.destroy_stream(self._stream)
        self._buffers.clear()
        self._stream = 0
        self._context = self._engine = self._runtime = None  # context before engine before runtime


def unavailable_reason(options: BackendOptions) -> str | None:
    """None when TensorRT, a CUDA library and a GPU are all here; else which one is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        return "tensorrt Python bindings not importable"
    if not hasattr(trt, "Builder"):
        return "tensorrt Python bindings not importable (only the tensorrt-stubs type stubs are installed)"
    return cuda_unavailable_reason(options.gpu_id)


def create(info: ModelInfo, options: BackendOptions) -> TensorRTBackend:
    return TensorRTBackend(info, options)
