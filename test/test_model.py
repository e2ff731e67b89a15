"""The seed U-Net: the lab's parameter count, shapes, the input-size error and the width/norm options."""

from __future__ import annotations

import pytest
import torch

from unet_perception.networks import build_model, count_parameters
from unet_perception.networks.seed_unet import UNet


def test_seed_configuration_has_the_labs_parameter_count() -> None:
    # The Keras lab's model.summary() with 23 classes: "Total params: 8,640,471".
    assert count_parameters(UNet(num_classes=23)) == 8_640_471


def test_default_is_the_seed_configuration() -> None:
    assert UNet().config == {"arch": "seed", "num_classes": 23, "width": 32, "dropout": 0.3, "norm": "none"}


@pytest.mark.parametrize("batch, hw", [(1, (32, 48)), (3, (64, 96))])
def test_output_is_logits_per_class_at_input_size(batch: int, hw: tuple[int, int]) -> None:
    model = UNet(num_classes=11, width=4).eval()
    with torch.inference_mode():
        out = model(torch.rand(batch, 3, *hw))
    assert out.shape == (batch, 11, *hw)
    assert out.dtype == torch.float32


def test_input_not_divisible_by_16_names_a_valid_size() -> None:
    model = UNet(num_classes=11, width=4)
    with pytest.raises(ValueError, match=r"input 250x333 is not divisible by 16; resize or pad to 256x336"):
        model(torch.rand(1, 3, 250, 333))


def test_width_scales_every_block() -> None:
    narrow, seed = UNet(num_classes=23, width=16), UNet(num_classes=23, width=32)
    assert narrow.down[0].body[0].out_channels == 16
    assert narrow.bottleneck.body[0].out_channels == 256
    # Conv weights scale with width squared (the in/out channels both halve), so about a quarter.
    assert 0.2 < count_parameters(narrow) / count_parameters(seed) < 0.3


def test_batch_norm_option_adds_norm_layers_and_drops_conv_bias() -> None:
    plain, bn = UNet(num_classes=11, width=4), UNet(num_classes=11, width=4, norm="batch")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    norms = [m for m in bn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 * 9 + 1  # two per conv block (4 down, bottleneck, 4 up) and one in the head
    assert bn.down[0].body[0].bias is None and plain.down[0].body[0].bias is not None


def test_dropout_only_in_the_two_deepest_blocks() -> None:
    model = UNet(num_classes=11, width=4)
    has_dropout = [any(isinstance(m, torch.nn.Dropout) for m in b.modules())
                   for b in [*model.down, model.bottleneck]]
    assert has_dropout == [False, False, False, True, True]


@pytest.mark.parametrize("kwargs, message", [({"norm": "group"}, "norm must be 'none' or 'batch'"),
                                             ({"width": 0}, "width must be >= 1")])
def test_bad_options_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet(num_classes=11, **kwargs)


def test_build_model_rebuilds_from_saved_config() -> None:
    model = UNet(num_classes=7, width=4, norm="batch")
    rebuilt = build_model(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
