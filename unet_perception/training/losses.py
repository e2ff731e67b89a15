"""Losses for imbalanced road scenes: class-weighted cross-entropy (optionally OHEM) plus soft Dice and the
Lovasz-softmax term (a surrogate of each class's IoU, the metric we report)."""

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


def lovasz_softmax(probs: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al., CVPR 2018), mean over the classes present in ``target``.

    For class c the pixel errors ``|[y == c] - p_c|`` are sorted in decreasing order and weighted by the
    increments of the Jaccard loss ``1 - |fg & kept| / |fg | wrong|`` as the sorted pixels are counted wrong one
    by one: the Lovasz extension of the IoU loss, which is tight on thin classes where a few pixels decide it.
    ``probs`` [N, C, H, W] softmax output; ``target`` [N, H, W] class ids.
    """
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    t = target.reshape(-1).long()
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    losses = []
    for cls in range(c):
        fg = (t == cls).to(p.dtype)
        if fg.sum() == 0:
            continue
        errors, order = (fg - p[:, cls]).abs().sort(descending=True)
        fg_sorted = fg[order]
        total = fg_sorted.sum()
        intersection = total - fg_sorted.cumsum(0)  # foreground still counted right
        union = total + (1 - fg_sorted).cumsum(0)  # foreground plus background counted wrong so far
        jaccard = 1 - intersection / union
        steps = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(torch.dot(errors, steps))
    return torch.stack(losses).mean() if losses else probs.sum() * 0


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                       ignore_index: int, keep: float) -> torch.Tensor:
    """Cross-entropy over the ``keep`` fraction of labelled pixels with the highest loss (online hard example
    mining): the easy road and sky pixels stop diluting the gradient of the thin classes' edges.
    With class weights it is the weighted mean over the kept pixels, as ``F.cross_entropy`` weighs them all."""
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0
    pixel_weight = torch.ones_like(per_pixel) if weight is None else weight[torch.where(valid, target, 0)]
    losses, weights = per_pixel[valid], pixel_weight[valid]
    k = max(1, int(round(keep * losses.numel())))
    hardest = losses.topk(k).indices
    return losses[hardest].sum() / weights[hardest].sum()


class CEDiceLoss(nn.Module):
    """Weighted cross-entropy + ``dice_weight`` x soft Dice over the classes present in the batch
    + ``lovasz_weight`` x Lovasz-softmax; ``ohem_keep`` < 1 keeps only that fraction of hardest pixels in the
    cross-entropy."""

    weight: torch.Tensor

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None,
                 ignore_index: int | None = None, dice_weight: float = 0.5, lovasz_weight: float = 0.0,
                 ohem_keep: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < ohem_keep <= 1.0:
            raise ValueError(f"ohem_keep is the fraction of pixels kept, in (0, 1], got {ohem_keep}")
        self.num_classes = num_classes
        self.ignore_index = -100 if ignore_index is None else ignore_index
        self.dice_weight = dice_weight
        self.lovasz_weight = lovasz_weight
        self.ohem_keep = ohem_keep
        self.register_buffer("weight", weight if weight is not None else torch.ones(num_classes))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        logits = logits.float()
        if self.ohem_keep < 1.0:
            loss = ohem_cross_entropy(logits, target, self.weight, self.ignore_index, self.ohem_keep)
        else:
            loss = F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_index)
        if self.dice_weight <= 0 and self.lovasz_weight <= 0:
            return loss
        probs = logits.softmax(1)
        if self.lovasz_weight > 0:
            loss = loss + self.lovasz_weight * lovasz_softmax(probs, target, self.ignore_index)
        if self.dice_weight <= 0:
            return loss
        valid = target != self.ignore_index
        probs = probs * valid.unsqueeze(1)
        onehot = F.one_hot(torch.where(valid, target, 0), self.num_classes).permute(0, 3, 1, 2)
        onehot = onehot * valid.unsqueeze(1)
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        present = onehot.sum(dims) > 0
        dice = (2 * inter + 1.0) / (denom + 1.0)
        dice_loss = (1 - dice[present]).mean() if present.any() else logits.sum() * 0
        return loss + self.dice_weight * dice_loss
