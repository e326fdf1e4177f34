"""A chest CT study shaped like a real one: several series, 512×512 slices, proper geometry.

The phantom is an elliptical body of soft tissue holding two lungs and a spine, in air.
Everything is drawn from analytic shapes, so the true volume of each structure is known
and returned with the study (:class:`ChestTruth`). Series written:

1. a scout (localizer), one projection image, ImageType ORIGINAL\\PRIMARY\\LOCALIZER;
2. an axial soft-tissue series at the requested slice count and thickness;
3. an axial lung-kernel series over the same range at twice the thickness.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

AIR, LUNG, SOFT, BONE = -1000.0, -850.0, 40.0, 700.0


@dataclass(frozen=True)
class Geometry:
    rows: int = 512
    columns: int = 512
    pixel_spacing_mm: float = 0.7
    slices: int = 300
    slice_thickness_mm: float = 1.25
    # Table position of the first (most inferior) slice, LPS z in mm.
    z0_mm: float = -200.0


@dataclass(frozen=True)
class Nodule:
    """A solid spherical nodule, centre in LPS millimetres (x, y, z)."""

    center_mm: tuple[float, float, float]
    radius_mm: float

    @property
    def volume_ml(self) -> float:
        return 4.0 / 3.0 * np.pi * self.radius_mm**3 / 1000.0


@dataclass
class ChestTruth:
    """What the phantom holds, in millilitres, per written series UID."""

    study_instance_uid: str
    series: dict[str, str] = field(default_factory=dict)  # description -> SeriesInstanceUID
    volumes_ml: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # series UID -> label -> ml
    files: list[Path] = field(default_factory=list)
    geometries: dict[str, Geometry] = field(default_factory=dict)  # series UID -> geometry
    nodules: tuple[Nodule, ...] = ()

    def masks(self, series_uid: str) -> dict[str, NDArray[np.bool_]]:
        """The true body / lungs / bone masks of a series, (slice, row, column), feet to head.

        The masks overlap (lungs and bone lie inside the body); ``body_rest`` is the body
        without them, what a one-label-per-voxel segmentation calls body.
        """
        masks = truth_masks(self.geometries[series_uid], self.nodules)
        masks["body_rest"] = masks["body"] & ~masks["lungs"] & ~masks["bone"]
        return masks


def truth_masks(geom: Geometry, nodules: tuple[Nodule, ...] = ()) -> dict[str, NDArray[np.bool_]]:
    """The phantom's structures sampled at the slice centres of ``geom``."""
    z = geom.z0_mm + (np.arange(geom.slices) + 0.5) * geom.slice_thickness_mm
    return _masks(geom, z, nodules)


def _masks(
    geom: Geometry, z_mm: NDArray[np.floating[Any]], nodules: tuple[Nodule, ...] = ()
) -> dict[str, NDArray[np.bool_]]:
    """Boolean masks (z, y, x) of body, lungs, bone and nodules at the slice centres ``z_mm``."""
    half = geom.columns * geom.pixel_spacing_mm / 2
    x = (np.arange(geom.columns) + 0.5) * geom.pixel_spacing_mm - half
    y = (np.arange(geom.rows) + 0.5) * geom.pixel_spacing_mm - half
    yy, xx = np.meshgrid(y, x, indexing="ij")
    zc = geom.z0_mm + geom.slices * geom.slice_thickness_mm / 2
    length = geom.slices * geom.slice_thickness_mm
    body2d = (xx / 160.0) ** 2 + (yy / 115.0) ** 2 <= 1.0
    bone2d = (xx / 14.0) ** 2 + ((yy - 75.0) / 16.0) ** 2 <= 1.0
    shape = (len(z_mm), geom.rows, geom.columns)
    body = np.broadcast_to(body2d, shape).copy()
    bone = np.broadcast_to(bone2d, shape).copy()
    lungs = np.zeros(shape, dtype=bool)
    for i, z in enumerate(z_mm):
        # Each lung an ellipsoid, narrowing towards apex and base.
        t = (z - zc) / (0.42 * length)
        if abs(t) >= 1:
            continue
        s = np.sqrt(1 - t * t)
        for cx in (-72.0, 72.0):
            lungs[i] |= ((xx - cx) / (55.0 * s)) ** 2 + ((yy + 5.0) / (75.0 * s)) ** 2 <= 1.0
    lungs &= body & ~bone
    found = np.zeros(shape, dtype=bool)
    for nodule in nodules:
        cx, cy, cz = nodule.center_mm
        for i, z in enumerate(z_mm):
            if abs(z - cz) <= nodule.radius_mm:
                found[i] |= (xx - cx) ** 2 + (yy - cy) ** 2 + (z - cz) ** 2 <= nodule.radius_mm**2
    # A nodule sits in the lung, so the lung (as a segmentation would fill it) keeps its space.
    return {"body": body, "lungs": lungs, "bone": bone, "nodules": found & lungs}


