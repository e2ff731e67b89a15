"""Torch backend: the training checkpoint behind the same interface, on CPU or CUDA.

For parity checks, and for GPU users without TensorRT.

It runs ``torch_contract.ContractWrapper`` (the very module the ONNX file is exported from), so its labels
are the reference the exported model is checked against. The checkpoint is ``options.checkpoint`` (the ``best.pt``
``unet-train`` wrote), or a ``.pt`` of the same name beside the ONNX model (``my.onnx`` -> ``my.pt``); the shipped
models come without one. ``precision: fp16``
runs under ``torch.autocast`` on CUDA; fp32 everywhere, with cuDNN's TF32 off on CUDA; anything else is refused.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from unet_perception.backends.base import Backend, BackendError
from unet_perception.backends.factory import BackendOptions
from unet_perception.model_contract import ModelInfo

DEVICES = ("cpu", "cuda")


def checkpoint_path(info: ModelInfo, options: BackendOptions) -> Path:
    return Path(options.checkpoint).expanduser() if options.checkpoint else info.path.with_suffix(".pt")


class TorchBackend(Backend):
    """``ContractWrapper(model)`` from a training checkpoint; ``device`` cpu or cuda (``cuda:<gpu_id>``)."""

    name = "torch"

    def __init__(self, info: ModelInfo, options: BackendOptions) -> None:
        super().__init__(info, options.max_batch)
        if options.device not in DEVICES:
            raise BackendError(f"device must be one of {DEVICES} for the torch backend, got '{options.device}'")
        if options.precision == "int8" or (options.precision == "fp16" and options.device != "cuda"):
            raise BackendError(f"the torch backend runs fp32, or fp16 autocast on cuda; precision "
                               f"'{options.precision}' on device '{options.device}' is not one of them")
        self.options = options
        self.checkpoint = checkpoint_path(info, options)
        if not self.checkpoint.is_file():
            raise BackendError(f"torch backend: checkpoint '{self.checkpoint}' does not exist; set checkpoint to the "
                               "training checkpoint (best.pt) the model was exported from")
        self._torch_device = "cpu" if options.device == "cpu" else f"cuda:{options.gpu_id}"
        self._half = options.device == "cuda" and options.precision == "fp16"
        self._wrapper: Any = None

    @property
    def device(self) -> str:
        return self._torch_device + (" (fp16 autocast)" if self._half else "")

    def _activate(self) -> None:
        import torch

        from unet_perception.torch_contract import ContractWrapper, checkpoint_table, load_checkpoint

        if self.options.threads and self.options.device == "cpu":
            torch.set_num_threads(self.options.threads)
        try:
            model, ckpt = load_checkpoint(self.checkpoint, self._torch_device)
            names = checkpoint_table(ckpt).names
        except (KeyError, RuntimeError, ValueError) as exc:
            raise BackendError(f"torch backend: '{self.checkpoint}' is not a usable training checkpoint "
                               f"({type(exc).__name__}: {exc})") from exc
        if names != self.info.classes.names:
            raise BackendError(f"torch backend: checkpoint '{self.checkpoint}' has classes {names}, the model "
                               f"'{self.info.path}' has {self.info.classes.names}; pass the checkpoint it was "
                               "exported from")
        self._wrapper = ContractWrapper(model).to(self._torch_device).eval()

    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        exact = ieee_fp32_convs() if self.options.device == "cuda" and not self._half else nullcontext()
        with torch.inference_mode(), exact, torch.autocast("cuda", dtype=torch.float16, enabled=self._half):
            labels, confidence = self._wrapper(torch.from_numpy(batch).to(self._torch_device))
        return labels.cpu().numpy(), confidence.cpu().numpy()

    def _deactivate(self) -> None:
        self._wrapper = None


@contextmanager
def ieee_fp32_convs() -> Iterator[None]:
    """cuDNN convolutions in full fp32 inside the block: torch runs them in TF32 by default on Ampere and newer,
    which moves labels away from ONNX Runtime's fp32 ones (the parity this backend is for)."""
    import torch

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old_allow = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old_allow


def unavailable_reason(options: BackendOptions) -> str | None:
    """None when torch imports and, for device cuda, sees a GPU."""
    if importlib.util.find_spec("torch") is None:
        return "torch not importable (pip install -r requirements/train.txt)"
    if options.device == "cuda":
        import torch

        if torch.version.cuda is None:
            return f"CUDA asked but torch {torch.__version__} is a CPU build (install torch's CUDA build)"
        if not torch.cuda.is_available():
            return f"CUDA asked but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
    return None


def create(info: ModelInfo, options: BackendOptions) -> TorchBackend:
    return TorchBackend(info, options)
