"""The header's direct decoding gives exactly what converting with pydicom gave.

``read_header`` decodes the captured elements itself where it can vouch for the result and
otherwise hands them to pydicom. The reference here is the algorithm it replaced, kept
verbatim: every captured element through ``convert_raw_data_element``, then the field
readers. Outcomes (every field, or the refusal message) and pydicom's warnings must agree.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pacs_ai.dicom import header
from pacs_ai.dicom.header import InstanceHeader, MalformedDataset
from pacs_ai.dicom.part10 import Part10, part10
from pacs_ai.dicom.values import DECODERS, as_float, as_int, as_text
from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from tests.realdata import PYDICOM_DATA_FILES, PYDICOM_FILES

Outcome = dict[str, Any] | str


# --- The reference: _read_walked as it was before the direct decoding ---------------------


def _old_read_walked(data: bytes) -> InstanceHeader | None:
    meta = header._file_meta(data)  # direct=False: converts the first meta element as before
    if meta is None:
        return None
    start, ts_element = meta
    try:
        tsuid = str(convert_raw_data_element(ts_element, encoding=default_encoding).value)
    except Exception:
        return None
    if not tsuid:
        return None
    walker = header._walk(data, start, tsuid, capture=True)
    if walker.odd or walker.explicit == header._pydicom_finds_implicit(walker.buf, tsuid):
        return None
    found = {tag: walker.raw_element(tag) for tag in walker.found}
    try:
        encoding: str | list[str] = default_encoding
        if header._CHARSET_TAG in found:
            charset = convert_raw_data_element(found[header._CHARSET_TAG]).value
            encoding = convert_encodings(charset)
        values = {
            keyword: convert_raw_data_element(found[tag], encoding=encoding).value
            for tag, keyword in _TAG_KEYWORDS.items()
            if tag in found
        }
        result = header._header_from(values, tsuid)
    except Exception:
        return None
    header._check_pixels(result, walker.has_pixels)
    return result


_TAG_KEYWORDS = {int(tag_for_keyword(keyword) or 0): keyword for keyword in header._KEYWORDS}


def _old_read_header(data: bytes) -> InstanceHeader:
    try:
        result = _old_read_walked(data)
    except MalformedDataset:
        result = None
    return result if result is not None else header._read_with_dcmread(data)


def _outcome(read: Callable[[bytes], InstanceHeader], data: bytes) -> tuple[Outcome, list[str]]:
    """What ``read`` makes of ``data``, field by field, and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fields = dataclasses.asdict(read(data))
            # NaN from "nan" in a DS never equals itself; compare it by name.
            nan = [k for k, v in fields.items() if isinstance(v, float) and math.isnan(v)]
            result: Outcome = fields | dict.fromkeys(nan, "NaN")
        except MalformedDataset as exc:
            result = f"refused: {exc}"
    return result, [f"{w.category.__name__}: {w.message}" for w in caught]


def _walked(read: Callable[[bytes], InstanceHeader | None], data: bytes) -> bool:
    try:
        return read(data) is not None
    except MalformedDataset:
        return False


def assert_same_as_before(data: bytes) -> Outcome:
    new = _outcome(header.read_header, data)
    old = _outcome(_old_read_header, data)
    assert new == old
    # The receiver hands over its file meta and the data set as two pieces: same reading.
    meta = header._file_meta(data)
    if meta is not None:
        split = Part10(data[: meta[0]], data[meta[0] :])
        assert _outcome(lambda _: header.read_header(split), data) == new
        # As the receiver makes it, with the syntax it wrote in the prefix: the same header
        # (the warnings of reading an odd prefix back are not, as nothing reads it back).
        if isinstance(new[0], dict) and split.data_set[:2] != b"\x02\x00":
            told = Part10(split.prefix, split.data_set, str(new[0]["transfer_syntax_uid"]))
            assert _outcome(lambda _: header.read_header(told), data)[0] == new[0]
    # ... and no more often through dcmread: that would only be slower, but it would be.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _walked(header._read_walked, data) == _walked(_old_read_walked, data)
    return new[0]


