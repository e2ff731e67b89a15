"""The one interface every inference backend implements.

A backend takes a batch of RGB frames already resized to the model's input size and returns class
ids at that size, with the per-pixel confidence when the model has that output. Lifecycle follows
Polygraphy's runners: construct (cheap, validates), ``activate()`` (allocate once), ``infer()`` many times,
``close()`` (free); usable as a context manager.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from unet_perception.model_contract import ModelInfo


class BackendError(RuntimeError):
    """A backend that cannot be created or run, with a message that says why and how to fix it."""


@dataclass(frozen=True)
class Prediction:
    """What a backend returns for a batch, at the model's input size."""

    labels: np.ndarray                 # uint8 [N, H, W] class ids
    confidence: np.ndarray | None      # uint8 [N, H, W] winning softmax probability x 255; None: model has none


class Pending:
    """A submitted batch: ``result()`` waits for its outputs once and checks them against the contract."""

    def __init__(self, backend: Backend, n: int, wait: Callable[[], tuple[np.ndarray, np.ndarray | None]]) -> None:
        self._backend, self._n, self._wait = backend, n, wait

    def result(self) -> Prediction:
        labels, confidence = self._wait()
        return self._backend.check_outputs(self._n, labels, confidence)


class Backend(ABC):
    """``infer(uint8 [N, H, W, 3] RGB) -> Prediction`` at ``input_hw``, N <= ``max_batch``."""

    name: str = "backend"

    def __init__(self, info: ModelInfo, max_batch: int) -> None:
        if max_batch < 1:
            raise BackendError(f"max_batch must be >= 1, got {max_batch}")
        self.info = info
        self.max_batch = max_batch
        self.active = False

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.info.input_hw

    @property
    def device(self) -> str:
        """Where inference runs, in words (``cpu``, ``cuda:0 (NVIDIA H100)``...)."""
        return "cpu"

    def activate(self) -> Backend:
        if not self.active:
            self._activate()
            self.active = True
        return self

    def close(self) -> None:
        if self.active:
            self._deactivate()
            self.active = False

    def infer(self, batch: np.ndarray) -> Prediction:
        return self.submit(batch).result()

    def submit(self, batch: np.ndarray) -> Pending:
        """Start a batch; ``result()`` of what comes back waits for it. A backend that runs on its own device
        (TensorRT) returns at once, so the caller can prepare or publish another batch meanwhile; the others
        compute here and ``result()`` only hands it over."""
        h, w = self.input_hw
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != (h, w, 3):
            raise BackendError(f"{self.name}: batch must be uint8 [N, {h}, {w}, 3], got "
                               f"{batch.dtype} {list(batch.shape)}")
        if not 1 <= batch.shape[0] <= self.max_batch:
            raise BackendError(f"{self.name}: batch of {batch.shape[0]} frames, max_batch is {self.max_batch}")
        if not self.active:
            self.activate()
        return self._submit(np.ascontiguousarray(batch))

    def _submit(self, batch: np.ndarray) -> Pending:
        """Synchronous by default: the work is done before this returns."""
        out = self._infer(batch)
        return Pending(self, len(batch), lambda: out)

    def check_outputs(self, n: int, labels: np.ndarray, confidence: np.ndarray | None) -> Prediction:
        h, w = self.input_hw
        for what, array in (("labels", labels), ("confidence", confidence)):
            if array is not None and (array.dtype != np.uint8 or array.shape != (n, h, w)):
                raise BackendError(f"{self.name}: the model returned {what} {array.dtype} {list(array.shape)}, "
                                   f"the contract says uint8 [{n}, {h}, {w}]; re-export it with unet-export")
        return Prediction(labels, confidence)

    @abstractmethod
    def _activate(self) -> None:
        """Load the model and allocate what inference needs, once."""

    @abstractmethod
    def _infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run a validated, contiguous batch: (labels, confidence or None)."""

    def _deactivate(self) -> None:
        """Free what ``_activate`` allocated."""

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # fallback only; callers should close()
        try:
            self.close()
        except Exception:
            pass
