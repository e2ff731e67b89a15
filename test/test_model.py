"""The networks: the seed U-Net (the lab's parameter count, shapes, options) and the default U-Net on
EfficientNet-Lite0 (ImageNet weights, skips, rebuild from a checkpoint config)."""

from __future__ import annotations

import pytest
import torch

from unet_perception.networks import build_model, count_parameters
from unet_perception.networks.lite_unet import LiteEncoder, LiteUNet, load_imagenet_weights, pretrained_weights_path
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


def test_lite_encoder_loads_the_imagenet_weights_strictly_and_they_matter() -> None:
    state = torch.load(pretrained_weights_path("lite0"), map_location="cpu", weights_only=True)
    encoder = LiteEncoder("lite0")
    load_imagenet_weights(encoder, "lite0")  # strict=True inside: a renamed or missing tensor raises
    mine = encoder.state_dict()
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 96)
    pretrained, scratch = LiteUNet(11, pretrained=True).eval(), LiteUNet(11, pretrained=False).eval()
    with torch.inference_mode():
        a, b = pretrained.encoder(x)[-1], scratch.encoder(x)[-1]
    assert not torch.allclose(a, b, atol=1e-3)


def test_lite_encoder_refuses_a_state_dict_that_does_not_match() -> None:
    state = torch.load(pretrained_weights_path("lite0"), map_location="cpu", weights_only=True)
    state.pop("_blocks.3._depthwise_conv.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        LiteEncoder("lite0").load_state_dict(
            {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}, strict=True)


def test_lite_unet_shapes_skips_and_rebuild() -> None:
    model = LiteUNet(num_classes=7, decoder=(32, 16, 16, 8)).eval()
    assert model.encoder.channels == [16, 24, 40, 112, 320]  # strides 2, 4, 8, 16, 32
    with torch.inference_mode():
        for h, w in ((64, 96), (240, 320), (72, 100)):  # any size: 240 -> ... -> 15 -> 8 at stride 32
            assert model(torch.rand(1, 3, h, w)).shape == (1, 7, h, w)
    rebuilt = build_model(model.config)
    assert isinstance(rebuilt, LiteUNet) and rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(ValueError, match="4 positive widths"):
        LiteUNet(decoder=(32, 16))
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"arch": "resnet", "num_classes": 3})
