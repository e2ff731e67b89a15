"""TensorRT runtime backend: a cached engine (built on first use), run on its own CUDA stream.

TensorRT 10/11 tensor-name API only: tensors are looked up by name (``get_tensor_name``/``get_tensor_mode``),
buffers kept in a dict by name, ``set_input_shape`` when the batch size changes, ``set_tensor_address`` once
per buffer and ``execute_async_v3`` per batch. Pinned host buffers for ``image``, ``labels`` and (when the engine
has it) ``confidence``, and device buffers for every I/O tensor, are allocated once, for ``max_batch``, in
``activate()``; a smaller batch uses the front of the same buffers. Whatever ``activate()`` allocated is freed
when any later step fails. Every TensorRT return value is checked; CUDA calls are checked in ``cuda_memory``.

Batches in flight (``options.in_flight``, the node asks for 3 when its stages overlap): each has a *slot*, its own
execution context, CUDA stream and buffers, because a context holds one batch's shapes and addresses and a
stream orders one batch's copies and kernels. ``submit`` enqueues the upload, ``execute_async_v3`` and the
download on the slot's stream and returns; ``result()`` waits for that stream only. So the copies of one batch
overlap the compute of another, and the caller prepares or publishes meanwhile. A ``submit`` with every slot busy
waits for a ``result()`` to free one. Not yet run on a GPU (docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from unet_perception.backends.base import Backend, BackendError, Pending
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
class Slot:
    """One batch in flight: its execution context, its CUDA stream and its buffers by tensor name."""

    context: tensorrt.IExecutionContext
    stream: int
    buffers: dict[str, TensorBuffer] = field(default_factory=dict)
    batch: int = 0     # the batch size the context's input shape is set to
    busy: bool = False


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
        self._slots: list[Slot] = []
        self._free = threading.Condition()  # guards Slot.busy: submit and result run in different threads

    @property
    def device(self) -> str:
        gpu = f"cuda:{self.options.gpu_id}"
        return f"{gpu} ({self._key.gpu_name}, {self._key.precision})" if self._key else gpu

    @property
    def has_confidence(self) -> bool:
        """Whether the engine has the ``confidence`` output (known once active)."""
        return bool(self._slots) and CONFIDENCE_NAME in self._slots[0].buffers

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
                for _ in range(self.options.in_flight):
                    self._slots.append(self._slot(cuda, engine, path, specs))
            except BaseException:
                self._deactivate()
                raise

    def _slot(self, cuda: CudaApi, engine: tensorrt.ICudaEngine, path: Any,
              specs: dict[str, tuple[bool, tuple[int, ...], np.dtype]]) -> Slot:
        """A context, a stream and buffers for one batch in flight; what it allocated is freed if a step fails."""
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(f"TensorRT could not create an execution context for '{path}' "
                               "(out of GPU memory?); close other GPU programs or lower max_batch")
        slot = Slot(context, cuda.create_stream())
        try:
            for name, (is_input, item_shape, dtype) in specs.items():
                self._allocate(cuda, slot, name, is_input, item_shape, dtype)
        except BaseException:
            _free_slot(cuda, slot, [])  # the allocation's own error is the one to raise
            raise
        return slot

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
            trt_dtype = engine.get_tensor_dtype(name)
            try:
                dtype = np.dtype(trt.nptype(trt_dtype))
            except TypeError as exc:  # bf16, fp8, int4, fp4: no NumPy type (the contract's tensors are uint8)
                raise BackendError(f"engine tensor '{name}' is {trt_dtype}, which NumPy has no "
                                   "type for; the contract's tensors are uint8 and extra outputs must have a NumPy "
                                   f"type ({exc}); rebuild the engine from a model that follows the contract") from None
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

    def _allocate(self, cuda: CudaApi, slot: Slot, name: str, is_input: bool,
                  item_shape: tuple[int, ...], dtype: np.dtype) -> None:
        nbytes = self.max_batch * int(np.prod(item_shape)) * dtype.itemsize
        device = cuda.alloc_device(nbytes, f"tensor '{name}'")
        try:
            host = cuda.alloc_pinned((self.max_batch, *item_shape), dtype) if name in HOST_TENSORS else None
        except BaseException:
            cuda.free_device(device)  # not yet in the slot's buffers, so freeing the slot would miss it
            raise
        slot.buffers[name] = TensorBuffer(name, is_input, item_shape, dtype, device, host)
        if not slot.context.set_tensor_address(name, device):
            raise BackendError(f"TensorRT set_tensor_address('{name}', {device:#x}) failed")

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        slot = self._enqueue(batch)
        return self._collect(slot, len(batch))

    def _submit(self, batch: np.ndarray) -> Pending:
        slot = self._enqueue(batch)
        n = len(batch)
        return Pending(self, n, lambda: self._collect(slot, n))

    def _enqueue(self, batch: np.ndarray) -> Slot:
        """Take a free slot (waiting for one) and enqueue upload, inference and download on its stream."""
        assert self._cuda is not None and self._slots
        with self._free:
            self._free.wait_for(lambda: any(not s.busy for s in self._slots))
            slot = next(s for s in self._slots if not s.busy)
            slot.busy = True
        try:
            self._launch(self._cuda, slot, batch)
        except BaseException:
            self._release(slot)
            raise
        return slot

    def _launch(self, cuda: CudaApi, slot: Slot, batch: np.ndarray) -> None:
        context, n = slot.context, len(batch)
        image = slot.buffers[INPUT_NAME]
        assert image.host is not None
        with cuda.use_device(self.options.gpu_id):
            if n != slot.batch:
                shape = (n, *image.item_shape)
                if not context.set_input_shape(INPUT_NAME, shape):
                    raise BackendError(f"TensorRT set_input_shape('{INPUT_NAME}', {list(shape)}) failed; the engine "
                                       f"profile allows batch 1..{self.max_batch} at {list(image.item_shape)}")
                for out in _outputs(slot):
                    out_shape = dims(context.get_tensor_shape(out.name))
                    if out_shape != (n, *out.item_shape):  # -1: TensorRT could not resolve it from the input
                        raise BackendError(f"TensorRT output '{out.name}' has shape {list(out_shape)} for batch {n}, "
                                           f"expected {[n, *out.item_shape]}"
                                           + ("; -1 means TensorRT could not compute the size from the input shape"
                                              if any(d < 0 for d in out_shape) else ""))
                slot.batch = n
            image.host[:n] = batch
            cuda.copy_to_device(image.device, image.host, n * image.item_bytes, slot.stream, f"input '{INPUT_NAME}'")
            if not context.execute_async_v3(slot.stream):
                raise BackendError(f"TensorRT execute_async_v3 failed for a batch of {n} on {self.device}")
            for out in _outputs(slot):
                assert out.host is not None
                cuda.copy_to_host(out.host, out.device, n * out.item_bytes, slot.stream, f"output '{out.name}'")

    def _collect(self, slot: Slot, n: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Wait for the slot's stream, copy its outputs out of the pinned buffers (the next batch reuses them)."""
        assert self._cuda is not None
        try:
            with self._cuda.use_device(self.options.gpu_id):
                self._cuda.synchronize(slot.stream)
            host = [out.host[:n].copy() for out in _outputs(slot) if out.host is not None]
        finally:
            self._release(slot)
        return host[0], (host[1] if len(host) > 1 else None)

    def _release(self, slot: Slot) -> None:
        with self._free:
            slot.busy = False
            self._free.notify()

    def _deactivate(self) -> None:
        """Free every slot's buffers and stream, each even when another free fails; then raise the first failure."""
        cuda = self._cuda
        failures: list[Exception] = []
        try:
            if cuda is not None:
                with cuda.use_device(self.options.gpu_id):
                    for slot in self._slots:
                        _free_slot(cuda, slot, failures)
        finally:
            self._slots = []  # contexts before the engine before the runtime
            self._engine = self._runtime = None
            self._trt_log = None  # the logger last
        if failures:
            raise failures[0]


def _outputs(slot: Slot) -> list[TensorBuffer]:
    """The outputs copied back to the host, labels first."""
    return [slot.buffers[name] for name in (OUTPUT_NAME, CONFIDENCE_NAME) if name in slot.buffers]


def _free_slot(cuda: CudaApi, slot: Slot, failures: list[Exception]) -> None:
    for buf in slot.buffers.values():
        _attempt(failures, cuda.free_device, buf.device)
        if buf.host is not None:
            _attempt(failures, cuda.free_pinned, buf.host)
    slot.buffers.clear()
    if slot.stream:
        _attempt(failures, cuda.destroy_stream, slot.stream)
        slot.stream = 0


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
