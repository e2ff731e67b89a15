"""Pick and create a backend by name; ``auto`` picks by ``device`` and says why.

- ``device: cpu`` (the default): ``auto`` is ONNX Runtime on the CPU. Nothing touches CUDA.
- ``device: cuda``: ``auto`` tries TensorRT, then ONNX Runtime's CUDA provider, and logs why it skipped any; it
  never falls back to the CPU unasked (an error lists every reason instead).

Each backend module is imported only when chosen, so the package imports without tensorrt, torch or
onnxruntime. A backend module exposes ``create(info, options) -> Backend`` and, for ``auto``,
``unavailable_reason(options) -> str | None`` (None when it can run here).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from unet_perception.backends.base import Backend, BackendError
from unet_perception.model_contract import ModelInfo, read_model_info

KINDS = ("auto", "tensorrt", "onnxruntime", "torch")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "int8")
MODULES = {"tensorrt": "unet_perception.backends.tensorrt",
           "onnxruntime": "unet_perception.backends.onnxruntime",
           "torch": "unet_perception.backends.torch_backend"}
AUTO_ORDER = {"cpu": ("onnxruntime",), "cuda": ("tensorrt", "onnxruntime")}


@dataclass(frozen=True)
class BackendOptions:
    """Every knob a backend reads. Common ones first; the backend-specific ones say whose they are."""

    max_batch: int = 4
    device: str = "cpu"               # cpu | cuda, for every backend (tensorrt: cuda only)
    gpu_id: int = 0                   # device cuda: which GPU
    precision: str = "fp32"           # fp32 | fp16 | int8: which per-precision ONNX file runs (torch: fp16 = autocast)
    threads: int = 0                  # device cpu: ONNX Runtime / torch threads; 0 = library default
    spinning: bool = True             # onnxruntime cpu: an idle pool thread spins before it sleeps ...
    spin_us: int = 100                # ... at most this many microseconds (as the node); 0 = as long as ORT spins
    engine_cache_dir: str = ""        # tensorrt engines and timing cache, and the fp16 ONNX; "" = ~/.cache/...
    workspace_mb: int = 1024          # tensorrt: builder workspace limit
    checkpoint: str = ""              # torch: training checkpoint (default: the model's .pt beside the ONNX)
    in_flight: int = 1                # tensorrt: batches submitted at once, each with its own context and stream
    concurrent: int = 1               # onnxruntime: threads that may call infer at once (the node's workers)

    def validate(self) -> None:
        if self.max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.device not in DEVICES:
            raise BackendError(f"device must be one of {DEVICES}, got '{self.device}'")
        if self.precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        if self.threads < 0:
            raise BackendError(f"threads must be >= 0, got {self.threads}")
        if self.spin_us < 0:
            raise BackendError(f"spin_us must be >= 0, got {self.spin_us}")
        if self.concurrent < 1:
            raise BackendError(f"concurrent must be >= 1, got {self.concurrent}")
        if self.in_flight < 1:
            raise BackendError(f"in_flight must be >= 1, got {self.in_flight}")
        if self.workspace_mb < 16:
            raise BackendError(f"workspace_mb must be >= 16, got {self.workspace_mb}")
        if self.gpu_id < 0:
            raise BackendError(f"gpu_id must be >= 0, got {self.gpu_id}")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which taskset and containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def backend_module(kind: str) -> ModuleType:
    """The module of backend ``kind`` (imported on first use)."""
    return importlib.import_module(MODULES[kind])


def create_backend(kind: str, model: str | Path | ModelInfo, options: BackendOptions | None = None,
                   log: Callable[[str], None] | None = None) -> Backend:
    """Create the backend ``kind`` for ``model`` (``auto``: created and activated); ``log`` gets the auto choice."""
    options = options or BackendOptions()
    options.validate()
    log = log or logging.getLogger("unet_perception").info
    if kind not in KINDS:
        raise BackendError(f"backend must be one of {KINDS}, got '{kind}'")
    info = model if isinstance(model, ModelInfo) else read_model_info(model)
    if kind != "auto":
        return backend_module(kind).create(info, options)
    reasons: list[str] = []
    for candidate in AUTO_ORDER[options.device]:
        try:
            reason = backend_module(candidate).unavailable_reason(options)
        except ImportError as exc:
            reason = f"cannot import its module ({exc})"
        if reason is None:
            try:
                backend = backend_module(candidate).create(info, options)
                backend.activate()
            except Exception as exc:  # a parse/build failure falls through to the next candidate
                reason = f"failed to start ({type(exc).__name__}: {exc})"
            else:
                why = "; ".join(reasons)
                log(f"backend auto: using {candidate} on {options.device}" + (f" because {why}" if why else ""))
                return backend
        reasons.append(f"{candidate} is not usable: {reason}")
    hint = "; set device cpu to run on the CPU" if options.device == "cuda" else ""
    raise BackendError(f"backend auto: no backend can run on {options.device} here: " + "; ".join(reasons) + hint)
