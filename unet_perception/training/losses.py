"""Losses for imbalanced road scenes: class-weighted cross-entropy plus soft Dice."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def enet_class_weights(fractions: np.ndarray, c: float = 1.02, max_weight: float = 50.0) -> torch.Tensor:
    """ENet's weighting ``1 / ln(c + p)``, normalised so a pixel of average class weighs about 1.

    Rare classes (poles, pedestrians, cyclists: under 1% of pixels) otherwise barely move the loss.
    """
    w = 1.0 / np.log(c + np.asarray(fractions, dtype=np.float64))
    w = np.minimum(w, max_weight)
    w = w / float((w * fractions).sum() or 1.0)
    return torch.as_tensor(w, dtype=torch.float32)


class CEDiceLoss(nn.Module):
    """Weighted cross-entropy + ``dice_weight`` x soft Dice over the classes present in the batch."""

    weight: torch.Tensor

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None,
                 ignore_index: int | None = None, dice_weight: float = 0.5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.dice_weight = dice_weight
        self.register_buffer("weight", weight if weight is not None else torch.ones(num_classes))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        loss = F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index)
        if self.dice_weight <= 0:
            return loss
        valid = target != self.ignore_index
        probs = logits.float().softmax(1) * valid.unsqueeze(1)
        onehot = F.one_hot(torch.where(valid, target, 0), self.num_classes).permute(0, 3, 1, 2)
        onehot = onehot * valid.unsqueeze(1)
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        present = onehot.sum(dims) > 0
        dice = (2 * inter + 1.0) / (denom + 1.0)
        dice_loss = (1 - dice[present]).mean() if present.any() else logits.sum() * 0
        return loss + self.dice_weight * dice_loss
