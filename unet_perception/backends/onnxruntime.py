"""ONNX Runtime backend: the embedded CPU default, and the CUDA execution provider on a GPU (onnxruntime-gpu).

``options.device`` picks the provider: ``cpu`` -> CPU; ``cuda`` -> CUDA (the CPU provider stays behind it only
for the few nodes CUDA lacks; a session that silently lost CUDA is refused). ``options.precision`` picks the
per-precision ONNX file (``precision_onnx``): the model, its fp16 conversion or its int8 Q/DQ twin. TensorRT
runs through the tensorrt backend, not ONNX Runtime's TensorRT provider. ``onnxruntime`` is imported lazily.
"""

from __future__ import annotations

import logging
import queue
import re
from typing import Any

import numpy as np

from unet_perception.backends.base import Backend, BackendError
from unet_perception.backends.engine_cache import cache_dir_for
from unet_perception.backends.factory import BackendOptions, usable_cores
from unet_perception.backends.precision_onnx import onnx_for_precision
from unet_perception.model_contract import CONFIDENCE_NAME, INPUT_NAME, OUTPUT_NAME, ModelInfo

DEVICES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_GPU_HINT = ("install the GPU build: `pip uninstall onnxruntime && pip install onnxruntime-gpu` "
             "(with CUDA and cuDNN libraries matching it), or set device to cpu")


def _missing_provider(device: str) -> str | None:
    """Why the provider for ``device`` cannot be used here, or None."""
    import onnxruntime as ort

    if device not in DEVICES:
        return f"device must be one of {tuple(DEVICES)} for onnxruntime, got '{device}'"
    available = ort.get_available_providers()
    if DEVICES[device] not in available:
        return (f"onnxruntime {ort.__version__} has no {DEVICES[device]} (available: {', '.join(available)}); "
                + _GPU_HINT)
    return None


