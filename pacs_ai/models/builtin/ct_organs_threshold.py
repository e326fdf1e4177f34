"""``ct-organs-threshold``: body, lungs and bone on CT from Hounsfield units alone.

A classical model with no weights, so it runs on any real CT:

1. body: the largest 3D connected component of voxels above -500 HU, with its holes filled
   slice by slice, so that the lungs and the bowel gas lie inside it;
2. lungs: 3D components of air-like voxels (below -400 HU) inside the body, keeping the
   largest one or two that are big enough, with their vessels filled in slice by slice;
3. bone: voxels above 250 HU inside the body.

In the label map, lungs and bone override body. Each finding reports the volume of its whole
structure: the body's volume is the body region's, lungs and bone included, as a body volume
is usually meant.

Known limits, all of a classical model: the trachea and main bronchi count as lung;
contrast-filled vessels and metal count as bone; lungs cut open by the edge of the field of
view are not holes in the body, so they are not found; a patient table touching the body
counts as body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped]

from pacs_ai.imaging.volume import Volume
from pacs_ai.models.base import (
    ANATOMICAL_STRUCTURE,
    TISSUE,
    Code,
    Finding,
    LabelSpec,
    ModelManifest,
    Prediction,
    require_ct_volume,
)

logger = logging.getLogger(__name__)

BODY_MIN_HU = -500.0
"""Above this is tissue (fat is about -100); below it, air and lung parenchyma."""
AIR_MAX_HU = -400.0
"""Lung parenchyma is about -850; -400 also keeps the partial-volume rim of the lungs."""
BONE_MIN_HU = 250.0
"""Above soft tissue and unenhanced blood (under 100) with room for noise; below cortex."""
MIN_LUNG_ML = 20.0
"""An air pocket smaller than this is bowel gas or an airway fragment, not a lung."""
MIN_LUNG_FRACTION = 0.1
"""A second air component must be this share of the largest to count as the other lung:
both lungs are usually one component (joined by the airways), and the next largest is then
the stomach or bowel gas."""

BODY, LUNGS, BONE = 1, 2, 3

MANIFEST = ModelManifest(
    name="ct-organs-threshold",
    version="1.0.0",
    task="segmentation",
    description=(
        "Classical HU-based body, lungs and bone segmentation with connected components; "
        "works on real CT, no weights. Reports organ volumes."
    ),
    labels=(
        # "Entire body" is the concept DICOM uses for the body as a whole (CID 4031,
        # BodyPartExamined WHOLEBODY): the label is everything inside the skin in the
        # scanned range. "Body structure" (123037004) is already the category.
        LabelSpec(BODY, "Body", ANATOMICAL_STRUCTURE, Code("38266002", "SCT", "Entire body")),
        LabelSpec(LUNGS, "Lungs", ANATOMICAL_STRUCTURE, Code("39607008", "SCT", "Lung")),
        # Bone here is a tissue class found by density, not one named bone.
        LabelSpec(BONE, "Bone", TISSUE, Code("272673000", "SCT", "Bone structure")),
    ),
    modalities=("CT",),
    min_slices=20,
    needs_3d=True,
    device="cpu",
    # Measured: about 650 MB beyond the input for a 300×512×512 series (int32 component
    # labels and a few boolean masks), so 512 would be too little.
    memory_mb=1024,
    # CID 7162: thresholds grown into connected regions are neighbourhood analysis; the
    # default family, Artificial Intelligence, would misdescribe a model with no training.
    algorithm_family=Code("123101", "DCM", "Neighborhood Analysis"),
    research_only=True,
)


@dataclass(frozen=True)
class OrganMasks:
    """Boolean masks on the volume's grid; ``body`` includes the lungs and bone within it."""

    body: NDArray[np.bool_]
    lungs: NDArray[np.bool_]
    bone: NDArray[np.bool_]


