"""Pick and create a backend by name; ``auto`` tries TensorRT on a GPU, then ONNX Runtime, and says why.

Each backend module is imported only when chosen, so the package imports without tensorrt, torch or
onnxruntime. A backend module exposes ``create(info, options) -> Backend`` and, for ``auto``,
``unavailable_reason(options) -> str | None`` (None when it can run here).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable

from unet_perception.backends.base import Backend, BackendError
from unet_perception.model_contract import ModelInfo, read_model_info

KINDS = ("auto", "tensorrt", "onnxruntime", "torch")
PRECISIONS = ("fp32", "fp16", "int8")
MODULES = {"tensorrt": "unet_perception.backends.tensorrt",
           "onnxruntime": "unet_perception.backends.onnxruntime",
           "torch": "unet_perception.backends.torch_backend"}
AUTO_ORDER = ("tensorrt", "onnxruntime")
# With device cpu (the default), auto also tries ONNX Runtime's CUDA provider before its CPU one, so GPU
# machines without the TensorRT Python bindings still get the GPU; set backend: onnxruntime to force the CPU.
AUTO_GPU_FIRST = {"onnxruntime": "cuda"}


@dataclass(frozen=True)
class BackendOptions:
    """Every knob a backend may read; each backend ignores what does not apply to it."""

    max_batch: int = 4
    threads: int = 0                  # ONNX Runtime / torch CPU threads; 0 = library default
    device: str = "cpu"               # onnxruntime: cpu | cuda | tensorrt (execution provider); torch: cpu | cuda
    precision: str = "fp16"           # tensorrt (and the ORT TensorRT provider): fp32 | fp16 | int8
    engine_cache_dir: str = ""        # tensorrt: where built engines and the timing cache live
    workspace_mb: int = 1024          # tensorrt: builder workspace limit
    gpu_id: int = 0
    checkpoint: str = ""              # torch: training checkpoint (default: the model's .pt beside the ONNX)
    calibration_data: str = ""        # tensorrt int8: folder of frames for the entropy calibrator

    def validate(self) -> None:
        if self.max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {PRECISIONS}, got '{self.precision}'")
        if self.threads < 0:
            raise BackendError(f"threads must be >= 0, got {self.threads}")
        if self.workspace_mb < 16:
            raise BackendError(f"workspace_mb must be >= 16, got {self.workspace_mb}")
        if self.gpu_id < 0:
            raise BackendError(f"gpu_id must be >= 0, got {self.gpu_id}")


def _module(kind: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(MODULES[kind])


def create_backend(kind: str, model: str | Path | ModelInfo, options: BackendOptions | None = None,
                   log: Callable[[str], None] | None = None) -> Backend:
    """Create (not yet activate) the backend ``kind`` for ``model``; ``log`` receives the auto choice."""
    options = options or BackendOptions()
    options.validate()
    log = log or logging.getLogger("unet_perception").info
    if kind not in KINDS:
        raise BackendError(f"backend must be one of {KINDS}, got '{kind}'")
    info = model if isinstance(model, ModelInfo) else read_model_info(model)
    if kind != "auto":
        return _module(kind).create(info, options)
    reasons: list[str] = []
    chain = []
    for candidate in AUTO_ORDER:
        if candidate in AUTO_GPU_FIRST and options.device == "cpu":
            gpu = AUTO_GPU_FIRST[candidate]
            chain.append((candidate, f"{candidate} ({gpu})", replace(options, device=gpu)))
        chain.append((candidate, candidate, options))
    for candidate, label, opts in chain:
        try:
            reason = _module(candidate).unavailable_reason(opts)
        except ImportError as exc:
            reason = f"cannot import its module ({exc})"
        if reason is None:
            try:
                backend = _module(candidate).create(info, opts)
                backend.activate()
            except Exception as exc:  # a parse/build failure falls through to the next candidate
                reason = f"failed to start ({type(exc).__name__}: {exc})"
            else:
                why = "; ".join(reasons)
                log(f"backend auto: using {label}" + (f" because {why}" if why else ""))
                return backend
        reasons.append(f"{label} is not usable: {reason}")
    raise BackendError("backend auto: no backend can run here: " + "; ".join(reasons))
