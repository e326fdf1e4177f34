"""Synthetic chest CT with lung nodules and their truth, to train and test ``lung-nodule-demo``.

Each phantom is a window onto a randomly shaped chest drawn from analytic shapes, in HU: an
elliptical body (soft tissue, sometimes a subcutaneous fat layer) with a spine and two
ellipsoidal lungs at about -850 HU, crossed by thin vessels. Nodules are ellipsoids of radius
2-8 mm (log-uniform) in the lungs: a solid core (about +30 HU), often with a part-solid rim
fading towards -300 HU, and a half-voxel soft edge. The truth mask is every voxel whose
centre lies inside a nodule's ellipsoid, so volume and longest diameter are known exactly.
A mild blur and Gaussian noise (σ 12-30 HU) come last.

The same seed always gives the same phantom. Training uses seed tuples ``(1, run seed, n)``
only, so every plain integer seed is a phantom the shipped network has never seen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped]

from pacs_ai.imaging.volume import Volume
from pacs_ai.models.nodules import SPACING_MM, SPACING_TOLERANCE

Seed = int | Sequence[int]
Spacing = tuple[float, float, float]
_Vec = NDArray[np.float64]

NODULE_RADIUS_MM, AIR_HU = (2.0, 8.0), -1000.0
EDGE_MM = 0.5
"""Width of the soft edge of vessels and nodules, where they blend into the lung."""
NODULE_GAP_MM = 3.0
"""Nodules are kept this far apart so that each is a connected component of its own."""


@dataclass(frozen=True)
class TrueNodule:
    center: tuple[float, float, float]
    """(slice, row, column) of the ellipsoid's centre, in fractional voxel indices."""
    semi_axes_mm: tuple[float, float, float]
    volume_ml: float
    longest_diameter_mm: float


class NodulePhantom(NamedTuple):
    hu: NDArray[np.float32]
    mask: NDArray[np.uint8]
    """1 on the voxels whose centre lies inside a nodule, 0 elsewhere."""
    nodules: list[TrueNodule]
    spacing: Spacing


@dataclass(frozen=True)
class _Chest:
    """Random anatomy in mm, in a frame with (z, y, x) axes and the lungs' middle at 0."""

    body: _Vec  # semi-axes (y, x) of the body outline, an elliptic cylinder along z
    fat_mm: float  # thickness of the subcutaneous fat layer (0: none)
    lung_centers: tuple[_Vec, _Vec]
    lung_axes: _Vec  # semi-axes (z, y, x) of each lung
    spine_center: _Vec  # (y, x)
    spine_axes: _Vec
    hu: dict[str, float]


