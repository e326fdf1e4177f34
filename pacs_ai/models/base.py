"""The model plugin interface.

A model is a class with a :class:`ModelManifest` and two methods: ``load(device)`` once per
worker process, then ``predict(volume)`` per series. It returns a :class:`Prediction`: a label
map on the volume's grid plus findings with measurements. Turning that into DICOM SEG and SR
is the node's job, not the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from pacs_ai.imaging.volume import Volume


@dataclass(frozen=True)
class Code:
    """A coded concept, e.g. ``Code("39607008", "SCT", "Lung")``."""

    value: str
    scheme: str
    meaning: str


# SNOMED CT codes used by the built-in models (CID 7150 categories, CID 7151/7159 types).
ANATOMICAL_STRUCTURE = Code("123037004", "SCT", "Anatomical Structure")
TISSUE = Code("85756007", "SCT", "Tissue")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
# CID 7162 Surface Processing Algorithm Families: DCM 123110 "Artificial Intelligence".
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")


@dataclass(frozen=True)
class LabelSpec:
    """One label of a model's output: the value in the label map and what it means."""

    number: int
    name: str
    category: Code
    type: Code


@dataclass(frozen=True)
class ModelManifest:
    """What a model is and what it accepts; one per model, also for models loaded from disk."""

    name: str
    version: str
    task: Literal["segmentation", "detection", "classification"]
    description: str
    labels: tuple[LabelSpec, ...]
    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 1
    needs_3d: bool = True
    device: Literal["cpu", "cuda", "any"] = "any"
    memory_mb: int = 1024
    algorithm_family: Code = ARTIFICIAL_INTELLIGENCE
    research_only: bool = True


@dataclass(frozen=True)
class Finding:
    """One thing the model found, tied to a label, with what was measured of it."""

    label: int
    name: str
    volume_ml: float | None = None
    longest_diameter_mm: float | None = None
    certainty: float | None = None
    """0..1, the model's confidence that the finding is real."""
    center: tuple[int, int, int] | None = None
    """(slice, row, column) index of the finding's centre, for key slices and SR coordinates."""


@dataclass
class Prediction:
    labelmap: NDArray[np.uint8]
    """Shape = the volume's; 0 is background, other values are LabelSpec numbers."""
    findings: list[Finding] = field(default_factory=list)
    present: bool | None = None
    """For detection models: whether the study-level finding is present."""


@runtime_checkable
class Model(Protocol):
    manifest: ModelManifest

    def load(self, device: str) -> None: ...

    def predict(self, volume: Volume) -> Prediction: ...


def require_ct_volume(model: str, volume: Volume) -> None:
    """Refuse what a Hounsfield-unit model cannot read: another modality, or not 3D."""
    if volume.modality != "CT":
        raise ValueError(
            f"{model} reads Hounsfield units: modality must be CT, got {volume.modality!r}"
        )
    if volume.voxels.ndim != 3:
        raise ValueError(
            f"voxels must be 3D (slices, rows, columns), got shape {volume.voxels.shape}"
        )
