"""Reading what the node needs from real files, and refusing broken ones cleanly."""

from __future__ import annotations

import contextlib
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from pacs_ai.dicom.header import MalformedDataset, check_complete, read_header
from pacs_ai.dicom.part10 import Part10, file_meta, part10
from tests.realdata import (
    PYDICOM_FILES,
    TRANSFER_SYNTAX_SAMPLES,
    dataset_bytes,
    part10_files,
    real_file,
)

# Files pydicom ships *because* they are broken; the node must refuse each of them.
KNOWN_BROKEN = {
    "rtplan_truncated.dcm",
    "MR_truncated.dcm",
    "emri_small_jpeg_2k_lossless_too_short.dcm",
    "meta_missing_tsyntax.dcm",
}


@pytest.mark.parametrize("path", part10_files(), ids=lambda p: p.name)
def test_every_real_file_is_read_or_refused_cleanly(path) -> None:  # type: ignore[no-untyped-def]
    data = path.read_bytes()
    if path.name in KNOWN_BROKEN:
        with pytest.raises(MalformedDataset):
            read_header(data)
        return
    header = read_header(data)
    ds = dcmread(path, stop_before_pixels=True)
    assert header.sop_instance_uid == str(ds.get("SOPInstanceUID", ""))
    assert header.study_instance_uid == str(ds.get("StudyInstanceUID", "")).strip()
    assert header.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID


def test_header_fields_match_pydicom() -> None:
    path = real_file("CT_small.dcm")
    h = read_header(path.read_bytes())
    ds = dcmread(path)
    assert h.modality == "CT"
    assert h.patient_id == ds.PatientID
    assert h.series_instance_uid == ds.SeriesInstanceUID
    assert h.instance_number == int(ds.InstanceNumber)
    assert h.slice_thickness == float(ds.SliceThickness)
    assert h.image_type == "\\".join(ds.ImageType)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "image_dfl.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_every_truncation_is_detected(name: str) -> None:
    data = real_file(name).read_bytes()
    # Cut at many points, including inside the pixel data; never accepted, never a crash.
    step = max(1, len(data) // 97)
    for cut in range(0, len(data) - 1, step):
        with pytest.raises(MalformedDataset):
            read_header(data[:cut])


def test_deflated_data_set_is_checked_after_inflating() -> None:
    data = real_file("image_dfl.dcm").read_bytes()
    check_complete(data, TRANSFER_SYNTAX_SAMPLES["image_dfl.dcm"])
    body = dataset_bytes(data)
    raw = zlib.decompress(body, -zlib.MAX_WBITS)
    # Recompress only the first half of the inflated stream: a valid deflate stream, short data.
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    short = packer.compress(raw[: len(raw) // 2]) + packer.flush()
    with pytest.raises(MalformedDataset, match="truncated"):
        check_complete(data[: len(data) - len(body)] + short, "1.2.840.10008.1.2.1.99")


def test_undefined_length_sequence_must_be_closed() -> None:
    # (0008,1115) SQ, undefined length, one item with undefined length, never closed.
    seq = struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    element = struct.pack("<HH2sH", 0x0008, 0x0060, b"CS", 2) + b"CT"
    meta = file_meta("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
    data = b"\0" * 128 + b"DICM" + meta + seq + item + element
    with pytest.raises(MalformedDataset):
        check_complete(data, "1.2.840.10008.1.2.1")
    closed = data + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    check_complete(closed, "1.2.840.10008.1.2.1")


def test_nesting_is_bounded() -> None:
    depth = 200
    opening = (
        struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ) * depth
    meta = file_meta("1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1")
    with pytest.raises(MalformedDataset, match="nested"):
        check_complete(b"\0" * 128 + b"DICM" + meta + opening, "1.2.840.10008.1.2.1")


def test_part10_wrapping_keeps_the_data_set_bytes() -> None:
    source = real_file("MR_small_RLE.dcm").read_bytes()
    ds = dcmread(real_file("MR_small_RLE.dcm"), stop_before_pixels=True)
    body = dataset_bytes(source)
    wrapped = part10(
        ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, "MODALITY", body
    ).joined()
    assert dataset_bytes(wrapped) == body
    again = dcmread(__import__("io").BytesIO(wrapped))
    assert again.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert again.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert again.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert again.PixelData == dcmread(real_file("MR_small_RLE.dcm")).PixelData


def test_a_data_set_that_opens_with_file_meta_reads_as_its_joined_bytes() -> None:
    # Some senders put their file meta in front of the data set they send over DIMSE. In two
    # pieces, our meta then stops before theirs; joined, pydicom reads both as one group.
    source = real_file("CT_small.dcm").read_bytes()
    ds = dcmread(real_file("CT_small.dcm"), stop_before_pixels=True)
    prefix = part10(ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian, "M", b"").prefix
    split = Part10(prefix, source[132:])
    assert split.data_set[:2] == b"\x02\x00"
    header = read_header(split)
    assert header == read_header(split.joined())
    # As pydicom reads the joined file: the sender's meta, coming later, has the last word.
    assert header.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID != ImplicitVRLittleEndian
    assert header.sop_instance_uid == ds.SOPInstanceUID


CT = (PYDICOM_FILES / "CT_small.dcm").read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(132, len(CT) - 1), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_mutated_bytes_never_escape_as_other_errors(mutations: list[tuple[int, int]]) -> None:
    data = bytearray(CT)
    for offset, value in mutations:
        data[offset] = value
    with contextlib.suppress(MalformedDataset):
        read_header(bytes(data))
