"""A small 3D U-Net in plain torch, for the ``lung-nodule-demo`` model.

Three resolution levels (full, 1/2, 1/4) of two 3×3×3 convolutions each, joined by
transposed-convolution upsampling and skip connections, then one 1×1×1 convolution to a
single logit per voxel. With the default 8 base channels it has about 0.1 M parameters: a
state_dict under 1 MB, and a forward pass cheap enough for a 300-slice CT on a CPU.

BatchNorm, not InstanceNorm: in eval mode it normalises with statistics fixed at training,
so a voxel's output does not depend on what else lies in its sliding window (an all-lung
window and a window across the chest wall would be normalised differently by
InstanceNorm, and their overlap would disagree).

This module imports torch at the top: import it only from ``load()``/``predict()`` paths and
the training script, never from a model module the registry reads.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(0.1, inplace=True),
        )


class UNet3D(nn.Module):
    """Input (N, 1, D, H, W) with D, H and W multiples of 4; output logits of the same shape."""

    def __init__(self, base_channels: int = 8) -> None:
        super().__init__()
        c1, c2, c3 = base_channels, 2 * base_channels, 4 * base_channels
        self.base_channels = base_channels
        self.enc1 = _DoubleConv(1, c1)
        self.enc2 = _DoubleConv(c1, c2)
        self.bottom = _DoubleConv(c2, c3)
        self.pool = nn.MaxPool3d(2)
        self.up2 = nn.ConvTranspose3d(c3, c2, 2, stride=2)
        self.dec2 = _DoubleConv(2 * c2, c2)
        self.up1 = nn.ConvTranspose3d(c2, c1, 2, stride=2)
        self.dec1 = _DoubleConv(2 * c1, c1)
        self.head = nn.Conv3d(c1, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        out: Tensor = self.head(d1)
        return out


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
