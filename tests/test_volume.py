"""Series → volume: ordering, geometry, rescale, refusals, and mapping results back.

The phantom's geometry is known analytically: the spine is an elliptic cylinder centred on
LPS (0, 75 mm, z) along the whole series, so its centroid is a physical point the volume's
affine must land on whatever order, orientation or pixel shape the slices are given in.
Variants are made by editing the pydicom datasets in memory, consistently with the pixels.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, generate_uid

from pacs_ai.errors import NotAVolume
from pacs_ai.imaging.volume import (
    Volume,
    _exact_in_float32,
    build_volume,
    frames_for,
    in_volume_order,
    load_series,
    to_source_order,
)
from pacs_ai.phantoms.chest_ct import BONE, ChestTruth, Geometry, write_chest_ct
from tests.realdata import real_file

GEOMETRY = Geometry(rows=96, columns=96, pixel_spacing_mm=4.0, slices=16, slice_thickness_mm=5.0)
HALF = GEOMETRY.columns * GEOMETRY.pixel_spacing_mm / 2
Z_CENTRE = GEOMETRY.z0_mm + GEOMETRY.slices * GEOMETRY.slice_thickness_mm / 2
SPINE_LPS = np.array([0.0, 75.0, Z_CENTRE])
# Half the largest in-plane pixel: how far a discretised centroid may sit from the true one.
CENTROID_TOLERANCE_MM = 2.0


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> ChestTruth:
    return write_chest_ct(
        tmp_path_factory.mktemp("volume"), GEOMETRY, seed=7, with_lung_series=False
    )


@pytest.fixture
def series(study: ChestTruth) -> list[Dataset]:
    """The axial series, freshly read so that each test may edit it."""
    return load_series(sorted(p for p in study.files if p.parent.name == "002"))


@pytest.fixture
def axial(series: list[Dataset]) -> Volume:
    return build_volume(series)


def _ds(values: NDArray[np.float64]) -> list[str]:
    """Decimal strings as a scanner writes them (DS holds at most 16 characters)."""
    return [f"{v:.6f}" for v in values]


def _set_pixels(ds: Dataset, pixels: NDArray[np.int16]) -> None:
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()


def _spine_centroid(volume: Volume) -> NDArray[np.float64]:
    index = np.argwhere(volume.voxels > (BONE / 2)).mean(axis=0)
    return np.asarray((volume.affine @ np.append(index, 1.0))[:3], dtype=np.float64)


def _assert_affine_hits_every_slice(volume: Volume, datasets: list[Dataset]) -> None:
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for k, uid in enumerate(volume.sop_instance_uids):
        ipp = np.asarray(by_uid[uid].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose((volume.affine @ [k, 0, 0, 1])[:3], ipp, atol=1e-3)


def _rotation(degrees_about_x: float, degrees_about_z: float) -> NDArray[np.float64]:
    a, b = np.radians(degrees_about_x), np.radians(degrees_about_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    rotation: NDArray[np.float64] = rz @ rx
    return rotation


# ---- ordering and geometry ------------------------------------------------------------------


def test_axial_series_geometry_and_values(axial: Volume, series: list[Dataset]) -> None:
    assert axial.shape == (GEOMETRY.slices, GEOMETRY.rows, GEOMETRY.columns)
    assert axial.voxels.dtype == np.float32
    assert axial.spacing == pytest.approx((5.0, 4.0, 4.0))
    first = -HALF + GEOMETRY.pixel_spacing_mm / 2
    np.testing.assert_allclose(axial.affine[:3, 3], [first, first, -197.5])
    assert axial.sop_instance_uids == tuple(str(ds.SOPInstanceUID) for ds in series)
    assert axial.series_instance_uid == str(series[0].SeriesInstanceUID)
    assert axial.frame_of_reference_uid == str(series[0].FrameOfReferenceUID)
    assert axial.modality == "CT"
    np.testing.assert_array_equal(axial.voxels[3], pixel_array(series[3]).astype(np.float32))
    np.testing.assert_allclose(_spine_centroid(axial), SPINE_LPS, atol=CENTROID_TOLERANCE_MM)
    _assert_affine_hits_every_slice(axial, series)


def test_reversed_and_shuffled_order_give_the_same_volume(
    axial: Volume, series: list[Dataset]
) -> None:
    shuffled = series[::-1]
    random.Random(3).shuffle(shuffled)
    for n, ds in enumerate(shuffled):
        ds.InstanceNumber = n + 1  # numbering that contradicts the geometry must not matter
    for order in (series[::-1], shuffled):
        volume = build_volume(order)
        np.testing.assert_array_equal(volume.voxels, axial.voxels)
        np.testing.assert_array_equal(volume.affine, axial.affine)
        assert volume.sop_instance_uids == axial.sop_instance_uids


def test_feet_first_series_runs_along_its_own_normal(axial: Volume, series: list[Dataset]) -> None:
    # Feet first supine: the row direction points to the patient's right, so the normal
    # (row × column) points to the feet. Mirror the columns so every pixel stays where it was.
    for ds in series:
        ds.PatientPosition = "FFS"
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = _ds(np.array([-x, y, z]))
        _set_pixels(ds, pixel_array(ds)[:, ::-1])
    volume = build_volume(series)
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, -5.0])
    assert volume.spacing == pytest.approx((5.0, 4.0, 4.0))
    np.testing.assert_array_equal(volume.voxels, axial.voxels[::-1, :, ::-1])
    assert volume.sop_instance_uids == axial.sop_instance_uids[::-1]
    np.testing.assert_allclose(_spine_centroid(volume), SPINE_LPS, atol=CENTROID_TOLERANCE_MM)
    _assert_affine_hits_every_slice(volume, series)


def test_oblique_series_affine_follows_the_rotation(axial: Volume, series: list[Dataset]) -> None:
    rotation = _rotation(30.0, 20.0)
    for ds in series:
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
        ds.ImageOrientationPatient = _ds(
            np.concatenate([rotation @ orientation[:3], rotation @ orientation[3:]])
        )
        ds.ImagePositionPatient = _ds(rotation @ np.asarray(ds.ImagePositionPatient, dtype=float))
    random.Random(5).shuffle(series)
    volume = build_volume(series)
    np.testing.assert_array_equal(volume.voxels, axial.voxels)
    rigid = np.eye(4)
    rigid[:3, :3] = rotation
    np.testing.assert_allclose(volume.affine, rigid @ axial.affine, atol=1e-4)
    _assert_affine_hits_every_slice(volume, series)
    np.testing.assert_allclose(
        _spine_centroid(volume), rotation @ SPINE_LPS, atol=CENTROID_TOLERANCE_MM
    )


def test_non_square_pixels(tmp_path: Path) -> None:
    # Keep every other column of a 2 mm phantom: 2 mm between rows, 4 mm between columns,
    # and the first pixel (hence ImagePositionPatient) unchanged.
    fine = Geometry(rows=192, columns=192, pixel_spacing_mm=2.0, slices=6, slice_thickness_mm=5.0)
    truth = write_chest_ct(tmp_path, fine, seed=2, with_lung_series=False, with_scout=False)
    series = load_series(truth.files)
    for ds in series:
        _set_pixels(ds, pixel_array(ds)[:, ::2])
        ds.PixelSpacing = [2.0, 4.0]  # [row spacing, column spacing]
    volume = build_volume(series)
    assert volume.shape == (6, 192, 96)
    assert volume.spacing == pytest.approx((5.0, 2.0, 4.0))
    np.testing.assert_allclose(volume.affine[:3, 1], [0, 2.0, 0])  # next row: +y by 2 mm
    np.testing.assert_allclose(volume.affine[:3, 2], [4.0, 0, 0])  # next column: +x by 4 mm
    z_centre = fine.z0_mm + fine.slices * fine.slice_thickness_mm / 2
    np.testing.assert_allclose(
        _spine_centroid(volume), [0.0, 75.0, z_centre], atol=CENTROID_TOLERANCE_MM
    )


@pytest.mark.parametrize(
    ("thickness_mm", "step_mm"),
    [(5.0, 2.5), (1.0, 3.0)],
    ids=["5mm-slices-every-2.5mm-overlapping", "1mm-slices-every-3mm"],
)
def test_slice_spacing_is_the_position_step_not_the_slice_thickness(
    axial: Volume, series: list[Dataset], thickness_mm: float, step_mm: float
) -> None:
    # SliceThickness is how thick a slab each image integrates; the grid is where the images
    # lie. Move the slices to step_mm apart (same pixels, same order along z; SliceLocation
    # kept consistent) and give them a SliceThickness that disagrees with that step.
    z_first = float(axial.affine[2, 3])
    position = {uid: k for k, uid in enumerate(axial.sop_instance_uids)}
    for ds in series:
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        k = position[str(ds.SOPInstanceUID)]
        ds.ImagePositionPatient = _ds(np.array([x, y, z_first + k * step_mm]))
        ds.SliceLocation = f"{z_first + k * step_mm:.6f}"
        ds.SliceThickness = thickness_mm
    random.Random(13).shuffle(series)
    volume = build_volume(series)
    assert volume.spacing == pytest.approx((step_mm, 4.0, 4.0))
    assert volume.voxel_volume_ml == pytest.approx(step_mm * 16.0 / 1000)
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, step_mm])
    np.testing.assert_allclose(volume.affine[:3, 1:], axial.affine[:3, 1:])  # in-plane, origin
    np.testing.assert_array_equal(volume.voxels, axial.voxels)
    assert volume.sop_instance_uids == axial.sop_instance_uids
    _assert_affine_hits_every_slice(volume, series)
    # The spine runs the whole series, so its centroid sits halfway along the new stack.
    z_centre = z_first + (GEOMETRY.slices - 1) / 2 * step_mm
    np.testing.assert_allclose(
        _spine_centroid(volume), [0.0, 75.0, z_centre], atol=CENTROID_TOLERANCE_MM
    )


# ---- values ---------------------------------------------------------------------------------


def test_rescale_slope_and_intercept_apply_per_slice(axial: Volume, series: list[Dataset]) -> None:
    for ds in series[1::2]:
        hu = pixel_array(ds).astype(np.int32)
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024
        _set_pixels(ds, ((hu + 1024) * 2).astype(np.int16))
    volume = build_volume(series)
    np.testing.assert_array_equal(volume.voxels, axial.voxels)


def test_modality_lut_sequence_is_applied() -> None:
    ds = pydicom.dcmread(real_file("MR_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "US", [3 * v + 7 for v in range(4096)])
    ds.ModalityLUTSequence = [item]
    volume = build_volume([ds], require_3d=False)
    np.testing.assert_array_equal(volume.voxels[0], pixel_array(ds) * 3.0 + 7.0)


@pytest.mark.parametrize(
    ("modality", "rescale_type", "inverted"),
    [("CT", "HU", False), ("CT", None, False), ("MR", None, True), ("OT", "US", True)],
)
def test_monochrome1_inverts_only_values_without_physical_units(
    axial: Volume, series: list[Dataset], modality: str, rescale_type: str | None, inverted: bool
) -> None:
    for ds in series:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.Modality = modality
        if rescale_type is None:
            del ds.RescaleType
        else:
            ds.RescaleType = rescale_type
    volume = build_volume(series)
    # Signed 16-bit stored range is -32768..32767, so inversion within it maps v to -1 - v.
    expected = -1.0 - axial.voxels if inverted else axial.voxels
    np.testing.assert_array_equal(volume.voxels, expected)


@pytest.mark.parametrize("name", ["RG3_UNCR.dcm", "RG3_J2KR.dcm"])
def test_real_monochrome1_radiograph_is_inverted(name: str) -> None:
    reference = pixel_array(pydicom.dcmread(real_file("RG3_UNCR.dcm")))
    ds = pydicom.dcmread(real_file(name))
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 10
    with pytest.raises(NotAVolume, match="lacks ImageOrientationPatient"):
        build_volume([ds], require_3d=False)  # a projection radiograph has no patient plane
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [0.2, 0.2]
    ds.FrameOfReferenceUID = generate_uid()
    volume = build_volume([ds], require_3d=False)
    np.testing.assert_array_equal(volume.voxels[0], 1023.0 - reference)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_compressed_real_files_decode_to_the_uncompressed_voxels(name: str) -> None:
    reference = build_volume([pydicom.dcmread(real_file("MR_small.dcm"))], require_3d=False)
    volume = build_volume(load_series([real_file(name)]), require_3d=False)
    np.testing.assert_array_equal(volume.voxels, reference.voxels)
    np.testing.assert_array_equal(volume.affine, reference.affine)


def test_jpeg2000_ct_decodes_to_hounsfield_units() -> None:
    reference = build_volume(load_series([real_file("693_UNCR.dcm")]), require_3d=False)
    volume = build_volume(load_series([real_file("693_J2KR.dcm")]), require_3d=False)
    np.testing.assert_array_equal(volume.voxels, reference.voxels)
    assert volume.voxels.min() < -900  # intercept -1024 applied: air is near -1000 HU
    assert volume.frame_of_reference_uid == ""  # these files lack it; recorded, not invented


@pytest.mark.parametrize(
    ("allocated", "stored", "signed"),
    [(16, 16, 1), (16, 12, 1), (16, 12, 0), (8, 8, 0), (8, 7, 1), (32, 32, 1), (32, 20, 0)],
)
def test_uncompressed_pixels_are_read_in_place_as_pydicom_decodes_them(
    series: list[Dataset],
    monkeypatch: pytest.MonkeyPatch,
    allocated: int,
    stored: int,
    signed: int,
) -> None:
    ds = series[0]
    # Random bytes: the unused high bits hold garbage, which must be shifted out as pydicom
    # does. 5x5 pixels of 8 bits are an odd length, padded with one byte.
    ds.Rows = ds.Columns = 5
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = signed
    ds.RescaleSlope, ds.RescaleIntercept = 0.37, -3.5
    size = 25 * allocated // 8
    ds.PixelData = np.random.default_rng(allocated + stored).bytes(size) + b"\0" * (size % 2)
    expected = (pixel_array(ds).astype(np.float64) * 0.37 - 3.5).astype(np.float32)

    def no_decoder(_: Dataset) -> None:
        raise AssertionError("uncompressed pixel data went through pydicom's decoder")

    monkeypatch.setattr("pacs_ai.imaging.volume.pixel_array", no_decoder)
    volume = build_volume([ds], require_3d=False)
    np.testing.assert_array_equal(volume.voxels[0], expected)


@pytest.mark.parametrize(
    ("allocated", "signed", "slope", "intercept"),
    [
        (16, 1, 1, -1024),  # the usual CT: the float32 shortcut
        (16, 0, 1, -32768),  # unsigned, shifted
        (16, 1, 255, 7),  # the largest integer slope the shortcut takes for 16 bits
        (16, 0, 257, -(2**24)),  # 257 * 65535 rounds in float32 before the intercept
        (8, 0, 2, -1),
        (16, 1, 1.5, -1024),  # a fractional slope
        (32, 1, 1, -2147483000),  # 32-bit values round in float32 before the intercept
    ],
)
def test_integer_rescales_give_what_float64_gives(
    series: list[Dataset], allocated: int, signed: int, slope: float, intercept: float
) -> None:
    ds = series[0]
    ds.Rows, ds.Columns = 4, 8
    ds.BitsAllocated = ds.BitsStored = allocated
    ds.HighBit, ds.PixelRepresentation = allocated - 1, signed
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    kind = f"<{'i' if signed else 'u'}{allocated // 8}"
    info = np.iinfo(kind)
    # The extremes of the type and values around them, where rounding would show.
    values = np.array([info.min, info.min + 1, -3, -1, 0, 1, 3, info.max - 1, info.max] * 4)
    stored = np.clip(values, info.min, info.max)[:32].astype(kind).reshape(4, 8)
    ds.PixelData = stored.tobytes()
    expected = (stored.astype(np.float64) * float(slope) + float(intercept)).astype(np.float32)
    volume = build_volume([ds], require_3d=False)
    np.testing.assert_array_equal(volume.voxels[0], expected)


@pytest.mark.parametrize(
    ("dtype", "slope", "intercept"),
    [
        ("<i2", 1, -1024),
        ("<i2", 255, -(2**24 - 255 * 65536 - 1)),  # the largest values the shortcut takes
        ("<u2", -255, 2**24 - 255 * 65536 - 1),
        ("u1", 65535, -1),
        ("i1", -65535, 0),
    ],
)
def test_the_float32_shortcut_is_exact_over_every_stored_value(
    series: list[Dataset], dtype: str, slope: int, intercept: int
) -> None:
    info = np.iinfo(dtype)
    # Every value the type holds, as one square slice (256² for 16 bits, 16² for 8).
    side = 256 if info.bits == 16 else 16
    stored = np.arange(info.min, int(info.max) + 1).astype(dtype).reshape(side, side)
    assert _exact_in_float32(stored, float(slope), float(intercept))
    ds = series[0]
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = info.bits
    ds.HighBit, ds.PixelRepresentation = info.bits - 1, int(info.min < 0)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = stored.tobytes()
    expected = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    volume = build_volume([ds], require_3d=False)
    np.testing.assert_array_equal(volume.voxels[0], expected)


def test_the_float32_shortcut_is_refused_where_float32_would_round() -> None:
    def exact(dtype: str, slope: float, intercept: float = 0.0) -> bool:
        return _exact_in_float32(np.zeros(4, dtype=dtype), slope, intercept)

    assert not exact("<i2", 1.0, 2.0**24)  # 2^24 + 1 is not a float32
    assert not exact("<i2", 1.5) and not exact("<i2", 1.0, -0.5)  # not integers: rounding
    assert not exact("<i4", 1.0) and not exact("<i8", 1.0)  # values past 2^24
    assert not exact("<f4", 1.0)


def test_a_series_is_loaded_in_the_order_of_its_paths(study: ChestTruth, tmp_path: Path) -> None:
    paths = list(study.files)
    random.Random(7).shuffle(paths)
    loaded = load_series(paths)
    assert [str(ds.SOPInstanceUID) for ds in loaded] == [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths
    ]
    # One bad file among many is named, whichever thread read it.
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(NotAVolume, match=r"notes\.txt is not a DICOM file"):
        load_series([*paths[:10], bad, *paths[10:]])
    with pytest.raises(FileNotFoundError):
        load_series([*paths[:10], tmp_path / "gone.dcm"])


def test_single_slice_is_a_volume_only_when_3d_is_not_required() -> None:
    datasets = load_series([real_file("CT_small.dcm")])
    with pytest.raises(NotAVolume, match="single slice") as refused:
        build_volume(datasets)
    assert "3D" in refused.value.reason
    volume = build_volume(datasets, require_3d=False)
    ds = datasets[0]
    assert volume.shape == (1, 128, 128)
    assert volume.spacing == pytest.approx((5.0, 0.661468, 0.661468))  # depth = SliceThickness
    np.testing.assert_array_equal(volume.voxels[0], pixel_array(ds) * 1.0 - 1024.0)
    np.testing.assert_allclose(volume.affine[:3, 3], [float(v) for v in ds.ImagePositionPatient])


# ---- refusals -------------------------------------------------------------------------------


def test_empty_series_is_refused() -> None:
    with pytest.raises(NotAVolume, match="no instances"):
        build_volume([])


def test_object_without_pixel_data_is_refused() -> None:
    with pytest.raises(NotAVolume, match="no image pixel data"):
        build_volume(load_series([real_file("reportsi.dcm")]), require_3d=False)


def test_colour_image_is_refused() -> None:
    with pytest.raises(NotAVolume, match="not a grayscale image"):
        build_volume(load_series([real_file("examples_rgb_color.dcm")]), require_3d=False)


def test_multi_frame_object_is_refused_as_not_supported_yet() -> None:
    with pytest.raises(NotAVolume, match=r"multi-frame .* not supported yet"):
        build_volume(load_series([real_file("emri_small.dcm")]))


def test_localizer_is_refused(study: ChestTruth, series: list[Dataset]) -> None:
    scout = load_series([p for p in study.files if p.parent.name == "001"])
    with pytest.raises(NotAVolume, match="localizer"):
        build_volume(scout, require_3d=False)
    series[4].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with pytest.raises(NotAVolume, match="InstanceNumber 5 is a localizer"):
        build_volume(series)


def test_mixed_orientations_are_refused_beyond_tolerance(series: list[Dataset]) -> None:
    series[6].ImageOrientationPatient = [1, 0, 0, 0, 0.99995, 0.0000999]  # within 1e-4: same
    build_volume(series)
    tilt = np.radians(1.0)
    series[6].ImageOrientationPatient = _ds(np.array([1, 0, 0, 0, np.cos(tilt), np.sin(tilt)]))
    with pytest.raises(NotAVolume, match=r"mixed orientations.*InstanceNumber 7"):
        build_volume(series)


def test_differing_rows_and_columns_are_refused(series: list[Dataset]) -> None:
    _set_pixels(series[2], pixel_array(series[2])[:64, :64])
    with pytest.raises(NotAVolume, match=r"Rows/Columns differ.*64×64"):
        build_volume(series)


def test_differing_pixel_spacing_is_refused(series: list[Dataset]) -> None:
    series[9].PixelSpacing = [4.1, 4.1]
    with pytest.raises(NotAVolume, match=r"PixelSpacing differs.*InstanceNumber 10"):
        build_volume(series)


@pytest.mark.parametrize(
    "keyword",
    ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"],
)
def test_missing_geometry_is_refused(series: list[Dataset], keyword: str) -> None:
    delattr(series[3], keyword)
    with pytest.raises(NotAVolume, match=f"InstanceNumber 4 lacks {keyword}"):
        build_volume(series)


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("ImageOrientationPatient", [1, 0, 0, 0.1, 1, 0], "is not orthonormal"),
        ("ImagePositionPatient", [0, 0], "malformed ImagePositionPatient"),
        ("PixelSpacing", [0, 4], "malformed PixelSpacing"),
    ],
)
def test_malformed_geometry_is_refused(
    series: list[Dataset], keyword: str, value: list[float], reason: str
) -> None:
    for ds in series:
        setattr(ds, keyword, value)
    with pytest.raises(NotAVolume, match=reason):
        build_volume(series)


def test_instances_of_two_series_are_refused(series: list[Dataset]) -> None:
    series[0].SeriesInstanceUID = generate_uid()
    with pytest.raises(NotAVolume, match="2 different SeriesInstanceUID"):
        build_volume(series)


def test_duplicate_positions_are_refused(series: list[Dataset]) -> None:
    twin = copy.deepcopy(series[3])
    twin.SOPInstanceUID = generate_uid()
    twin.InstanceNumber = 99
    with pytest.raises(NotAVolume, match=r"duplicate positions.*InstanceNumber (4|99)"):
        build_volume([*series, twin])


def test_gap_is_refused_naming_the_slice_pair(series: list[Dataset]) -> None:
    del series[7]
    with pytest.raises(NotAVolume, match="gap between slices 6 and 7") as refused:
        build_volume(series)
    assert "InstanceNumber 7 and InstanceNumber 9" in refused.value.reason
    assert "10.000 mm apart" in refused.value.reason


def test_non_uniform_spacing_is_refused_beyond_tolerance(series: list[Dataset]) -> None:
    x, y, z = (float(v) for v in series[5].ImagePositionPatient)
    series[5].ImagePositionPatient = _ds(np.array([x, y, z + 0.005]))  # DS rounding: fine
    build_volume(series)
    series[5].ImagePositionPatient = _ds(np.array([x, y, z + 1.0]))
    with pytest.raises(NotAVolume, match="non-uniform spacing between slices 4 and 5"):
        build_volume(series)


def test_sheared_stack_is_refused(series: list[Dataset]) -> None:
    for k, ds in enumerate(series):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = _ds(np.array([x, y + 0.5 * k, z]))  # a tilted gantry
    with pytest.raises(NotAVolume, match=r"sideways.*gantry tilt"):
        build_volume(series)


@pytest.mark.parametrize(
    ("transfer_syntax", "truncate"),
    [("1.2.840.10008.1.2.5", True), ("1.2.840.10008.1.2.4.110", False)],
    ids=["corrupt-rle", "unsupported-jpeg-xl"],
)
def test_undecodable_pixel_data_is_refused(transfer_syntax: str, truncate: bool) -> None:
    ds = pydicom.dcmread(real_file("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    if truncate:
        ds.PixelData = ds.PixelData[:200]
    with pytest.raises(NotAVolume, match="cannot decode the pixel data of InstanceNumber 1"):
        build_volume([ds], require_3d=False)


def test_non_dicom_file_is_refused_by_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(NotAVolume, match=r"notes\.txt is not a DICOM file"):
        load_series([path])


# ---- mapping results back -------------------------------------------------------------------


def test_results_map_back_onto_the_source_frames_exactly(series: list[Dataset]) -> None:
    shuffled = list(series)
    random.Random(11).shuffle(shuffled)
    volume = build_volume(shuffled)
    slices = frames_for(volume)
    assert sorted(slices.values()) == list(range(GEOMETRY.slices))
    # The lungs narrow towards apex and base and the noise differs per slice, so a slice
    # mapped onto the wrong source frame cannot match by accident (the spine would).
    lungs = (volume.voxels > -950) & (volume.voxels < -700)
    assert len({int(m.sum()) for m in lungs}) > GEOMETRY.slices // 2
    per_source = to_source_order(lungs, volume, shuffled)
    voxels_per_source = to_source_order(volume.voxels, volume, shuffled)
    for n, ds in enumerate(shuffled):
        stored = pixel_array(ds)
        np.testing.assert_array_equal(volume.voxels[slices[str(ds.SOPInstanceUID)]], stored)
        np.testing.assert_array_equal(voxels_per_source[n], stored)
        np.testing.assert_array_equal(per_source[n], (stored > -950) & (stored < -700))
    ordered = in_volume_order(shuffled, volume)
    assert tuple(str(ds.SOPInstanceUID) for ds in ordered) == volume.sop_instance_uids
    for k, ds in enumerate(ordered):
        np.testing.assert_array_equal(volume.voxels[k], pixel_array(ds))


def test_mapping_back_rejects_foreign_frames_and_shapes(
    axial: Volume, series: list[Dataset]
) -> None:
    stranger = copy.deepcopy(series[0])
    stranger.SOPInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="not a slice of this volume"):
        to_source_order(axial.voxels, axial, [stranger])
    with pytest.raises(ValueError, match="does not match"):
        to_source_order(axial.voxels[1:], axial, series)
    with pytest.raises(ValueError, match="have no dataset"):
        in_volume_order(series[1:], axial)
