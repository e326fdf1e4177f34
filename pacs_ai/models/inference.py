"""Run a network on a volume and bring its output back onto the volume's grid.

The steps, the geometric ones undone in reverse order for the output:

1. reorient (optional): permute and flip the (slice, row, column) axes to the orientation the
   network was trained in, e.g. ``RAS`` for most MONAI bundles, using the volume's affine;
2. resample (optional) to the network's voxel spacing;
3. clip to a HU window, normalise;
4. run the network on the whole array, or on overlapping patches whose outputs are averaged;
5. activation: sigmoid or softmax, unless the network already gives probabilities;
6. resample the probabilities onto the original grid, to its exact shape, and undo the
   reorientation;
7. decide each voxel's label there and describe its components as Findings
   (:mod:`pacs_ai.models.file_model`).

Everything here is numpy and scipy: a network is any callable from a float32 batch
``(N, 1, z, y, x)`` to ``(N, C, z, y, x)`` (or ``(N, z, y, x)`` for one channel), so the same
steps serve TorchScript, torch.export and ONNX Runtime. Geometric settings (``spacing_mm``,
``patch``) are in the network's axis order: after reorientation when there is one, else
(slice, row, column).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, special  # type: ignore[import-untyped]
from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]

from pacs_ai.imaging.volume import Volume

Network = Callable[[NDArray[np.float32]], NDArray[np.float32]]

# Orientation letters as (LPS world axis, sign): the volume's affine is in LPS millimetres.
_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class InputSpec:
    """What a network expects and how to read what it returns (``input`` of a manifest)."""

    spacing_mm: tuple[float, float, float] | None = None
    window: tuple[float, float] | None = None
    """Clip to [low, high] (HU for CT) before normalising."""
    normalise: Literal["zscore", "minmax", "none"] = "none"
    """``minmax`` maps the window (or, without one, the volume's range) to 0..1."""
    patch: tuple[int, int, int] | None = None
    """Sliding-window size; ``None`` runs the network on the whole volume at once."""
    overlap: float = 0.25
    batch_size: int = 4
    orientation: str | None = None
    """Axis codes such as ``RAS``: the direction each network axis points to."""
    output: Literal["logits", "probabilities"] = "logits"
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    """``softmax``: channel k is label k, channel 0 background, argmax decides. ``sigmoid``:
    channel i is the manifest's i-th label, the most probable one at or above threshold wins."""
    threshold: float = 0.5
    min_component_ml: float = 0.0
    """Components smaller than this are dropped from the label map and the findings."""

    def __post_init__(self) -> None:
        _check_numbers("spacing_mm", self.spacing_mm, 3, positive=True)
        _check_numbers("window", self.window, 2, positive=False)
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window must be [low, high] with low < high, got {self.window}")
        _check_numbers("patch", self.patch, 3, positive=True)
        if self.patch is not None and not all(isinstance(v, int) for v in self.patch):
            raise ValueError(f"patch must be 3 whole numbers of voxels, got {self.patch}")
        for name, value, choices in (
            ("normalise", self.normalise, ("zscore", "minmax", "none")),
            ("output", self.output, ("logits", "probabilities")),
            ("activation", self.activation, ("sigmoid", "softmax")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if not _is_number(self.overlap) or not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be a fraction in [0, 1), got {self.overlap!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive whole number, got {self.batch_size!r}")
        if not _is_number(self.threshold) or not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie between 0 and 1, got {self.threshold!r}")
        if not _is_number(self.min_component_ml) or self.min_component_ml < 0:
            raise ValueError(f"min_component_ml must be >= 0, got {self.min_component_ml!r}")
        if self.orientation is not None:
            code = self.orientation
            valid = isinstance(code, str) and len(code) == 3 and set(code) <= set(_LETTERS)
            if not valid or sorted(_LETTERS[c][0] for c in code) != [0, 1, 2]:
                raise ValueError(f"orientation must be 3 axis codes such as 'RAS', got {code!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_numbers(name: str, values: object, size: int, *, positive: bool) -> None:
    if values is None:
        return
    if (
        not isinstance(values, tuple)
        or len(values) != size
        or not all(_is_number(v) and (not positive or v > 0) for v in values)
    ):
        kind = "positive numbers" if positive else "numbers"
        raise ValueError(f"{name} must be {size} {kind} or null, got {values!r}")


@dataclass(frozen=True)
class Orientation:
    """Turns (slice, row, column) axes into the network's: transpose, then flip."""

    permutation: tuple[int, int, int]
    flips: tuple[int, ...]

    def forward(self, array: NDArray[np.float32]) -> NDArray[np.float32]:
        out = np.transpose(array, self.permutation)
        return np.flip(out, self.flips) if self.flips else out

    def backward(self, channels: NDArray[np.float32]) -> NDArray[np.float32]:
        """Undo :meth:`forward` on an array with a leading channel axis."""
        out = np.flip(channels, tuple(1 + a for a in self.flips)) if self.flips else channels
        inverse = np.argsort(self.permutation)
        return np.transpose(out, (0, *(1 + int(a) for a in inverse)))


def orientation_for(affine: NDArray[np.float64], code: str) -> Orientation:
    """The axis permutation and flips that make a volume with ``affine`` point as ``code``.

    Each index axis is matched to the world axis it is closest to, as a whole assignment, so
    that an oblique acquisition still gets three distinct axes (nearest-axis reorientation, as
    nibabel's and MONAI's ``Orientation`` do; nothing is interpolated).
    """
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    axes, worlds = linear_sum_assignment(-np.abs(directions.T))
    axis_of_world = {int(w): int(a) for a, w in zip(axes, worlds, strict=True)}
    permutation: list[int] = []
    flips: list[int] = []
    for position, letter in enumerate(code):
        world, sign = _LETTERS[letter]
        axis = axis_of_world[world]
        permutation.append(axis)
        if np.sign(directions[world, axis]) != sign:
            flips.append(position)
    return Orientation((permutation[0], permutation[1], permutation[2]), tuple(flips))


@dataclass(frozen=True)
class Prepared:
    array: NDArray[np.float32]
    """What the network sees, in its axis order and spacing."""
    orientation: Orientation | None
    oriented_shape: tuple[int, ...]
    """The volume's shape after reorientation, before resampling: where outputs go back to."""


def prepare(volume: Volume, spec: InputSpec) -> Prepared:
    voxels = volume.voxels.astype(np.float32, copy=False)
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    orientation = None
    if spec.orientation is not None:
        orientation = orientation_for(volume.affine, spec.orientation)
        voxels = orientation.forward(voxels)
        spacing = spacing[list(orientation.permutation)]
    oriented_shape = tuple(int(s) for s in voxels.shape)
    if spec.spacing_mm is not None:
        scaled = np.asarray(voxels.shape) * spacing / np.asarray(spec.spacing_mm)
        voxels = resize(voxels[None], tuple(int(s) for s in np.maximum(1, np.round(scaled))))[0]
    if spec.window is not None:
        voxels = np.clip(voxels, *spec.window)
    if spec.normalise == "zscore":
        std = float(voxels.std(dtype=np.float64))
        voxels = (voxels - float(voxels.mean(dtype=np.float64))) / (std if std > 0 else 1.0)
    elif spec.normalise == "minmax":
        low, high = spec.window or (float(voxels.min()), float(voxels.max()))
        voxels = (voxels - low) / (high - low if high > low else 1.0)
    # torch.from_numpy refuses the negative strides a flip leaves.
    array = np.ascontiguousarray(voxels, dtype=np.float32)
    return Prepared(array, orientation, oriented_shape)


def resize(channels: NDArray[np.float32], shape: tuple[int, ...]) -> NDArray[np.float32]:
    """Linear resampling of each channel to exactly ``shape``.

    ``grid_mode`` treats voxels as cells, so the field of view (shape × spacing) is kept and a
    round trip lands on the same grid; zoom's own rounding of the output shape would not
    always give the shape asked for with factors from spacings, hence factors from shapes.
    """
    if channels.shape[1:] == shape:
        return channels
    factors = [out / size for out, size in zip(shape, channels.shape[1:], strict=True)]
    zoomed = [ndimage.zoom(c, factors, order=1, mode="nearest", grid_mode=True) for c in channels]
    resized: NDArray[np.float32] = np.stack(zoomed).astype(np.float32, copy=False)
    return resized


def infer(array: NDArray[np.float32], network: Network, spec: InputSpec) -> NDArray[np.float32]:
    """The network's raw output for ``array``, shape (C, *array.shape)."""
    if spec.patch is None:
        whole: NDArray[np.float32] = _call(network, array[None, None], array.shape)[0]
        return whole
    return sliding_window(array, network, spec.patch, spec.overlap, spec.batch_size)


def sliding_window(
    array: NDArray[np.float32],
    network: Network,
    patch: tuple[int, int, int],
    overlap: float,
    batch_size: int,
) -> NDArray[np.float32]:
    """Average the network's outputs over overlapping patches that tile ``array``."""
    # Edge padding where the volume is smaller than a patch: a constant would draw a false
    # edge that a convolution responds to.
    padding = [(0, max(0, p - s)) for s, p in zip(array.shape, patch, strict=True)]
    padded = np.pad(array, padding, mode="edge") if any(a for _, a in padding) else array
    starts = [
        _starts(size, p, max(1, int(p * (1 - overlap))))
        for size, p in zip(padded.shape, patch, strict=True)
    ]
    corners = list(itertools.product(*starts))
    total: NDArray[np.float32] | None = None
    counts = np.zeros(padded.shape, dtype=np.float32)
    for first in range(0, len(corners), batch_size):
        boxes = [
            tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
            for corner in corners[first : first + batch_size]
        ]
        out = _call(network, np.stack([padded[box] for box in boxes])[:, None], patch)
        if total is None:
            total = np.zeros((out.shape[1], *padded.shape), dtype=np.float32)
        for box, window in zip(boxes, out, strict=True):
            total[(slice(None), *box)] += window
            counts[box] += 1
    assert total is not None  # there is always at least one patch
    mean: NDArray[np.float32] = total / counts
    return mean[(slice(None), *(slice(0, s) for s in array.shape))]


def _starts(size: int, patch: int, step: int) -> list[int]:
    """Patch origins along one axis, the last one flush with the end."""
    return [*range(0, size - patch, step), size - patch]


def _call(
    network: Network, batch: NDArray[np.float32], spatial: Sequence[int]
) -> NDArray[np.float32]:
    out = np.asarray(network(batch), dtype=np.float32)
    if out.ndim == 4:
        out = out[:, None]
    if out.ndim != 5 or out.shape[0] != batch.shape[0] or out.shape[2:] != tuple(spatial):
        raise ValueError(
            f"the network returned shape {out.shape} for input {batch.shape}: expected "
            "(N, C, z, y, x) on the input's grid"
        )
    return out


def probabilities(raw: NDArray[np.float32], spec: InputSpec) -> NDArray[np.float32]:
    if spec.output == "probabilities":
        return raw
    if spec.activation == "softmax":
        return np.asarray(special.softmax(raw, axis=0), dtype=np.float32)
    return np.asarray(special.expit(raw), dtype=np.float32)


def to_volume_grid(probs: NDArray[np.float32], prepared: Prepared) -> NDArray[np.float32]:
    """Probabilities (C, network grid) → (C, slices, rows, columns) of the original volume."""
    probs = resize(probs, prepared.oriented_shape)
    if prepared.orientation is not None:
        probs = prepared.orientation.backward(probs)
    return np.ascontiguousarray(probs)