class CtOrgansThreshold:
    """The :class:`~pacs_ai.models.base.Model` for ``ct-organs-threshold``."""

    manifest: ModelManifest = MANIFEST

    def load(self, device: str) -> None:
        # No weights and CPU-only arithmetic: whatever device the worker offers, there is
        # nothing to load or place on it.
        logger.debug("%s needs no loading (device %s ignored)", MANIFEST.name, device)

    def predict(self, volume: Volume) -> Prediction:
        require_ct_volume(MANIFEST.name, volume)
        masks = segment(volume.voxels, volume.voxel_volume_ml)
        labelmap = np.zeros(volume.voxels.shape, dtype=np.uint8)
        labelmap[masks.body] = BODY
        labelmap[masks.lungs] = LUNGS
        labelmap[masks.bone] = BONE
        # One label per voxel: "Body" is what remains of the body outline once lungs and bone
        # have their own labels, and its reported volume is that of its segment, so the SR
        # and the SEG it references agree.
        findings = [
            Finding(
                label=spec.number,
                name=spec.name,
                volume_ml=count * volume.voxel_volume_ml,
                center=_center(mask),
            )
            for spec in MANIFEST.labels
            if (count := int(np.count_nonzero(mask := labelmap == spec.number))) > 0
        ]
        logger.info(
            "%s on series %s: %s",
            MANIFEST.name,
            volume.series_instance_uid,
            ", ".join(f"{f.name} {f.volume_ml:.0f} mL" for f in findings) or "nothing found",
        )
        return Prediction(labelmap=labelmap, findings=findings)


def segment(hu: NDArray[np.floating], voxel_ml: float) -> OrganMasks:
    """Body, lungs and bone masks of a CT volume in HU, shape (slices, rows, columns)."""
    body = _fill_in_plane(_largest_component(hu > BODY_MIN_HU))
    lungs = _lungs((hu < AIR_MAX_HU) & body, voxel_ml)
    bone = (hu > BONE_MIN_HU) & body
    return OrganMasks(body=body, lungs=lungs, bone=bone)


def _components(
    mask: NDArray[np.bool_],
) -> tuple[NDArray[np.int32], list[tuple[slice, ...]], NDArray[np.int64]]:
    """Label 6-connected components; return labels, bounding boxes and voxel counts."""
    labels, _ = ndimage.label(mask)
    boxes: list[tuple[slice, ...]] = ndimage.find_objects(labels)
    # Counting inside each bounding box is several times faster than a bincount over the
    # whole volume, which first copies the int32 labels to int64.
    sizes = np.array(
        [np.count_nonzero(labels[box] == i + 1) for i, box in enumerate(boxes)], dtype=np.int64
    )
    return labels, boxes, sizes


def _largest_component(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    labels, _, sizes = _components(mask)
    if sizes.size == 0:
        return mask
    largest: NDArray[np.bool_] = labels == int(np.argmax(sizes)) + 1
    return largest


def _fill_in_plane(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Fill the holes of ``mask`` slice by slice.

    Slice-wise, not in 3D: in 3D the lungs reach the outside through the airways whenever
    the scan includes the nose or mouth, and would not be holes at all.
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, count = ndimage.label(~mask, structure=in_plane)
    edges = (background[:, 0, :], background[:, -1, :], background[:, :, 0], background[:, :, -1])
    outside = np.zeros(count + 1, dtype=bool)
    for edge in edges:
        outside[edge.ravel()] = True
    outside[0] = False  # label 0 is the mask itself
    filled: NDArray[np.bool_] = ~outside[background]
    return filled


def _lungs(air: NDArray[np.bool_], voxel_ml: float) -> NDArray[np.bool_]:
    """The largest one or two air components inside the body, with vessels filled in."""
    labels, boxes, sizes = _components(air)
    lungs = np.zeros(air.shape, dtype=bool)
    if sizes.size == 0:
        return lungs
    order = np.argsort(sizes, kind="stable")[::-1][:2]
    for index in order:
        size = int(sizes[index])
        if size * voxel_ml < MIN_LUNG_ML or size < MIN_LUNG_FRACTION * sizes[order[0]]:
            continue
        box = boxes[index]
        # Per component, in its own bounding box: two separate lungs then never enclose the
        # mediastinum between them (lungs joined by the airways still could, in a slice where
        # they touch both in front of and behind the heart).
        lungs[box] |= _fill_in_plane(labels[box] == index + 1)
    return lungs


def _center(mask: NDArray[np.bool_]) -> tuple[int, int, int]:
    """A voxel of the structure near its centre, for key slices and SR coordinates.

    The centroid of both lungs lies in the mediastinum, outside the structure; so take the
    structure's mean slice and, on it, the structure's pixel nearest the in-slice centroid.
    """
    per_slice = np.count_nonzero(mask, axis=(1, 2))
    slices = np.flatnonzero(per_slice)
    mean_slice = float(np.average(np.arange(mask.shape[0]), weights=per_slice))
    s = int(slices[np.argmin(np.abs(slices - mean_slice))])
    points = np.argwhere(mask[s])
    centroid = points.mean(axis=0)
    r, c = points[np.argmin(((points - centroid) ** 2).sum(axis=1))]
    return s, int(r), int(c)
