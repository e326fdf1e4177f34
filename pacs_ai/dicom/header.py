"""Read what the node needs from an encoded instance, without touching its pixel data.

:func:`read_header` checks that the encoded data set is whole (every element's length fits,
every undefined-length sequence is closed) and pulls out the attributes used to file, route
and list the instance. It never decodes pixels and never re-encodes anything.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

# PS3.5 7.1.2: these VRs carry a 4-byte length after two reserved bytes in explicit VR.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xE000, 0xE00D, 0xE0DD
_PIXEL_ELEMENTS = (0x0008, 0x0009, 0x0010)  # (7FE0,xxxx) Float, Double Float, Pixel Data
MAX_NESTING = 32


class MalformedDataset(ValueError):
    """The encoded data set is truncated or structurally broken."""


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The attributes of one instance that the index keeps (pydicom keywords, snake_case)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    instance_number: int | None
    # patient / study
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    referring_physician_name: str
    # series
    modality: str
    series_number: int | None
    series_description: str
    body_part_examined: str
    protocol_name: str
    manufacturer: str
    slice_thickness: float | None
    image_type: str


def read_header(data: bytes) -> InstanceHeader:
    """Parse a Part 10 byte string (preamble, file meta, data set) into an :class:`InstanceHeader`.

    Raises :class:`MalformedDataset` when the bytes are not a whole DICOM object. UIDs are
    returned as found (possibly empty): judging them is the caller's business.
    """
    # These bytes come from the network: pydicom may fail on them in many ways (its own
    # exceptions, struct, zlib, Unicode, recursion), and every one means "cannot understand".
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise MalformedDataset(f"not a DICOM data set: {exc}") from exc
    except Exception as exc:
        raise MalformedDataset(f"cannot parse the data set: {type(exc).__name__}: {exc}") from exc
    tsuid = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if not tsuid:
        raise MalformedDataset("file meta has no Transfer Syntax UID")
    has_pixels = check_complete(data, tsuid)
    try:
        header = _header_from(ds, tsuid)
    except Exception as exc:
        raise MalformedDataset(f"cannot read an attribute: {type(exc).__name__}: {exc}") from exc
    # A cut that falls exactly between two elements leaves a well-formed data set; for an
    # image it also leaves no pixels, which is how we still catch it.
    if not has_pixels and "Image Storage" in UID(header.sop_class_uid).name:
        raise MalformedDataset("image object without Pixel Data (truncated?)")
    return header


def check_complete(data: bytes, transfer_syntax_uid: str) -> bool:
    """Walk every top-level element of the data set and check that the bytes hold it whole.

    Returns whether the data set holds pixel data (Pixel, Float or Double Float Pixel Data).
    """
    start = _dataset_offset(data)
    if start > len(data):
        raise MalformedDataset("file meta information is truncated")
    if start == len(data):
        raise MalformedDataset("data set is empty")
    body = memoryview(data)[start:]
    explicit = transfer_syntax_uid != ImplicitVRLittleEndian
    little = transfer_syntax_uid != ExplicitVRBigEndian
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = memoryview(inflater.decompress(body))
        except zlib.error as exc:
            raise MalformedDataset(f"deflated data set is corrupt: {exc}") from exc
        if not inflater.eof:
            raise MalformedDataset("deflated data set is truncated")
    if explicit and len(body) >= 6 and not bytes(body[4:6]).isalpha():
        # Some senders encode implicit VR under an explicit VR transfer syntax; pydicom
        # reads such data sets, so we walk them as they are rather than refuse them.
        explicit = False
    walker = _Walker(body, explicit, little)
    walker.elements(0, len(body), 0, until_item_end=False)
    return walker.has_pixels


def _dataset_offset(data: bytes) -> int:
    # Part 10: 128-byte preamble, "DICM", then group 0002 in explicit VR little endian,
    # whose first element (0002,0000) gives the group's length.
    if data[128:132] != b"DICM":
        raise MalformedDataset("no DICM prefix after the preamble")
    group, element, vr = struct.unpack_from("<HH2s", data, 132)
    if (group, element) != (0x0002, 0x0000) or vr != b"UL":
        # No group length: step over group 0002 element by element.
        offset = 132
        while offset + 8 <= len(data) and struct.unpack_from("<H", data, offset)[0] == 0x0002:
            vr = bytes(data[offset + 4 : offset + 6])
            if vr in _LONG_VRS:
                offset += 12 + struct.unpack_from("<I", data, offset + 8)[0]
            else:
                offset += 8 + struct.unpack_from("<H", data, offset + 6)[0]
        return offset
    group_length: int = struct.unpack_from("<I", data, 140)[0]
    return 144 + group_length


class _Walker:
    def __init__(self, buf: memoryview, explicit: bool, little: bool) -> None:
        self.buf = buf
        self.explicit = explicit
        self.prefix = "<" if little else ">"
        self.has_pixels = False

    def _need(self, offset: int, size: int, end: int) -> None:
        if offset + size > end:
            raise MalformedDataset(
                f"data set is truncated: {size} bytes needed at offset {offset}, "
                f"{end - offset} left"
            )

    def elements(self, offset: int, end: int, depth: int, until_item_end: bool) -> int:
        """Step over elements from ``offset``; return where the walk stopped."""
        if depth > MAX_NESTING:
            raise MalformedDataset(f"sequences nested deeper than {MAX_NESTING} levels")
        p = self.prefix
        while offset < end:
            self._need(offset, 8, end)
            group, elem = struct.unpack_from(p + "HH", self.buf, offset)
            if group == 0xFFFE:
                length = struct.unpack_from(p + "I", self.buf, offset + 4)[0]
                if until_item_end and elem == _ITEM_END:
                    return offset + 8
                raise MalformedDataset(f"unexpected delimiter (FFFE,{elem:04X}) at offset {offset}")
            if depth == 0 and group == 0x7FE0 and elem in _PIXEL_ELEMENTS:
                self.has_pixels = True
            if self.explicit:
                vr = bytes(self.buf[offset + 4 : offset + 6])
                if vr in _LONG_VRS:
                    self._need(offset, 12, end)
                    length = struct.unpack_from(p + "I", self.buf, offset + 8)[0]
                    offset += 12
                else:
                    length = struct.unpack_from(p + "H", self.buf, offset + 6)[0]
                    offset += 8
            else:
                vr = b"UN"
                length = struct.unpack_from(p + "I", self.buf, offset + 4)[0]
                offset += 8
            if length == _UNDEFINED:
                # Undefined length: a sequence, encapsulated pixel data, or UN holding an
                # implicit-VR sequence (PS3.5 6.2.2).
                inner = self if vr != b"UN" or not self.explicit else _Walker(self.buf, False, True)
                offset = inner.items(offset, end, depth + 1)
            else:
                self._need(offset, length, end)
                offset += length
        if until_item_end:
            raise MalformedDataset("item with undefined length is never closed")
        return offset

    def items(self, offset: int, end: int, depth: int) -> int:
        p = self.prefix
        while True:
            self._need(offset, 8, end)
            group, elem, length = struct.unpack_from(p + "HHI", self.buf, offset)
            offset += 8
            if group != 0xFFFE:
                raise MalformedDataset(f"expected an item tag at offset {offset - 8}")
            if elem == _SEQ_END:
                return offset
            if elem != _ITEM:
                raise MalformedDataset(f"unexpected (FFFE,{elem:04X}) in a sequence")
            if length == _UNDEFINED:
                offset = self.elements(offset, end, depth + 1, until_item_end=True)
            else:
                self._need(offset, length, end)
                offset += length


def _text(ds: Dataset, keyword: str) -> str:
    value: Any = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _header_from(ds: Dataset, tsuid: str) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=tsuid,
        instance_number=_int(ds, "InstanceNumber"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        protocol_name=_text(ds, "ProtocolName"),
        manufacturer=_text(ds, "Manufacturer"),
        slice_thickness=_float(ds, "SliceThickness"),
        image_type=_text(ds, "ImageType"),
    )
