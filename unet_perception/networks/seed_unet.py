"""The U-Net of the Coursera "Image Segmentation with U-Net" lab, in torch.

Defaults reproduce the lab: 4 down blocks (32/64/128/256 filters), a 512-filter bottleneck, dropout
0.3 in the two deepest blocks, 4 up blocks with 3x3 stride-2 transposed convs, a 32-filter 3x3 conv
and a 1x1 classifier; He-normal init. ``width`` scales every filter count; ``norm='batch'`` adds
batch norm after each 3x3 conv.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTH = 4  # down blocks; the input size must be divisible by 2**DEPTH


class ConvBlock(nn.Module):
    """Two 3x3 same-padded convs with ReLU (batch norm optional), then optional dropout."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0, norm: str = "none") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c in (cin, cout):
            layers.append(nn.Conv2d(c, cout, 3, padding=1, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UpBlock(nn.Module):
    """3x3 stride-2 transposed conv, concatenation with the skip, then a ConvBlock."""

    def __init__(self, cin: int, cskip: int, cout: int, norm: str = "none") -> None:
        super().__init__()
        # padding=1 + output_padding=1 is Keras' padding='same' for stride 2: exactly 2x the size.
        self.up = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
        self.conv = ConvBlock(cout + cskip, cout, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """The lab's U-Net; outputs logits [N, num_classes, H, W] for float input [N, 3, H, W] in [0, 1]."""

    def __init__(self, num_classes: int = 23, width: int = 32, dropout: float = 0.3,
                 norm: str = "none") -> None:
        super().__init__()
        if norm not in ("none", "batch"):
            raise ValueError(f"norm must be 'none' or 'batch', got '{norm}'")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.config = {"arch": "seed", "num_classes": num_classes, "width": width, "dropout": dropout, "norm": norm}
        f = [width * 2**i for i in range(DEPTH + 1)]  # 32, 64, 128, 256, 512
        drops = [0.0, 0.0, 0.0, dropout, dropout]  # dropout in the two deepest blocks
        self.down = nn.ModuleList(
            ConvBlock(3 if i == 0 else f[i - 1], f[i], drops[i], norm) for i in range(DEPTH))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = ConvBlock(f[DEPTH - 1], f[DEPTH], drops[DEPTH], norm)
        self.up = nn.ModuleList(UpBlock(f[i + 1], f[i], f[i], norm) for i in reversed(range(DEPTH)))
        head: list[nn.Module] = [nn.Conv2d(f[0], f[0], 3, padding=1, bias=norm == "none")]
        if norm == "batch":
            head.append(nn.BatchNorm2d(f[0]))
        head += [nn.ReLU(inplace=True), nn.Conv2d(f[0], num_classes, 1)]
        self.head = nn.Sequential(*head)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")  # Keras' he_normal
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = 2**DEPTH
        if h % m or w % m:
            raise ValueError(f"input {h}x{w} is not divisible by {m}; resize or pad to "
                             f"{-(-h // m) * m}x{-(-w // m) * m}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x, skip)
        return self.head(x)