@pytest.fixture(params=["WARN", "IGNORE", "RAISE"])
def validation_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    saved = config.settings._reading_validation_mode
    config.settings.reading_validation_mode = getattr(config, request.param)
    yield
    config.settings._reading_validation_mode = saved


class _Conversions:
    """Counts pydicom conversions made by the header module."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tags: list[int] = []

        def counting(raw: Any, **kwargs: Any) -> Any:
            self.tags.append(int(raw.tag))
            return convert_raw_data_element(raw, **kwargs)

        monkeypatch.setattr(header, "convert_raw_data_element", counting)


# --- Real files ------------------------------------------------------------------------


def _real_part10_files() -> list[Path]:
    # What pydicom.data.get_testdata_files() and get_charset_files() list, plus pydicom-data,
    # found on disk so that nothing can start a download.
    folders = (PYDICOM_FILES, PYDICOM_FILES.parent / "charset_files", PYDICOM_DATA_FILES)
    files = sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())
    return [p for p in files if p.read_bytes()[128:132] == b"DICM"]


REAL_FILES = _real_part10_files()


def test_the_real_files_are_all_there() -> None:
    assert len(REAL_FILES) > 240


@pytest.mark.usefixtures("validation_mode")
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_files_read_as_before(path: Path) -> None:
    data = path.read_bytes()
    outcome = assert_same_as_before(data)
    if isinstance(outcome, dict) and config.settings.reading_validation_mode != config.RAISE:
        # An oracle that shares no code with the walk: pydicom reading the whole file (under
        # RAISE it refuses what the walk, like the node before it, accepts).
        assert outcome == _outcome(header._read_with_dcmread, data)[0]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "chrGerm.dcm"])
def test_plain_real_files_need_no_pydicom_conversion(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = next(p for p in REAL_FILES if p.name == name)
    conversions = _Conversions(monkeypatch)
    assert header._read_walked(path.read_bytes()) is not None
    assert conversions.tags == []


def test_the_phantom_ct_takes_the_direct_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver's common case: a plain CT slice must not go through pydicom's conversion
    # (that was most of read_header's time).
    write_chest_ct(tmp_path, Geometry(slices=2), with_lung_series=False, with_scout=False)
    data = sorted(tmp_path.rglob("*.dcm"))[0].read_bytes()
    expected = _old_read_header(data)
    conversions = _Conversions(monkeypatch)
    assert header._read_walked(data) == expected
    assert conversions.tags == []


def test_non_default_pydicom_settings_go_through_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    data = next(p for p in REAL_FILES if p.name == "CT_small.dcm").read_bytes()
    monkeypatch.setattr(config, "datetime_conversion", True)
    conversions = _Conversions(monkeypatch)
    assert header.read_header(data) == _old_read_header(data)
    assert len(conversions.tags) > 20


def test_every_field_has_a_decoder_that_ends_in_its_reader() -> None:
    # The decoders return the field's final value, so each field's reader must be the one
    # its decoder reproduces.
    readers = {"IS": as_int, "DS": as_float}
    for name, _, vr, read in header._SOURCES:
        assert vr in DECODERS, name
        assert read is readers.get(vr, as_text), name


# --- Generated data sets: raw values chosen to hit every rule ---------------------------

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
PIXELS = (0x7FE00010, "OW", b"\0" * 8)


def _base() -> dict[int, tuple[str, bytes]]:
    return {
        0x00080005: ("CS", b"ISO_IR 100"),
        0x00080008: ("CS", b"ORIGINAL\\PRIMARY\\AXIAL "),
        0x00080016: ("UI", CTImageStorage.encode() + b"\0"),
        0x00080018: ("UI", b"1.2.826.0.1.3680043.8.498.1\0"),
        0x00080020: ("DA", b"20240101"),
        0x00080030: ("TM", b"093000"),
        0x00080050: ("SH", b"ACC0001 "),
        0x00080060: ("CS", b"CT"),
        0x00080070: ("LO", b"ACME"),
        0x00080090: ("PN", b"REFERRER^DOC"),
        0x00081030: ("LO", b"CT CHEST"),
        0x0008103E: ("LO", b"AXIAL 1.25 "),
        0x00100010: ("PN", b"DOE^JOHN"),
        0x00100020: ("LO", b"PID-1 "),
        0x00100030: ("DA", b"19600101"),
        0x00100040: ("CS", b"O "),
        0x00180015: ("CS", b"CHEST "),
        0x00180050: ("DS", b"1.25"),
        0x00181030: ("LO", b"CHEST ROUTINE "),
        0x0020000D: ("UI", b"1.2.826.0.1.3680043.8.498.2\0"),
        0x0020000E: ("UI", b"1.2.826.0.1.3680043.8.498.3\0"),
        0x00200011: ("IS", b"2 "),
        0x00200013: ("IS", b"1 "),
    }


def _encode(elements: dict[int, tuple[str, bytes]], tsuid: str, meta_tsuid: str = "") -> bytes:
    """A Part 10 object holding exactly these bytes (no padding added), plus pixel data.

    The file meta gives ``meta_tsuid`` as the transfer syntax if given (as the UI's bytes).
    """
    explicit = tsuid != ImplicitVRLittleEndian
    order = ">" if tsuid == ExplicitVRBigEndian else "<"
    body = b""
    for tag, vr, value in [*((t, *elements[t]) for t in sorted(elements)), PIXELS]:
        head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
        if not explicit:
            body += head + struct.pack(order + "I", len(value)) + value
        elif vr in _LONG_VRS:
            body += head + vr.encode() + struct.pack(order + "HI", 0, len(value)) + value
        else:
            body += head + vr.encode() + struct.pack(order + "H", len(value)) + value
    if tsuid == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
    sop_uid = "1.2.826.0.1.3680043.8.498.1"
    return part10(CTImageStorage, sop_uid, meta_tsuid or tsuid, "TEST", body).joined()


TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]
SOP_UID, IMAGE_TYPE, STUDY_DATE, STUDY_TIME, ACCESSION = (
    0x00080018,
    0x00080008,
    0x00080020,
    0x00080030,
    0x00080050,
)
MANUFACTURER, NAME, PATIENT_ID, SEX = 0x00080070, 0x00100010, 0x00100020, 0x00100040
THICKNESS, SERIES_NUMBER, INSTANCE_NUMBER, CHARSET = 0x00180050, 0x00200011, 0x00200013, 0x00080005

# One field's raw value at a time: padding, multiple values, odd lengths, invalid values.
VALUES: dict[int, list[bytes]] = {
    SOP_UID: [
        *(b"1.2.3" + pad for pad in (b"", b"\0", b" ", b"\0\0", b" \0", b"\0 ")),
        b" 1.2.3 ",
        b"1.2\\3.4\0",
        b"1.2.3\x004",
        b"\0",
        b"abc",
        b"01.2",
        b"1." + b"2" * 70,
        b"1.2.3\n",
    ],
    IMAGE_TYPE: [
        b"ORIGINAL\\PRIMARY\\AXIAL",
        b" ORIGINAL \\ PRIMARY ",
        b"DERIVED",
        b"  CT  ",
        b"CT\0",
        b"A\\\\B",
        b"\\",
        b"C T",
        b"\tCT\t",
        b"\xe9T\xa0",
    ],
    STUDY_DATE: [b"20240101 ", b" 20240101", b"2024", b"20240101\\20240102", b"2024-01-01"],
    STUDY_TIME: [b"093000.123456", b"09:30", b"093000 ", b"0930\0"],
    ACCESSION: [b"  A1  ", b"A1\0\0", b"A\\B ", b"x" * 20, b"\x01ctl", b"A1\0 \t"],
    MANUFACTURER: [
        b"  spaced value  ",
        b" a \\ b ",
        b"x" * 70,
        b"tab\there\t",
        b"\xe9t\xe9",
        "Müller".encode(),
        b"esc\x1b(Bx",
        b"odd",
        b"\\",
    ],
    NAME: [
        b"DOE^JOHN=",
        b"DOE^JOHN==",
        b"=IDEO",
        b"DOE^JOHN=\xe5\xb1\xb1=ph",
        b"A^B\\C^D ",
        b" DOE^JOHN ",
        b"DOE^JOHN\0",
        b"a=b=c=d",
        b"=",
        b"^",
        b"x" * 70 + b"^y",
        b"DOE^JOHN= ",
    ],
    SEX: [b"M ", b"m", b"M\\F", b" "],
    SERIES_NUMBER: [
        b"12",
        b"  12 ",
        b"+3",
        b"-0",
        b"0012",
        b"12\0",
        b"1.0",
        b"1.5",
        b"1e3",
        b"abc",
        b"1\\2",
        b" ",
        b"\0",
        b"1 2",
        b"1234567890123",
        b"99999999999999999999",
        b"inf",
        b"nan",
        b"1_0",
        b"\t7",
        b"\xb2",
    ],
    THICKNESS: [
        b" 1.25 ",
        b"+1.5e2",
        b".5",
        b"5.",
        b"-0",
        b"1\\2",
        b"1.0\\2.5 ",
        b"abc",
        b"nan",
        b"inf",
        b"1e400",
        b"1_0",
        b"1.2.3",
        b"\0",
        b" ",
        b"12345678901234567",
        b"1.25\0",
        b"\t1.25\x85",
    ],
}

CHARSETS = [
    None,
    b"",
    b"ISO_IR 6",
    b"ISO 2022 IR 6",
    b"ISO_IR 100",
    b"ISO_IR 100 ",
    b"ISO_IR 192",
    b" ISO_IR 100",
    b"ISO-IR 100",
    b"ISO_IR 144",
    b"ISO 2022 IR 87",
    b"\\ISO 2022 IR 87",
    b"ISO 2022 IR 6\\ISO 2022 IR 87",
    b"GB18030",
    b"ISO_IR 192\\GB18030",
    b"UNKNOWN",
]
TEXTS = [
    b"PLAIN^NAME",
    "Müller^Jörg".encode("latin-1"),
    "Müller^Jörg".encode(),
    "Люксембург".encode("iso8859_5"),
    "张三^李四".encode("gb18030"),
    b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B;3ED\x1b(B",
]


def _variants() -> Iterator[tuple[str, dict[int, tuple[str, bytes]]]]:
    for tag, raws in VALUES.items():
        for raw in raws:
            elements = _base()
            elements[tag] = (elements[tag][0], raw)
            yield f"{tag:08X}={raw!r}", elements
        empty = _base()
        empty[tag] = (empty[tag][0], b"")
        yield f"{tag:08X} empty", empty
        absent = _base()
        del absent[tag]
        yield f"{tag:08X} absent", absent
    for charset in CHARSETS:
        for text in TEXTS:
            elements = _base()
            if charset is None:
                del elements[CHARSET]
            else:
                elements[CHARSET] = ("CS", charset)
            for tag in (NAME, PATIENT_ID, MANUFACTURER):
                elements[tag] = (elements[tag][0], text)
            yield f"charset {charset!r} text {text!r}", elements
    # Written with a VR other than the dictionary's: pydicom's converter for that VR decides.
    for tag, vr, raw in [
        (PATIENT_ID, "SH", b"PID-1 "),
        (SOP_UID, "LO", b" 1.2.3 "),
        (SERIES_NUMBER, "DS", b"2.0"),
        (THICKNESS, "IS", b"3"),
        (IMAGE_TYPE, "UN", b"ORIGINAL\\PRIMARY"),
        (NAME, "UN", b"DOE^JOHN"),
        (NAME, "LO", b"DOE^JOHN=X"),
        (CHARSET, "LO", b"ISO_IR 192"),
        (CHARSET, "UN", b"ISO_IR 100"),
        (CHARSET, "OB", b"ISO_IR 100"),
        (CHARSET, "UI", b"ISO_IR 192"),
    ]:
        elements = _base()
        elements[tag] = (vr, raw)
        yield f"{tag:08X} as {vr} {raw!r}", elements


VARIANTS = list(_variants())


@pytest.mark.usefixtures("validation_mode")
@pytest.mark.parametrize("tsuid", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("elements", [v for _, v in VARIANTS], ids=[k for k, _ in VARIANTS])
def test_generated_values_read_as_before(
    elements: dict[int, tuple[str, bytes]], tsuid: str
) -> None:
    assert_same_as_before(_encode(elements, tsuid))


@pytest.mark.parametrize("charset", [None, b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192"])
@pytest.mark.parametrize("tsuid", TRANSFER_SYNTAXES)
def test_plain_generated_data_sets_need_no_pydicom_conversion(
    charset: bytes | None, tsuid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    elements = _base()
    if charset is None:
        del elements[CHARSET]
    else:
        elements[CHARSET] = ("CS", charset)
    for tag, raw in [
        (NAME, b" A^B=C^D \\E^F=="),
        (THICKNESS, b" 2.5 "),
        (SERIES_NUMBER, b" +7 "),
        (MANUFACTURER, b" M \\ N "),
    ]:
        elements[tag] = (elements[tag][0], raw)
    data = _encode(elements, tsuid)
    expected = _old_read_header(data)
    conversions = _Conversions(monkeypatch)
    assert header._read_walked(data) == expected
    assert conversions.tags == []


@pytest.mark.usefixtures("validation_mode")
@pytest.mark.parametrize(
    "meta_tsuid",
    [
        f"{ExplicitVRLittleEndian}\0",
        f"{ExplicitVRLittleEndian} ",
        f" {ExplicitVRLittleEndian}",
        f"{ExplicitVRLittleEndian}\\1.2",
        f"{ImplicitVRLittleEndian}\\",
        "\0",
        "1.2.3.4",
    ],
)
def test_transfer_syntax_values_read_as_before(meta_tsuid: str) -> None:
    assert_same_as_before(_encode(_base(), ExplicitVRLittleEndian, meta_tsuid))


# Random raw values over an alphabet of everything the rules care about.
_ALPHABET = [*b"0123456789 .+-eE\\=^\0\t\x1bAZaz", 0x85, 0xA0, 0xB2, 0xE9, 0xC3, 0xA9]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(_base())),
    st.lists(st.sampled_from(_ALPHABET), max_size=20).map(bytes),
    st.sampled_from(CHARSETS),
    st.sampled_from(TRANSFER_SYNTAXES[:3]),
)
def test_random_values_read_as_before(
    tag: int, raw: bytes, charset: bytes | None, tsuid: str
) -> None:
    elements = _base()
    elements[tag] = (elements[tag][0], raw)
    if tag != CHARSET:
        if charset is None:
            del elements[CHARSET]
        else:
            elements[CHARSET] = ("CS", charset)
    assert_same_as_before(_encode(elements, tsuid))


# --- Data sets written by pydicom ---------------------------------------------------------


def _written(charset: str | None, tsuid: str, name: str) -> bytes:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset.split("\\")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.11"
    ds.StudyDate = "20240101"
    ds.StudyTime = "093000.5"
    ds.AccessionNumber = "A7"
    ds.Modality = "CT"
    ds.Manufacturer = name.split("^")[0]
    ds.ReferringPhysicianName = "REF^DOC=" + name.split("=")[0]
    ds.StudyDescription = name.replace("^", " ").replace("=", " ")
    ds.PatientName = name
    ds.PatientID = "PID 7"
    ds.PatientSex = "F"
    ds.SliceThickness = [1.5, 2]  # several values: the header has no single thickness
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.12"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.13"
    ds.SeriesNumber = 3
    ds.InstanceNumber = "  4"
    ds.PixelData = b"\0" * 8
    ds["PixelData"].VR = "OW"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(tsuid)
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


WRITTEN_NAMES = {
    None: "DOE^JOHN",
    "ISO_IR 6": "DOE^JOHN=IDEO=PHON",
    "ISO_IR 100": "Müller^Jörg",
    "ISO_IR 192": "Müller^Jörg=山田^太郎",
    "\\ISO 2022 IR 87": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "GB18030": "Wang^XiaoDong=王^小東",
}


@pytest.mark.usefixtures("validation_mode")
@pytest.mark.parametrize("tsuid", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("charset", list(WRITTEN_NAMES))
def test_data_sets_written_by_pydicom_read_as_before(charset: str | None, tsuid: str) -> None:
    data = _written(charset, tsuid, WRITTEN_NAMES[charset])
    outcome = assert_same_as_before(data)
    assert isinstance(outcome, dict)
    assert outcome["patient_name"] == WRITTEN_NAMES[charset]
    assert outcome["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
    assert (outcome["slice_thickness"], outcome["instance_number"]) == (None, 4)