def _providers(options: BackendOptions) -> list[Any]:
    if options.device == "cpu":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": options.gpu_id}), "CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    """An ``onnxruntime.InferenceSession`` on the contract's ``image`` -> ``labels``."""

    name = "onnxruntime"

    def __init__(self, info: ModelInfo, options: BackendOptions) -> None:
        super().__init__(info, options.max_batch)
        reason = unavailable_reason(options)
        if reason is not None:
            raise BackendError(f"onnxruntime backend: {reason}")
        self.options = options
        self._providers = _providers(options)
        self.sessions: list[Any] = []  # InferenceSessions: ``concurrent`` of them, or 1 shared by one-thread runs
        self._free: queue.SimpleQueue[Any] = queue.SimpleQueue()  # each run takes one and gives it back
        self._fetch = [OUTPUT_NAME]
        self._precision = options.precision  # the precision the model file runs at, known once active

    @property
    def device(self) -> str:
        where = "cpu" if self.options.device == "cpu" else f"cuda:{self.options.gpu_id}"
        return where if self._precision == "fp32" else f"{where} ({self._precision})"

    def _activate(self) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.options.threads > 0:
            so.intra_op_num_threads = self.options.threads
        elif self.options.concurrent > 1:  # the library's default (a thread per core) for each would oversubscribe
            so.intra_op_num_threads = max(1, usable_cores() // self.options.concurrent)
        for key, value in spin_entries(self.options.spinning, self.options.spin_us, ort.__version__).items():
            so.add_session_config_entry(key, value)
        path, self._precision = onnx_for_precision(self.info.path, self.options.precision,
                                                   cache_dir_for(self.options.engine_cache_dir))
        try:
            # Concurrent runs of one session share its intra-op pool, so each caller gets a session of its own,
            # except with one thread: ONNX Runtime then runs on the calling thread and the callers share one.
            sessions = [ort.InferenceSession(str(path), so, providers=self._providers)
                        for _ in range(1 if self.options.threads == 1 else self.options.concurrent)]
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BackendError(f"onnxruntime cannot load '{path}': {exc}") from exc
        session = sessions[0]
        wanted = DEVICES[self.options.device]
        if wanted not in session.get_providers():
            # ORT silently drops a provider whose libraries fail to load; running on CPU unasked would hide it.
            raise BackendError(f"onnxruntime could not start {wanted} (session uses {session.get_providers()}); "
                               "check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed and "
                               "on LD_LIBRARY_PATH (docs/tensorrt.md), or set device to cpu")
        self._check_io(session)
        # What to fetch comes from the session (the fp16/int8 file may differ from the model it stands for).
        has_confidence = CONFIDENCE_NAME in {o.name for o in session.get_outputs()}
        if self.info.has_confidence and not has_confidence:
            raise BackendError(f"'{path}' has no '{CONFIDENCE_NAME}' output but '{self.info.path}' "
                               "has; re-create it from that model (unet-quantize, or delete the fp16 cache)")
        self._fetch = [OUTPUT_NAME, CONFIDENCE_NAME] if has_confidence else [OUTPUT_NAME]
        self.sessions, self._free = sessions, queue.SimpleQueue()
        for i in range(self.options.concurrent):  # a shared one-thread session is in the queue once per caller
            self._free.put(sessions[i % len(sessions)])

    def _check_io(self, session: Any) -> None:
        """The session's tensors must be the contract's: uint8 image [N, H, W, 3] -> uint8 labels [N, H, W]."""
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        fix = "re-export the model with unet-export"
        if list(inputs) != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise BackendError(f"model '{self.info.path}' has inputs {list(inputs)} and outputs {list(outputs)}; "
                               f"the contract needs the single input '{INPUT_NAME}' and output '{OUTPUT_NAME}'; {fix}")
        h, w = self.input_hw
        checked = [(inputs[INPUT_NAME], [None, h, w, 3]), (outputs[OUTPUT_NAME], [None, h, w])]
        if CONFIDENCE_NAME in outputs:
            checked.append((outputs[CONFIDENCE_NAME], [None, h, w]))
        for tensor, want in checked:
            if tensor.type != "tensor(uint8)":
                raise BackendError(f"model '{self.info.path}': '{tensor.name}' is {tensor.type}, the contract "
                                   f"needs tensor(uint8); {fix}")
            shape = list(tensor.shape)
            static = [d if isinstance(d, int) else None for d in shape]
            if len(shape) != len(want) or any(s is not None and x is not None and s != x
                                              for s, x in zip(static, want)):
                raise BackendError(f"model '{self.info.path}': '{tensor.name}' has shape {shape}, its metadata "
                                   f"says {['N', *want[1:]]}; {fix}")
            if static[0] is not None and (static[0], self.max_batch) != (1, 1):
                raise BackendError(f"model '{self.info.path}' has a fixed batch of {static[0]}; export it with a "
                                   "dynamic batch axis (unet-export does), or use max_batch 1 with a batch-1 model")

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        free = self._free  # the queue this session came from, even if the backend is closed meanwhile
        session = free.get()  # one is there whenever no more than ``concurrent`` callers run
        try:
            outputs = session.run(self._fetch, {INPUT_NAME: batch})
        finally:
            free.put(session)
        return outputs[0], outputs[1] if len(outputs) > 1 else None

    def _deactivate(self) -> None:
        self.sessions, self._free = [], queue.SimpleQueue()


SPIN_BOUND_SINCE = (1, 26)  # the first onnxruntime with session.intra_op.spin_duration_us


def spin_entries(spinning: bool, spin_us: int, version: str) -> dict[str, str]:
    """The session config entries for the pool threads' wait between parallel sections.

    A spinning thread starts the next section (the next operator of the same run) without being woken, which on a
    VM costs a few ms per run; after the run it holds its core, which the node's other threads (receive, publish)
    and other processes then wait for. ``spin_us`` bounds the spin: long enough to bridge the gaps inside a run,
    over soon after it (docs/performance.md). 0 = onnxruntime's own spin, which lasts most of the gap between runs.
    An onnxruntime older than 1.26 cannot bound it, so there a bounded spin is no spin.
    """
    bounded = spinning and spin_us > 0
    if bounded and _major_minor(version) < SPIN_BOUND_SINCE:
        logging.getLogger("unet_perception").warning(
            f"onnxruntime {version} cannot bound the spin of idle threads (spin_us needs 1.26 or later): they "
            "sleep at once instead; spin_us 0 lets them spin as long as onnxruntime does")
        spinning = bounded = False
    entries = {"session.intra_op.allow_spinning": "1" if spinning else "0"}
    if bounded:
        entries["session.intra_op.spin_duration_us"] = str(spin_us)
    return entries


def _major_minor(version: str) -> tuple[int, int]:
    """``"1.32.0"`` / ``"1.20.0+cu118"`` -> (1, 32); (0, 0) when unreadable (treated as old)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def unavailable_reason(options: BackendOptions) -> str | None:
    """None when onnxruntime imports and has the provider ``options.device`` asks for."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not importable ({exc}); pip install onnxruntime (or onnxruntime-gpu)"
    return _missing_provider(options.device)


def create(info: ModelInfo, options: BackendOptions) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(info, options)
