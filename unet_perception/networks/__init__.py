"""The segmentation networks (torch): the default U-Net on EfficientNet-Lite0 and the lab's seed U-Net.

Training builds them; the torch backend rebuilds them from a checkpoint's ``model_config``. Only torch is
needed here, never the training code.
"""

from __future__ import annotations

from torch import nn

ARCHS = ("lite", "seed")  # the default first


def build_model(config: dict) -> nn.Module:
    """Rebuild a model from the ``config`` dict saved in checkpoints (no pretrained weights are read:
    the checkpoint holds every weight). Configs without ``arch`` are the seed's."""
    config = dict(config)
    arch = config.pop("arch", "seed")
    if arch == "seed":
        from unet_perception.networks.seed_unet import UNet
        return UNet(**config)
    if arch == "lite":
        from unet_perception.networks.lite_unet import LiteUNet
        return LiteUNet(**config)
    raise ValueError(f"unknown architecture '{arch}' in the checkpoint; known: {list(ARCHS)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