def training_patch(seed: Seed, shape: tuple[int, int, int] = (32, 64, 64)) -> NodulePhantom:
    """A small random chest window, mostly in a lung, with 0-4 nodules that may be cut; its
    spacing is jittered around SPACING_MM by as much as the model accepts unresampled."""
    rng = np.random.default_rng(seed)
    jitter = rng.uniform(1 - SPACING_TOLERANCE, 1 + SPACING_TOLERANCE, 3)
    spacing = _spacing(np.asarray(SPACING_MM) * jitter)
    chest = _random_chest(rng)
    choice = rng.random()
    if choice < 0.5:
        centre = _lung_point(rng, chest, 1.0)
    elif choice < 0.75:
        # On the lung's outline, apex and base included: where lung meets soft tissue in
        # shapes that a network could mistake for a nodule.
        centre = _lung_point(rng, chest, 1.0, surface=True)
    else:
        reach = [chest.lung_axes[0] + 40.0, chest.body[0], chest.body[1]]
        centre = rng.uniform(-1.0, 1.0, 3) * np.asarray(reach)
    origin = centre - (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    count = int(rng.integers(0, 5))
    return _render(rng, chest, origin, shape, spacing, count, NODULE_RADIUS_MM, whole=False)


def chest_phantom(
    seed: Seed,
    shape: tuple[int, int, int] = (64, 128, 128),
    spacing: Spacing = SPACING_MM,
    nodules: int | None = None,
    radius_mm: tuple[float, float] = NODULE_RADIUS_MM,
) -> NodulePhantom:
    """A window centred in a lung with ``nodules`` (default 1-4) whole nodules of a radius
    within ``radius_mm``; fewer where the lung has no room (the returned list is the truth)."""
    rng = np.random.default_rng(seed)
    chest = _random_chest(rng)
    count = int(rng.integers(1, 5)) if nodules is None else nodules
    origin = _lung_point(rng, chest, 0.4) - (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    return _render(rng, chest, origin, shape, spacing, count, radius_mm, whole=True)


def as_volume(phantom: NodulePhantom, modality: str = "CT") -> Volume:
    """The phantom as a :class:`Volume` with an axis-aligned affine and made-up UIDs."""
    slices = phantom.hu.shape[0]
    return Volume(
        voxels=phantom.hu,
        spacing=phantom.spacing,
        affine=np.diag([*phantom.spacing, 1.0]),
        sop_instance_uids=tuple(f"2.25.1.{k + 1}" for k in range(slices)),
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.1.0",
        frame_of_reference_uid="2.25.2",
        modality=modality,
    )


def _spacing(values: _Vec) -> Spacing:
    return float(values[0]), float(values[1]), float(values[2])


def _random_chest(rng: np.random.Generator) -> _Chest:
    ay, ax = rng.uniform(100.0, 130.0), rng.uniform(140.0, 175.0)
    lung_axes = np.array(
        [rng.uniform(100.0, 160.0), rng.uniform(0.58, 0.68) * ay, rng.uniform(0.30, 0.37) * ax]
    )
    cy, cx = rng.uniform(-0.08, 0.0) * ay, rng.uniform(0.42, 0.48) * ax
    return _Chest(
        body=np.array([ay, ax]),
        fat_mm=rng.uniform(5.0, 15.0) if rng.random() < 0.5 else 0.0,
        lung_centers=(np.array([0.0, cy, -cx]), np.array([0.0, cy, cx])),
        lung_axes=lung_axes,
        spine_center=np.array([rng.uniform(0.6, 0.7) * ay, 0.0]),
        spine_axes=np.array([rng.uniform(14.0, 18.0), rng.uniform(12.0, 16.0)]),
        hu={
            "soft": rng.uniform(20.0, 60.0),
            "fat": rng.uniform(-120.0, -80.0),
            "bone": rng.uniform(400.0, 900.0),
            "lung": rng.uniform(-880.0, -800.0),
            "noise": rng.uniform(12.0, 30.0),
            "blur_mm": rng.uniform(0.0, 0.6),
        },
    )


def _lung_point(
    rng: np.random.Generator, chest: _Chest, fraction: float, surface: bool = False
) -> _Vec:
    """A uniform random point of one lung shrunk by ``fraction`` (1: the whole lung), or a
    point of its outline (``surface``)."""
    direction = rng.normal(size=3)
    radius = fraction * (1.0 if surface else rng.random() ** (1 / 3))
    centre = chest.lung_centers[int(rng.integers(0, 2))]
    point: _Vec = centre + chest.lung_axes * radius * direction / np.linalg.norm(direction)
    return point


def _render(
    rng: np.random.Generator,
    chest: _Chest,
    origin: _Vec,
    shape: tuple[int, int, int],
    spacing: Spacing,
    count: int,
    radius_mm: tuple[float, float],
    whole: bool,
) -> NodulePhantom:
    step = np.asarray(spacing)
    z, y, x = (
        (origin[a] + np.arange(shape[a]) * step[a]).reshape([-1 if b == a else 1 for b in range(3)])
        for a in range(3)
    )
    hu_of = chest.hu

    def in_ellipse(cy: float, cx: float, ay: float, ax: float) -> NDArray[np.bool_]:
        inside: NDArray[np.bool_] = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2 <= 1.0
        return inside

    ay, ax = chest.body
    body = in_ellipse(0.0, 0.0, ay, ax)
    inner = in_ellipse(0.0, 0.0, ay - chest.fat_mm, ax - chest.fat_mm)
    spine = in_ellipse(*chest.spine_center, *chest.spine_axes)
    plane = np.where(body, hu_of["fat"], AIR_HU)
    plane = np.where(inner, hu_of["soft"], plane)
    plane = np.where(spine, hu_of["bone"], plane)
    hu = np.repeat(plane, shape[0], axis=0)
    lung = np.zeros(shape, dtype=bool)
    for c in chest.lung_centers:
        a = chest.lung_axes
        lung |= ((z - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((x - c[2]) / a[2]) ** 2 <= 1
    lung &= inner & ~spine
    hu[lung] = hu_of["lung"]

    lung_voxels = np.argwhere(lung)
    if lung_voxels.size:
        for _ in range(int(rng.integers(3, 9))):
            anchor = origin + lung_voxels[rng.integers(len(lung_voxels))] * step
            u = rng.normal(size=3)
            u /= np.linalg.norm(u)
            d = [z - anchor[0], y - anchor[1], x - anchor[2]]
            along = d[0] * u[0] + d[1] * u[1] + d[2] * u[2]
            off = sum((d[i] - along * u[i]) ** 2 for i in range(3))
            weight = np.clip(0.5 + (rng.uniform(0.5, 1.3) - np.sqrt(off)) / EDGE_MM, 0.0, 1.0)
            hu += (rng.uniform(0.0, 60.0) - hu) * weight * lung

    mask = np.zeros(shape, dtype=np.uint8)
    truth: list[TrueNodule] = []
    for _ in range(count if lung_voxels.size else 0):
        for _attempt in range(40):
            nodule = _place_nodule(rng, lung, lung_voxels, step, truth, radius_mm, whole)
            if nodule is not None:
                truth.append(_draw_nodule(rng, hu, mask, *nodule, step))
                break

    if hu_of["blur_mm"] > 0.05:
        hu = ndimage.gaussian_filter(hu, sigma=hu_of["blur_mm"] / step, mode="nearest")
    hu += rng.normal(0.0, hu_of["noise"], size=shape)
    return NodulePhantom(hu.astype(np.float32), mask, truth, spacing)


def _place_nodule(
    rng: np.random.Generator,
    lung: NDArray[np.bool_],
    lung_voxels: NDArray[np.intp],
    step: _Vec,
    placed: list[TrueNodule],
    radius_mm: tuple[float, float],
    whole: bool,
) -> tuple[_Vec, _Vec, _Vec] | None:
    """A random nodule (centre in mm from the window corner, semi-axes, rotation) or None.

    None when this try does not fit: outside the lung, too close to another nodule, or (for
    ``whole``) cut by the window. Checking the lung on the voxel grid is exact where it
    matters: no truth voxel of a nodule lies outside the lung.
    """
    # Log-uniform radii: as many nodules of 2-4 mm as of 4-8 mm. Small nodules are the
    # common ones, and the hard ones, since they differ least from a vessel in cross-section.
    axes = np.exp(rng.uniform(*np.log(radius_mm))) * rng.uniform(0.8, 1.2, 3)
    reach = float(axes.max()) + 1.0
    centre = (lung_voxels[rng.integers(len(lung_voxels))] + rng.uniform(-0.5, 0.5, 3)) * step
    if any(
        np.linalg.norm(centre - np.asarray(n.center) * step)
        < reach + max(n.semi_axes_mm) + NODULE_GAP_MM
        for n in placed
    ):
        return None
    box, offsets, cut = _near(centre, reach, step, lung.shape)
    if (whole and cut) or not np.all(lung[box][(offsets**2).sum(axis=-1) <= reach**2]):
        return None
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return centre, axes, rotation


def _draw_nodule(
    rng: np.random.Generator,
    hu: NDArray[np.float64],
    mask: NDArray[np.uint8],
    centre: _Vec,
    axes: _Vec,
    rotation: _Vec,
    step: _Vec,
) -> TrueNodule:
    box, offsets, _ = _near(centre, float(axes.max()) + EDGE_MM, step, mask.shape)
    rho = np.sqrt((((offsets @ rotation) / axes) ** 2).sum(axis=-1))
    solid = rng.uniform(0.0, 60.0)
    # Part-solid edge: the outer shell fades from the solid density towards the rim's.
    core = 1.0 if rng.random() < 0.4 else rng.uniform(0.5, 0.9)
    rim = rng.uniform(-350.0, -200.0)
    fade = np.clip((rho - core) / max(1.0 - core, 1e-6), 0.0, 1.0)
    density = solid + (rim - solid) * fade
    mean_radius = float(np.prod(axes) ** (1 / 3))
    weight = np.clip(0.5 + (1.0 - rho) * mean_radius / EDGE_MM, 0.0, 1.0)
    hu[box] += (density - hu[box]) * weight
    mask[box][rho <= 1.0] = 1
    return TrueNodule(
        center=_spacing(centre / step),
        semi_axes_mm=_spacing(axes),
        volume_ml=4 / 3 * math.pi * float(np.prod(axes)) / 1000.0,
        longest_diameter_mm=2 * float(axes.max()),
    )


def _near(
    centre: _Vec, reach: float, step: _Vec, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], _Vec, bool]:
    """The window's voxels within ``reach`` mm of ``centre`` on each axis: their box, their
    offsets from the centre in mm (box shape + (3,)), and whether the window cuts the box."""
    low = np.floor((centre - reach) / step).astype(int)
    high = np.ceil((centre + reach) / step).astype(int) + 1
    cut = bool(np.any(low < 0) or np.any(high > shape))
    low, high = np.maximum(low, 0), np.minimum(high, shape)
    box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high, strict=True))
    ticks = (np.arange(s.start, s.stop) * step[a] - centre[a] for a, s in enumerate(box))
    return box, np.stack(np.meshgrid(*ticks, indexing="ij"), axis=-1), cut
