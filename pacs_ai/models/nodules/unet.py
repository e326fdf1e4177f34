"""A small 3D U-Net in plain torch and its sliding-window inference, for ``lung-nodule-demo``.

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

import contextlib
import itertools
import math
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from pacs_ai.models.nodules import BASE_CHANNELS, HU_RANGE

WINDOW = (48, 128, 128)
"""Voxels per sliding window (multiples of 4): larger than the training patches, which the
fully convolutional network does not mind, so that fewer voxels are computed twice."""
OVERLAP = 0.25


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


def normalise(hu: Tensor) -> Tensor:
    """HU to the network's input range, in place: clip to HU_RANGE, map to [-1, 1]."""
    low, high = HU_RANGE
    return hu.clamp_(low, high).sub_((low + high) / 2).div_((high - low) / 2)


def load_unet(path: Path, device: torch.device) -> UNet3D:
    """The network with the weights at ``path``, on ``device``, in eval mode.

    ``weights_only=True``: the checkpoint is a plain state_dict, and loading it must not run
    code even if the file was swapped.
    """
    state = torch.load(path, map_location=device, weights_only=True)
    net = UNet3D(BASE_CHANNELS)
    net.load_state_dict(state)
    return channels_last(net.to(device)).eval()


def channels_last(net: UNet3D) -> UNet3D:
    """The network in channels_last_3d layout, which oneDNN and cuDNN run 3D convolutions
    markedly faster in (1.7x measured on a 2-core CPU); inputs should match it."""
    # Module.to takes memory_format at run time, but torch's type stubs do not list it.
    moved: UNet3D = net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    return moved


def sliding_window(
    net: nn.Module, hu: NDArray[np.float32], device: torch.device, batch: int = 4
) -> NDArray[np.float32]:
    """Nodule probability per voxel of ``hu`` (already on the training grid).

    Windows overlap by OVERLAP and their outputs are averaged with Gaussian weights that
    favour each window's centre, where the network sees the most context. Because every
    window of the grid is run, the weight sum is the product of one sum per axis, so only
    one full-size accumulator is needed.
    """
    # torch.tensor always copies (normalise works in place, and the input may be read-only).
    volume = normalise(torch.tensor(hu, dtype=torch.float32, device=device))
    shape = tuple(int(n) for n in volume.shape)
    padded = tuple(max(n, w) for n, w in zip(shape, WINDOW, strict=True))
    if padded != shape:
        # A volume smaller than a window is padded with air (the lowest input value). Its
        # edges are otherwise left to the convolutions' zero padding, as the edges of the
        # training patches were: mirroring or repeating them (both tried) turned vessels
        # cut by the edge into nodule-like blobs or plates.
        fill = torch.full(padded, -1.0, device=device)
        fill[: shape[0], : shape[1], : shape[2]] = volume
        volume = fill
    starts = [_starts(n, w) for n, w in zip(padded, WINDOW, strict=True)]
    weights = [_gaussian(w, device) for w in WINDOW]
    window_weight = weights[0][:, None, None] * weights[1][None, :, None] * weights[2]
    total = torch.zeros(padded, device=device)
    corners = list(itertools.product(*starts))
    # bf16 only on CUDA: there it halves memory traffic at no cost to a thresholded mask;
    # CPU autocast would be slower on most CPUs, and naming "cuda" without one warns.
    precision = (
        torch.autocast("cuda", torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), precision:
        for first in range(0, len(corners), batch):
            chunk = corners[first : first + batch]
            boxes = [
                tuple(slice(c, c + w) for c, w in zip(corner, WINDOW, strict=True))
                for corner in chunk
            ]
            x = torch.stack([volume[box] for box in boxes])[:, None]
            probability = torch.sigmoid(
                net(x.contiguous(memory_format=torch.channels_last_3d)).float()
            )
            for box, p in zip(boxes, probability[:, 0], strict=True):
                total[box] += p * window_weight
    for axis, (axis_starts, weight) in enumerate(zip(starts, weights, strict=True)):
        coverage = torch.zeros(padded[axis], device=device)
        for start in axis_starts:
            coverage[start : start + weight.numel()] += weight
        total /= coverage.reshape([-1 if a == axis else 1 for a in range(3)])
    result: NDArray[np.float32] = total[: shape[0], : shape[1], : shape[2]].cpu().numpy()
    return result


def _starts(length: int, window: int) -> list[int]:
    """Window start indices covering [0, length), evenly spread, overlapping by OVERLAP."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / (window * (1 - OVERLAP))) + 1
    return sorted({round(i * (length - window) / (count - 1)) for i in range(count)})


def _gaussian(size: int, device: torch.device) -> Tensor:
    centre, sigma = (size - 1) / 2, size / 8
    t = torch.arange(size, device=device, dtype=torch.float32)
    # The floor keeps every voxel's weight sum well above zero, also in a volume's corners.
    return torch.exp(-((t - centre) ** 2) / (2 * sigma**2)).clamp_min(1e-3)
