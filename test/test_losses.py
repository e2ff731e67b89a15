"""The loss terms against values computed by hand or from their definitions: Lovasz-softmax, OHEM, the sum."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from unet_perception.training.losses import CEDiceLoss, lovasz_softmax, ohem_cross_entropy


def _probs(rows: list[list[float]]) -> torch.Tensor:
    """Per-pixel class probabilities [[p0, p1, ...], ...] as a [1, C, 1, P] tensor."""
    return torch.tensor(rows, dtype=torch.float64).T.reshape(1, len(rows[0]), 1, len(rows))


def test_lovasz_softmax_matches_a_hand_computed_value() -> None:
    # Pixel a: truth 0, p = (0.8, 0.2); pixel b: truth 1, p = (0.4, 0.6).
    # Class 0: errors b 0.4 (a false positive), a 0.2. Counting b wrong: IoU loss 1 - 1/2 = 0.5; then a: 1.
    #          0.4 * 0.5 + 0.2 * (1 - 0.5) = 0.3.
    # Class 1: errors b 0.4 (its only pixel), a 0.2. Counting b wrong: loss 1; then a: still 1.
    #          0.4 * 1 + 0.2 * 0 = 0.4.          Mean over the two classes present: 0.35.
    loss = lovasz_softmax(_probs([[0.8, 0.2], [0.4, 0.6]]), torch.tensor([[[0, 1]]]))
    assert loss.item() == pytest.approx(0.35, abs=1e-12)


def _lovasz_by_definition(p: np.ndarray, t: np.ndarray, classes: int) -> float:
    """The Lovasz extension of the Jaccard loss from its definition: sum over the error-sorted pixels of
    error x (Jaccard loss of the first k pixels counted wrong - of the first k - 1), sets built explicitly."""
    per_class = []
    for c in range(classes):
        fg = {i for i in range(len(t)) if t[i] == c}
        if not fg:
            continue
        errors = [abs((t[i] == c) - p[i, c]) for i in range(len(t))]
        order = sorted(range(len(t)), key=lambda i: -errors[i])

        def jaccard_loss(wrong: set[int], fg: set[int] = fg) -> float:
            return 1 - len(fg - wrong) / len(fg | wrong)

        total, before = 0.0, 0.0
        for k in range(1, len(t) + 1):
            now = jaccard_loss(set(order[:k]))
            total += errors[order[k - 1]] * (now - before)
            before = now
        per_class.append(total)
    return sum(per_class) / len(per_class)


@pytest.mark.parametrize("seed", range(5))
def test_lovasz_softmax_equals_its_definition_and_skips_ignored_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes, pixels, ignore = 4, 9, 255
    p = rng.dirichlet(np.ones(classes), size=pixels)
    t = rng.integers(0, classes, size=pixels)
    t[rng.random(pixels) < 0.25] = ignore
    keep = t != ignore
    expected = _lovasz_by_definition(p[keep], t[keep], classes)
    got = lovasz_softmax(_probs(p.tolist()), torch.tensor(t).reshape(1, 1, pixels), ignore)
    assert got.item() == pytest.approx(expected, abs=1e-9)


def test_lovasz_is_zero_for_a_perfect_prediction() -> None:
    assert lovasz_softmax(_probs([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[[0, 1]]])).item() == 0.0


def test_ohem_keeps_the_hardest_fraction_of_pixels() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.5, 0.5]]).T.reshape(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 1, 1, 9]]])  # the last pixel is ignored
    # Cross-entropy -log softmax of the truth, pixel by pixel, by hand.
    ce = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(1)), math.log(1 + math.exp(-3)), math.log(1 + math.exp(1))]
    half = ohem_cross_entropy(logits, target, None, ignore_index=9, keep=0.5)
    assert half.item() == pytest.approx((ce[1] + ce[3]) / 2, rel=1e-6)  # the two wrong pixels
    weight = torch.tensor([1.0, 3.0])
    weighted = ohem_cross_entropy(logits, target, weight, ignore_index=9, keep=0.5)
    # Kept: pixel 1 (truth 0, loss 1.0 x ce) and pixel 3 (truth 1, loss 3.0 x ce), weighted mean.
    assert weighted.item() == pytest.approx((ce[1] + 3 * ce[3]) / (1 + 3), rel=1e-6)
    everything = ohem_cross_entropy(logits, target, weight, ignore_index=9, keep=1.0)
    assert everything.item() == pytest.approx((ce[0] + ce[1] + 3 * ce[2] + 3 * ce[3]) / 8, rel=1e-6)


def test_loss_options_add_their_terms() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 4, (2, 4, 5))  # 3 is ignored
    plain = CEDiceLoss(3, ignore_index=3, dice_weight=0.0)(logits, target)
    with_lovasz = CEDiceLoss(3, ignore_index=3, dice_weight=0.0, lovasz_weight=0.7)(logits, target)
    lovasz = lovasz_softmax(logits.softmax(1), target, 3)
    assert with_lovasz.item() == pytest.approx(plain.item() + 0.7 * lovasz.item(), rel=1e-6)
    hard = CEDiceLoss(3, ignore_index=3, dice_weight=0.0, ohem_keep=0.3)(logits, target)
    assert hard.item() > plain.item()  # the hardest 30% of pixels have more than the average loss
    with pytest.raises(ValueError, match="ohem_keep"):
        CEDiceLoss(3, ohem_keep=0.0)


def test_lovasz_gradient_flows_through_every_pixel_of_the_present_classes() -> None:
    logits = torch.randn(1, 3, 2, 3, requires_grad=True)
    target = torch.tensor([[[0, 1, 1], [0, 2, 2]]])
    lovasz_softmax(logits.softmax(1), target).backward()
    assert logits.grad is not None and all(logits.grad[0, :, y, x].abs().sum() > 0
                                           for y, x in itertools.product(range(2), range(3)))
