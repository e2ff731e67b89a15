"""Small untrained torch models that export to ONNX the way the big frameworks' segmentation models do.

No weights can be downloaded here, and torchvision, segmentation_models_pytorch and mmsegmentation are not
installed; each class mimics what matters to unet-import: input layout and size, where and how big the logits
come out, extra outputs, what the model expects (RGB/BGR, mean/std).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv, batch norm (random statistics, so labels vary across the frame), ReLU."""
    bn = nn.BatchNorm2d(cout)
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), bn, nn.ReLU())


class TorchvisionLike(nn.Module):
    """torchvision's FCN/DeepLabV3: a stride-8 backbone, a head at 1/8, and the model itself upsamples to the
    input size (interpolate(size=x.shape[-2:]), a Shape -> Gather chain in ONNX); returns {"out", "aux"}."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_conv(3, 8, 2), _conv(8, 12, 2), _conv(12, 16, 2))
        self.head = nn.Conv2d(16, classes, 1)
        self.aux = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.backbone(x)
        size = x.shape[-2:]
        return OrderedDict(out=F.interpolate(self.head(f), size=size, mode="bilinear", align_corners=False),
                           aux=F.interpolate(self.aux(f), size=size, mode="bilinear", align_corners=False))


class SmpUnetLike(nn.Module):
    """segmentation_models_pytorch's Unet: encoder, decoder with skips upsampled x2 (nearest), logits at full size."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.enc = nn.ModuleList([_conv(3, 8), _conv(8, 12, 2), _conv(12, 16, 2)])
        self.dec = nn.ModuleList([_conv(16 + 12, 12), _conv(12 + 8, 8)])
        self.head = nn.Conv2d(8, classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc[0](x)
        s2 = self.enc[1](s1)
        y = self.enc[2](s2)
        y = self.dec[0](torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), s2], 1))
        y = self.dec[1](torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), s1], 1))
        return self.head(y)


class MmsegLike(nn.Module):
    """mmsegmentation's EncoderDecoder exported in tensor mode: the decode head's logits at 1/4 of the input."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(_conv(3, 8, 2), _conv(8, 16, 2), _conv(16, 16))
        self.decode_head = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(16, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))


class ArgmaxLike(nn.Module):
    """A model exported with its argmax (PaddleSeg's default export): int64 labels N x H x W at the input size."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.net = SmpUnetLike(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).argmax(1)


def export(model: nn.Module, path: Path, hw: tuple[int, int], *, dynamic_hw: bool = False,
           output_names: list[str] | None = None, seed: int = 0, opset: int = 17) -> Path:
    """torch.onnx.export as each framework's docs show it: float NCHW input, dynamic batch (and H, W)."""
    torch.manual_seed(seed)
    model.eval()
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    names = output_names or ["output"]
    with torch.inference_mode():
        torch.onnx.export(model, (torch.zeros(1, 3, *hw),), str(path), input_names=["input"], output_names=names,
                          dynamic_axes={"input": axes, **{n: {0: "batch"} for n in names}},
                          opset_version=opset, dynamo=False)
    return path