def _hu(masks: dict[str, NDArray[np.bool_]], rng: np.random.Generator) -> NDArray[np.int16]:
    hu = np.full(masks["body"].shape, AIR, dtype=np.float32)
    hu[masks["body"]] = SOFT
    hu[masks["lungs"]] = LUNG
    hu[masks["bone"]] = BONE
    hu[masks["nodules"]] = SOFT
    hu += rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _base(study: Dataset, series_uid: str, number: int, description: str) -> Dataset:
    ds = Dataset()
    for element in study:
        ds.add(element)
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.BodyPartExamined = "CHEST"
    ds.ProtocolName = "CHEST ROUTINE"
    ds.Manufacturer = "pacs-ai phantom"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40 if "LUNG" not in description else -600
    ds.WindowWidth = 400 if "LUNG" not in description else 1500
    ds.KVP = 120
    return ds


def _write(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_chest_ct(
    out_dir: Path,
    geometry: Geometry = Geometry(),
    seed: int = 0,
    patient_id: str = "PHANTOM-001",
    accession: str = "ACC0001",
    with_lung_series: bool = True,
    with_scout: bool = True,
    nodules: tuple[Nodule, ...] = (),
) -> ChestTruth:
    """Write the study under ``out_dir/<series number>/<n>.dcm``; return its truth.

    ``nodules`` are drawn as soft tissue inside the lungs (the part of each outside a lung is
    left out), for the nodule model's end-to-end tests.
    """
    rng = np.random.default_rng(seed)
    now = datetime.datetime(2026, 1, 15, 9, 30)
    study = Dataset()
    study.PatientName = "PHANTOM^CHEST"
    study.PatientID = patient_id
    study.PatientBirthDate = "19600101"
    study.PatientSex = "O"
    study.StudyInstanceUID = generate_uid()
    study.StudyDate = now.strftime("%Y%m%d")
    study.StudyTime = now.strftime("%H%M%S")
    study.AccessionNumber = accession
    study.StudyID = "1"
    study.StudyDescription = "CT CHEST PHANTOM"
    study.ReferringPhysicianName = "REFERRER^DEMO"
    study.FrameOfReferenceUID = generate_uid()
    study.SpecificCharacterSet = "ISO_IR 100"
    truth = ChestTruth(study.StudyInstanceUID, nodules=nodules)

    series_plan = [("AXIAL 1.25 SOFT TISSUE", 2, geometry)]
    if with_lung_series:
        lung = Geometry(
            geometry.rows,
            geometry.columns,
            geometry.pixel_spacing_mm,
            max(1, geometry.slices // 2),
            geometry.slice_thickness_mm * 2,
            geometry.z0_mm,
        )
        series_plan.append(("AXIAL 2.5 LUNG", 3, lung))

    if with_scout:
        scout_path, truth.series["SCOUT"] = _write_scout(out_dir, study, geometry, rng)
        truth.files.append(scout_path)

    for description, number, geom in series_plan:
        series_uid = generate_uid()
        truth.series[description] = series_uid
        truth.geometries[series_uid] = geom
        z = geom.z0_mm + (np.arange(geom.slices) + 0.5) * geom.slice_thickness_mm
        masks = _masks(geom, z, nodules)
        voxel_ml = geom.pixel_spacing_mm**2 * geom.slice_thickness_mm / 1000.0
        truth.volumes_ml[series_uid] = {k: float(m.sum()) * voxel_ml for k, m in masks.items()}
        pixels = _hu(masks, rng)
        half = geom.columns * geom.pixel_spacing_mm / 2
        base = _base(study, series_uid, number, description)
        base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        base.SliceThickness = geom.slice_thickness_mm
        base.PixelSpacing = [geom.pixel_spacing_mm, geom.pixel_spacing_mm]
        base.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        base.Rows, base.Columns = geom.rows, geom.columns
        base.ConvolutionKernel = "LUNG" if "LUNG" in description else "STANDARD"
        for i in range(geom.slices):
            ds = Dataset()
            for element in base:
                ds.add(element)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [
                -half + geom.pixel_spacing_mm / 2,
                -half + geom.pixel_spacing_mm / 2,
                float(z[i]),
            ]
            ds.SliceLocation = float(z[i])
            ds.PixelData = pixels[i].tobytes()
            path = out_dir / f"{number:03d}" / f"{i + 1:04d}.dcm"
            _write(ds, path)
            truth.files.append(path)
    return truth


def _write_scout(
    out_dir: Path, study: Dataset, geom: Geometry, rng: np.random.Generator
) -> tuple[Path, str]:
    series_uid = generate_uid()
    ds = _base(study, series_uid, 1, "SCOUT")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    del ds.RescaleType
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = geom.rows, geom.columns
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal projection
    ds.ImagePositionPatient = [-256.0, 0.0, 256.0]
    image = np.full((geom.rows, geom.columns), -1000.0, dtype=np.float32)
    image[96:416, 96:416] = 200.0
    image += rng.normal(0, 5.0, size=image.shape).astype(np.float32)
    ds.PixelData = np.clip(image, -1024, 3071).astype(np.int16).tobytes()
    path = out_dir / "001" / "0001.dcm"
    _write(ds, path)
    return path, series_uid
