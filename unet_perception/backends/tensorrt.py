"""TensorRT runtime backend: a cached engine (built on first use), run on its own CUDA stream.

TensorRT 10/11 tensor-name API only: tensors are looked up by name (``get_tensor_name``/``get_tensor_mode``),
buffers kept in a dict by name, ``set_input_shape`` when the batch size changes, ``set_tensor_address`` once
per buffer and ``execute_async_v3`` per batch. Pinned host buffers for ``image``, ``labels`` and (when the engine
has it) ``confidence``, and device buffers for every I/O tensor, are allocated once, for ``max_batch``, in
``activate()``; a smaller batch uses the front of the same buffers. Whatever ``activate()`` allocated is freed
when any later step fails. Every TensorRT return value is checked; CUDA calls are checked in ``cuda_memory``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from unet_perception.backends.base import Backend, BackendError
from unet_perception.backends.cuda_memory import CudaApi, cuda_unavailable_reason, load_cuda
from unet_perception.backends.engine_cache import EngineKey, built_with, read_engine
from unet_perception.backends.factory import BackendOptions
from unet_perception.backends.tensorrt_builder import EngineBuilder, Log, TrtLog, construct, engine_for, \
    require_tensorrt
from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME, ModelInfo

if TYPE_CHECKING:
    import tensorrt

HOST_TENSORS = (INPUT_NAME, OUTPUT_NAME, CONFIDENCE_NAME)  # the tensors copied between host and device


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
        if options.device != "cuda":
            raise BackendError(f"the tensorrt backend runs on CUDA only; device is '{options.device}': set device "
                               "to cuda (or use backend onnxruntime for the CPU)")
        self.options = options
        self._cuda = cuda
        self._builder = builder
        self._log = log or logging.getLogger("unet_perception").info
        self._key: EngineKey | None = None  # the engine's cache key, once active
        self._trt_log: TrtLog | None = None
        self._runtime: tensorrt.Runtime | None = None
        self._engine: tensorrt.ICudaEngine | None = None
        self._context: tensorrt.IExecutionContext | None = None
        self._stream = 0
        self._buffers: dict[str, TensorBuffer] = {}
        self._batch = 0  # the batch size the context's input shape is set to

    @property
    def device(self) -> str:
        gpu = f"cuda:{self.options.gpu_id}"
        return f"{gpu} ({self._key.gpu_name}, {self._key.precision})" if self._key else gpu

    @property
    def has_confidence(self) -> bool:
        """Whether the engine has the ``confidence`` output (known once active)."""
        return CONFIDENCE_NAME in self._buffers

    def _activate(self) -> None:
        import tensorrt as trt

        version = require_tensorrt(trt)
        cuda = self._cuda = self._cuda or load_cuda()
        gpu = self.options.gpu_id
        path, key = engine_for(self.info, self.options, cuda, self._log, version, self._builder)
        self._key = key
        with cuda.use_device(gpu):
            trt_log = self._trt_log = TrtLog(self._log)  # must outlive the runtime, engine and context
            self._runtime = construct("Runtime", trt.Runtime, trt_log, gpu)
            engine = self._runtime.deserialize_cuda_engine(read_engine(path))  # sha256-checked bytes
            if engine is None:
                self._runtime = None
                raise BackendError(f"TensorRT {version} could not deserialize engine '{path}' (engine built with "
                                   f"TensorRT {built_with(path)} for {key.gpu_name}): {trt_log.reason()}; delete it "
                                   f"and rebuild: unet-build-engine {self.info.path} --precision "
                                   f"{key.precision} --max-batch {self.max_batch} --cache-dir {path.parent}")
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
        contract = {INPUT_NAME: (True, (h, w, 3)), OUTPUT_NAME: (False, (h, w)), CONFIDENCE_NAME: (False, (h, w))}
        specs: dict[str, tuple[bool, tuple[int, ...], np.dtype]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = dims(engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            if any(d < 0 for d in shape[1:]):  # before the contract check: "rebuild" would not help here
                raise BackendError(f"engine tensor '{name}' has dynamic non-batch dims {list(shape)}; only the batch "
                                   "axis may be dynamic: the model's output size is computed in the graph (a Shape "
                                   "chain). Re-export it with unet-export (static output H/W) or wrap it with "
                                   "unet-import, then rebuild")
            if name in contract and (contract[name] != (is_input, shape[1:]) or dtype != np.uint8):
                want_input, want_shape = contract[name]
                raise BackendError(f"engine tensor '{name}' is {'input' if is_input else 'output'} {dtype} "
                                   f"{list(shape)}, the contract needs {'input' if want_input else 'output'} uint8 "
                                   f"[N, {', '.join(map(str, want_shape))}]; rebuild the engine from the model")
            if is_input and name != INPUT_NAME:
                raise BackendError(f"engine has an extra input '{name}'; the contract has only '{INPUT_NAME}'")
            specs[name] = (is_input, shape[1:], dtype)
        missing = {INPUT_NAME, OUTPUT_NAME} - set(specs)
        if missing:
            raise BackendError(f"engine lacks tensor(s) {sorted(missing)}; rebuild it from a contract model")
        top = engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]
        if top < self.max_batch:
            raise BackendError(f"engine profile allows batch up to {top}, max_batch is {self.max_batch}; "
                               f"rebuild it with --max-batch {self.max_batch}")
        return specs

    def _allocate(self, cuda: CudaApi, context: tensorrt.IExecutionContext, name: str, is_input: bool,
                  item_shape: tuple[int, ...], dtype: np.dtype) -> None:
        nbytes = self.max_batch * int(np.prod(item_shape)) * dtype.itemsize
        device = cuda.alloc_device(nbytes, f"tensor '{name}'")
        try:
            host = cuda.alloc_pinned((self.max_batch, *item_shape), dtype) if name in HOST_TENSORS else None
        except BaseException:
            cuda.free_device(device)  # not yet in _buffers, so _deactivate would not free it
            raise
        self._buffers[name] = TensorBuffer(name, is_input, item_shape, dtype, device, host)
        if not context.set_tensor_address(name, device):
            raise BackendError(f"TensorRT set_tensor_address('{name}', {device:#x}) failed")

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        assert self._context is not None and self._cuda is not None
        cuda, context, n = self._cuda, self._context, len(batch)
        image = self._buffers[INPUT_NAME]
        outputs = [self._buffers[name] for name in (OUTPUT_NAME, CONFIDENCE_NAME) if name in self._buffers]
        assert image.host is not None
        with cuda.use_device(self.options.gpu_id):
            if n != self._batch:
                shape = (n, *image.item_shape)
                if not context.set_input_shape(INPUT_NAME, shape):
                    raise BackendError(f"TensorRT set_input_shape('{INPUT_NAME}', {list(shape)}) failed; the engine "
                                       f"profile allows batch 1..{self.max_batch} at {list(image.item_shape)}")
                for out in outputs:
                    out_shape = dims(context.get_tensor_shape(out.name))
                    if out_shape != (n, *out.item_shape):  # -1: TensorRT could not resolve it from the input
                        raise BackendError(f"TensorRT output '{out.name}' has shape {list(out_shape)} for batch {n}, "
                                           f"expected {[n, *out.item_shape]}"
                                           + ("; -1 means TensorRT could not compute the size from the input shape"
                                              if any(d < 0 for d in out_shape) else ""))
                self._batch = n
            image.host[:n] = batch
            cuda.copy_to_device(image.device, image.host, n * image.item_bytes, self._stream, f"input '{INPUT_NAME}'")
            if not context.execute_async_v3(self._stream):
                raise BackendError(f"TensorRT execute_async_v3 failed for a batch of {n} on {self.device}")
            for out in outputs:
                assert out.host is not None
                cuda.copy_to_host(out.host, out.device, n * out.item_bytes, self._stream, f"output '{out.name}'")
            cuda.synchronize(self._stream)
            # copies: the pinned buffers are reused by the next batch
            host = [out.host[:n].copy() for out in outputs if out.host is not None]
        return host[0], (host[1] if len(host) > 1 else None)

    def _deactivate(self) -> None:
        """Free every buffer and the stream, each even when another free fails; then raise the first failure."""
        cuda = self._cuda
        failures: list[Exception] = []
        try:
            if cuda is not None:
                with cuda.use_device(self.options.gpu_id):
                    for buf in self._buffers.values():
                        _attempt(failures, cuda.free_device, buf.device)
                        if buf.host is not None:
                            _attempt(failures, cuda.free_pinned, buf.host)
                    if self._stream:
                        _attempt(failures, cuda.destroy_stream, self._stream)
        finally:
            self._buffers.clear()
            self._stream = 0
            self._context = self._engine = self._runtime = None  # context before engine before runtime
            self._trt_log = None  # the logger last
        if failures:
            raise failures[0]


def _attempt(failures: list[Exception], free: Callable[[Any], None], what: Any) -> None:
    try:
        free(what)
    except Exception as exc:  # keep freeing the rest; the caller raises the first failure
        failures.append(exc)


def unavailable_reason(options: BackendOptions) -> str | None:
    """None when TensorRT, a CUDA library and a GPU are all here and ``device`` is cuda; else why not."""
    if options.device != "cuda":
        return f"device is '{options.device}' (TensorRT runs on cuda only)"
    try:
        import tensorrt as trt
    except ImportError:
        return "tensorrt Python bindings not importable"
    try:
        require_tensorrt(trt)
    except BackendError as exc:
        return str(exc).split(";")[0]
    return cuda_unavailable_reason(options.gpu_id)


def create(info: ModelInfo, options: BackendOptions) -> TensorRTBackend:
    return TensorRTBackend(info, options)
