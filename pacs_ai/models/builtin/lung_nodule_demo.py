"""``lung-nodule-demo``: candidate lung nodules on chest CT. Research use only.

A small 3D U-Net (:mod:`pacs_ai.models.nodules.unet`) trained by the project's own script
(``python -m pacs_ai.models.nodules.train``) on synthetic chest phantoms, never on patient
data; its weights ship in the package. It demonstrates the whole AI path, with real per-nodule
measurements, and says nothing reliable about real patients:

1. the CT is resampled to the training spacing if it is not within 10 % of it, and Hounsfield
   units are clipped and scaled as in training;
2. overlapping windows inside the body's bounding box run in batches through the network,
   their probabilities averaged with centre-weighted Gaussians, and the probability map
   goes back to the series' own grid before any threshold, so the label map is exact there;
3. voxels of probability ≥ 0.5 form 26-connected candidates; those under MIN_NODULE_MM3 are
   dropped, and each other one is a finding with its volume, longest diameter, centre and a
   certainty (the mean probability over its voxels).

Known limits. All of a synthetic training set: nodules touching the pleura, ground-glass
nodules, calcifications and anything else the phantom does not draw are unseen. And of a
small network, measured on 40 held-out 64×128×128 phantoms with 120 nodules: 2 nodules
under 5 mm were missed (taken for vessels), the volumes of those under 6 mm came out 15 %
low on average, and 4 vessels cut by the edge of the scan were reported as nodules of
10-15 mm³. From 6 mm up, volumes were within 15 % and diameters within 1 mm.

torch is imported only by ``load()`` (through :mod:`pacs_ai.models.nodules.unet`): the
registry imports this module to read its manifest, in processes that never run it.
"""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, spatial  # type: ignore[import-untyped]

