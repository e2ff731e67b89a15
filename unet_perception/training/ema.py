"""Exponential moving average of a model's weights: the copy that is evaluated, checkpointed and exported.

Averaging the last few thousand steps smooths the noise of small-batch training, and it costs one extra copy of
the weights and one multiply-add per step; no extra forward pass.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class ModelEMA:
    """``ema = d * ema + (1 - d) * weights`` after every optimizer step, with the decay
    ``d_t = min(decay, (1 + t) / (10 + t))`` at update t = 1, 2, ...: early on the average follows the weights
    closely (a fixed 0.999 would keep the random decoder for a thousand steps), later it averages about
    ``1 / (1 - decay)`` steps. Batch-norm running statistics are averaged the same way; integer buffers (the
    batch counter) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), e.g. 0.999; got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def rate(self, update: int) -> float:
        """The decay used at update number ``update`` (1-based)."""
        return min(self.decay, (1 + update) / (10 + update))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.rate(self.updates)
        live = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = live[name].detach()
            if avg.is_floating_point():
                avg.mul_(d).add_(new.to(avg.dtype), alpha=1 - d)
            else:
                avg.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load(self, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Restore from a checkpoint: the averaged ``weights`` and the update count."""
        self.module.load_state_dict(weights)
        self.updates = int(state["updates"])
