"""EMA of the weights: the update formula by hand, and in unet-train the average is what is scored and saved."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DATA
from torch import nn

from unet_perception.torch_contract import load_checkpoint
from unet_perception.training import train
from unet_perception.training.ema import ModelEMA

CAMVID = DATA / "camvid"


def _one_weight(value: float) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def _weight(module: nn.Module) -> float:
    return float(module.state_dict()["weight"].item())


def _set(layer: nn.Linear, value: float) -> None:
    with torch.no_grad():
        layer.weight.fill_(value)


def test_ema_update_matches_a_hand_calculation() -> None:
    live = _one_weight(1.0)
    ema = ModelEMA(live, decay=0.9)
    _set(live, 3.0)
    ema.update(live)  # d_1 = min(0.9, 2/11): 2/11 * 1 + 9/11 * 3 = 29/11
    assert _weight(ema.module) == pytest.approx(29 / 11, rel=1e-6)
    _set(live, 5.0)
    ema.update(live)  # d_2 = min(0.9, 3/12) = 0.25: 0.25 * 29/11 + 0.75 * 5
    assert _weight(ema.module) == pytest.approx(0.25 * 29 / 11 + 3.75, rel=1e-6)
    assert live.weight.item() == 5.0  # the live weights are not touched
    # The warm-up ends where (1 + t) / (10 + t) reaches the decay: t = 80 for 0.9.
    assert ema.rate(79) == pytest.approx(80 / 89) and ema.rate(80) == 0.9 and ema.rate(10_000) == 0.9


def test_ema_averages_batch_norm_statistics_and_copies_the_counter() -> None:
    live = nn.BatchNorm1d(2)
    ema = ModelEMA(live, decay=0.5)
    live.state_dict()["running_mean"].fill_(4.0)  # state_dict tensors share storage with the buffers
    live.state_dict()["num_batches_tracked"].fill_(7)
    ema.update(live)  # d_1 = min(0.5, 2/11) = 2/11
    avg: Any = ema.module
    assert avg.running_mean.tolist() == pytest.approx([9 / 11 * 4.0] * 2)
    assert avg.num_batches_tracked.item() == 7
    with pytest.raises(ValueError, match="EMA decay"):
        ModelEMA(live, decay=1.0)


@pytest.mark.skipif(not (CAMVID / "train.txt").is_file(), reason=f"CamVid is not at {CAMVID}")
def test_unet_train_scores_and_saves_the_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the live weights after every step; the average computed here by the formula must be what the
    held-out frames were scored with and what the checkpoint holds as 'model' (what export and evaluate load)."""
    decay = 0.6
    live_states: list[dict[str, torch.Tensor]] = []
    scored_states: list[dict[str, torch.Tensor]] = []
    real_epoch, real_predict = train.train_one_epoch, train.predict_labels

    def recording_epoch(model: nn.Module, *a: Any, **kw: Any) -> dict[str, Any]:
        if not live_states:
            live_states.append(copy.deepcopy(model.state_dict()))  # the weights before the first step
        args = list(a)
        step_hook = args[-1]

        def after_step() -> None:
            step_hook()
            live_states.append(copy.deepcopy(model.state_dict()))
        args[-1] = after_step
        return real_epoch(model, *args, **kw)

    def recording_predict(model: nn.Module, *a: Any, **kw: Any) -> Any:
        scored_states.append(copy.deepcopy(model.state_dict()))
        return real_predict(model, *a, **kw)

    monkeypatch.setattr(train, "train_one_epoch", recording_epoch)
    monkeypatch.setattr(train, "predict_labels", recording_predict)
    out = tmp_path / "run"
    assert train.main(["--dataset", "camvid", "--data", str(CAMVID), "--input-size", "48x64", "--batch-size", "2",
                       "--limit", "6", "--arch", "seed", "--width", "8", "--norm", "batch", "--workers", "0",
                       "--threads", "1", "--no-progress", "--epochs", "1", "--holdout-sequence", "0006R0",
                       "--ema", str(decay), "--out", str(out)]) == 0
    assert len(live_states) == 1 + 3  # 6 frames, batch 2
    expected = {k: v.clone() for k, v in live_states[0].items()}
    for t, state in enumerate(live_states[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        for k, v in state.items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    ckpt = torch.load(out / "last.pt", weights_only=False)
    model, _ = load_checkpoint(out / "last.pt")
    for k, v in expected.items():
        torch.testing.assert_close(ckpt["model"][k], v)
        torch.testing.assert_close(scored_states[-1][k], v)
        torch.testing.assert_close(model.state_dict()[k], v)
        torch.testing.assert_close(ckpt["train_model"][k], live_states[-1][k])
    assert any(not torch.equal(ckpt["model"][k], ckpt["train_model"][k]) for k in expected)
    assert ckpt["ema"] == {"updates": 3, "decay": decay}