from pacs_ai.imaging.volume import Volume
from pacs_ai.models.base import (
    ARTIFICIAL_INTELLIGENCE,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    Code,
    Finding,
    LabelSpec,
    ModelManifest,
    Prediction,
    require_ct_volume,
)
from pacs_ai.models.nodules import (
    BASE_CHANNELS,
    HU_RANGE,
    METADATA,
    SPACING_MM,
    SPACING_TOLERANCE,
    WEIGHTS,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NODULE = 1
THRESHOLD = 0.5
MIN_NODULE_MM3 = 10.0
"""Smaller candidates are noise: the smallest nodule trained on (radius 2 mm, axes down to
1.6 mm) is 17 mm³."""
MAX_DIAMETER_POINTS = 2000
BODY_MIN_HU = -500.0
"""Nodules are soft tissue inside the body: windows outside the box of everything denser
than this cannot hold one and are not run."""

MANIFEST = ModelManifest(
    name="lung-nodule-demo",
    version="0.1.0",
    task="detection",
    description=(
        "Demo lung nodule detection: a small 3D U-Net trained only on synthetic chest "
        "phantoms. Reports each candidate nodule's volume, longest diameter, location and "
        "certainty, and whether any is present. Research use only; not for diagnosis."
    ),
    labels=(
        # SCT 27925004 "Nodule" (a morphologic abnormality) is the type CID 7159 Lesion
        # Segmentation Types lists for the category Morphologically Abnormal Structure. The
        # lung-specific concepts are disorders, not morphologies, and belong in no CID 7159
        # list: 786838002 "Nodule of lung (disorder)", and 427359005 "Solitary nodule of
        # lung", which would also be wrong for a study with several. That the nodule lies
        # in the lung is an anatomic location (SCT 39607008 "Lung"), not part of its type.
        LabelSpec(
            NODULE,
            "Nodule",
            MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            Code("27925004", "SCT", "Nodule"),
        ),
    ),
    modalities=("CT",),
    min_slices=16,
    needs_3d=True,
    device="any",
    # Measured on a 300×512×512 series on CPU: a peak of about 1.1 GB beyond the input and
    # torch (a normalised copy, the accumulator, the probability map, component labels);
    # more when the series must be resampled first.
    memory_mb=2048,
    algorithm_family=ARTIFICIAL_INTELLIGENCE,
    research_only=True,
)


class LungNoduleDemo:
    """The :class:`~pacs_ai.models.base.Model` for ``lung-nodule-demo``.

    ``weights`` replaces the shipped checkpoint (the training script validates a new one
    this way); the registry's factory call passes nothing.
    """

    manifest: ModelManifest = MANIFEST

    def __init__(self, weights: Path | None = None) -> None:
        self._weights = weights
        self._net: Any = None  # the torch module, once loaded: typed loosely to keep torch out
        self._device: torch.device | None = None

    def load(self, device: str) -> None:
        import torch

        from pacs_ai.models.nodules.unet import load_unet

        self._device = torch.device(device)
        if self._weights is not None:
            self._net = load_unet(self._weights, self._device)
        else:
            shipped = resources.files("pacs_ai.models").joinpath("weights")
            _check_metadata(json.loads(shipped.joinpath(METADATA).read_text()))
            with resources.as_file(shipped.joinpath(WEIGHTS)) as path:
                self._net = load_unet(path, self._device)
        logger.info("%s loaded on %s", MANIFEST.name, self._device)

    def predict(self, volume: Volume) -> Prediction:
        if self._net is None or self._device is None:
            raise RuntimeError(f"{MANIFEST.name}: call load(device) before predict()")
        require_ct_volume(MANIFEST.name, volume)
        probability = probability_map(self._net, self._device, volume)
        labelmap, findings = nodules(probability, volume.spacing)
        logger.info(
            "%s on series %s: %d candidate nodule(s)",
            MANIFEST.name,
            volume.series_instance_uid,
            len(findings),
        )
        return Prediction(labelmap=labelmap, findings=findings, present=bool(findings))


def probability_map(net: Any, device: torch.device, volume: Volume) -> NDArray[np.float32]:
    """Nodule probability on the volume's own grid, from the loaded network ``net``."""
    from pacs_ai.models.nodules.unet import sliding_window

    scale = np.asarray(volume.spacing) / np.asarray(SPACING_MM)
    resample = bool(np.any(np.abs(scale - 1) > SPACING_TOLERANCE))
    hu = volume.voxels
    if resample:
        shape = tuple(int(n) for n in np.maximum(np.rint(np.asarray(hu.shape) * scale), 1))
        hu = ndimage.affine_transform(
            hu, 1 / scale, output_shape=shape, output=np.float32, order=1, mode="nearest"
        )
    probability = np.zeros(hu.shape, dtype=np.float32)
    box = _body_box(hu)
    if box is not None:
        batch = 16 if device.type == "cuda" else 4
        probability[box] = sliding_window(net, hu[box], device, batch)
    if resample:
        # Back to the source grid before thresholding: the label map is then the threshold
        # of a smooth map on the series' own voxels, not a blocky upsampled mask.
        probability = ndimage.affine_transform(
            probability,
            scale,
            output_shape=volume.shape,
            output=np.float32,
            order=1,
            mode="nearest",
        )
    return probability


def nodules(
    probability: NDArray[np.float32], spacing: tuple[float, float, float]
) -> tuple[NDArray[np.uint8], list[Finding]]:
    """Label map and findings, largest first, from a nodule probability map."""
    labels, _ = ndimage.label(probability >= THRESHOLD, structure=np.ones((3, 3, 3)))
    labelmap = np.zeros(probability.shape, dtype=np.uint8)
    voxel_mm3 = float(np.prod(spacing))
    findings: list[Finding] = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = labels[box] == index
        count = int(np.count_nonzero(component))
        if count * voxel_mm3 < MIN_NODULE_MM3:
            continue
        labelmap[box][component] = NODULE
        offset = np.array([s.start for s in box])
        findings.append(
            Finding(
                label=NODULE,
                name="Nodule",
                volume_ml=count * voxel_mm3 / 1000.0,
                longest_diameter_mm=longest_diameter_mm(component, spacing),
                certainty=float(probability[box][component].mean()),
                center=_center(component, spacing, offset),
            )
        )
    findings.sort(key=lambda f: f.volume_ml or 0.0, reverse=True)
    return labelmap, findings


def longest_diameter_mm(component: NDArray[np.bool_], spacing: tuple[float, float, float]) -> float:
    """Greatest distance in mm between two voxel centres of a voxel set.

    That is where calipers on the outermost voxels would read; on the phantoms it matches
    the true longest diameter within a few tenths of a millimetre on average, as the pair
    found is the one whose centres lie closest to the outline. The farthest pair lies on
    the convex hull of the surface voxels, so only the hull's vertices are compared.
    """
    step = np.asarray(spacing)
    surface = component & ~ndimage.binary_erosion(component)
    points = np.argwhere(surface) * step
    if len(points) < 2:
        return float(step.max())
    try:
        points = points[spatial.ConvexHull(points).vertices]
    except spatial.QhullError:
        # A flat or linear set has no 3D hull: compare its surface voxels, thinned so that
        # the pairwise matrix stays small (a voxel or so of error on a huge candidate).
        points = points[:: math.ceil(len(points) / MAX_DIAMETER_POINTS)]
    squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=-1)
    return float(np.sqrt(squared.max()))


def _center(
    component: NDArray[np.bool_], spacing: tuple[float, float, float], offset: NDArray[np.int_]
) -> tuple[int, int, int]:
    """The component's voxel nearest its centroid: inside the nodule even when it is not convex."""
    points = np.argwhere(component)
    mm = points * np.asarray(spacing)
    nearest = points[np.argmin(((mm - mm.mean(axis=0)) ** 2).sum(axis=1))] + offset
    return int(nearest[0]), int(nearest[1]), int(nearest[2])


def _body_box(hu: NDArray[np.float32]) -> tuple[slice, slice, slice] | None:
    """Bounding box of the voxels denser than BODY_MIN_HU, or None if there are none."""
    dense = hu > BODY_MIN_HU
    spans = []
    for axis in range(3):
        present = np.flatnonzero(np.any(dense, axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None
        spans.append(slice(int(present[0]), int(present[-1]) + 1))
    return spans[0], spans[1], spans[2]


def _check_metadata(metadata: dict[str, Any]) -> None:
    """Refuse shipped weights trained for another grid, intensity scaling or network width."""
    expected = {
        "spacing_mm": list(SPACING_MM),
        "hu_range": list(HU_RANGE),
        "base_channels": BASE_CHANNELS,
    }
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise ValueError(
                f"{MANIFEST.name}: the shipped weights were trained with {key} = "
                f"{metadata.get(key)!r}, the code expects {value!r}; retrain them"
            )
