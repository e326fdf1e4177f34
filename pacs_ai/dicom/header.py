"""Read what the node needs from an encoded instance, without touching its pixel data.

:func:`read_header` checks that the encoded data set is whole (every element's length fits,
every undefined-length sequence is closed) and pulls out the attributes used to file, route
and list the instance. It never decodes pixels and never re-encodes anything.

The walk that checks completeness also picks up the few top-level elements the header needs,
and pydicom converts just those (same hooks, same character sets): parsing the whole header
with ``dcmread`` as well cost three times the rest of the read. Where the bytes are unusual
enough that the walk might see them differently from pydicom (odd file meta, a VR switch,
an undefined-length value), the header comes from ``dcmread`` as before.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

# PS3.5 7.1.2: these VRs carry a 4-byte length after two reserved bytes in explicit VR.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_KNOWN_VRS = frozenset(vr.value.encode("ascii") for vr in VR)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xE000, 0xE00D, 0xE0DD
_PIXEL_ELEMENTS = (0x0008, 0x0009, 0x0010)  # (7FE0,xxxx) Float, Double Float, Pixel Data
_CHARSET_TAG = 0x00080005
_TRANSFER_SYNTAX_TAG = 0x00020010
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
    try:
        header = _read_walked(data)
    except MalformedDataset:
        # pydicom's reading below gives the reason a sender will recognise.
        header = None
    if header is None:
        header = _read_with_dcmread(data)
    return header


def _read_with_dcmread(data: bytes) -> InstanceHeader:
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
        header = _header_from({keyword: ds.get(keyword) for keyword in _KEYWORDS}, tsuid)
    except Exception as exc:
        raise MalformedDataset(f"cannot read an attribute: {type(exc).__name__}: {exc}") from exc
    _check_pixels(header, has_pixels)
    return header


def _read_walked(data: bytes) -> InstanceHeader | None:
    """The header from the completeness walk, or None where only ``dcmread`` can vouch for it."""
    meta = _file_meta(data)
    if meta is None:
        return None
    start, ts_element = meta
    try:
        tsuid = str(convert_raw_data_element(ts_element, encoding=default_encoding).value)
    except Exception:
        return None
    if not tsuid:
        return None
    walker = _walk(data, start, tsuid, capture=True)
    if walker.odd or walker.explicit == _pydicom_finds_implicit(walker.buf, tsuid):
        return None
    found = walker.found
    try:
        encoding: str | list[str] = default_encoding
        if _CHARSET_TAG in found:
            encoding = convert_encodings(convert_raw_data_element(found[_CHARSET_TAG]).value)
        values = {
            keyword: convert_raw_data_element(found[tag], encoding=encoding).value
            for tag, keyword in _TAG_KEYWORDS.items()
            if tag in found
        }
        header = _header_from(values, tsuid)
    except Exception:
        return None
    _check_pixels(header, walker.has_pixels)
    return header


def _check_pixels(header: InstanceHeader, has_pixels: bool) -> None:
    # A cut that falls exactly between two elements leaves a well-formed data set; for an
    # image it also leaves no pixels, which is how we still catch it.
    if not has_pixels and "Image Storage" in UID(header.sop_class_uid).name:
        raise MalformedDataset("image object without Pixel Data (truncated?)")


def _file_meta(data: bytes) -> tuple[int, RawDataElement] | None:
    """Where the data set starts and the raw Transfer Syntax UID, read as pydicom reads them.

    None for anything pydicom might read differently: no DICM, a meta group that is not
    explicit VR, a group length that disagrees with the elements, no transfer syntax.
    """
    if data[128:132] != b"DICM":
        return None
    offset, end = 132, len(data)
    group_length: int | None = None
    transfer_syntax: RawDataElement | None = None
    while offset + 8 <= end:
        group, element, vr = struct.unpack_from("<HH2s", data, offset)
        if group != 0x0002:
            break
        if vr not in _KNOWN_VRS:
            return None
        if vr in _LONG_VRS:
            if offset + 12 > end:
                return None
            length = struct.unpack_from("<I", data, offset + 8)[0]
            value_at = offset + 12
        else:
            length = struct.unpack_from("<H", data, offset + 6)[0]
            value_at = offset + 8
        if length == _UNDEFINED or value_at + length > end:
            return None
        raw = RawDataElement(
            BaseTag(0x00020000 | element),
            vr.decode(),
            length,
            data[value_at : value_at + length],
            value_at,
            False,
            True,
        )
        if offset == 132 and not _converts(raw):
            # dcmread converts the first meta element to check the encoding, and fails here.
            return None
        if element == 0x0000 and vr == b"UL" and length == 4:
            group_length = struct.unpack("<I", raw.value or b"")[0]
        elif element == 0x0010:
            transfer_syntax = raw
        offset = value_at + length
    if transfer_syntax is None or (group_length is not None and group_length != offset - 144):
        return None
    return offset, transfer_syntax


def _converts(raw: RawDataElement) -> bool:
    try:
        convert_raw_data_element(raw, encoding=default_encoding)
    except Exception:
        return False
    return True


def _pydicom_finds_implicit(body: memoryview, transfer_syntax_uid: str) -> bool:
    # dcmread trusts the first element's VR bytes over the transfer syntax, both ways.
    if len(body) < 6:
        return transfer_syntax_uid == ImplicitVRLittleEndian
    return not (0x40 < body[4] < 0x5B and 0x40 < body[5] < 0x5B)


def check_complete(data: bytes, transfer_syntax_uid: str) -> bool:
    """Walk every top-level element of the data set and check that the bytes hold it whole.

    Returns whether the data set holds pixel data (Pixel, Float or Double Float Pixel Data).
    """
    return _walk(data, _dataset_offset(data), transfer_syntax_uid, capture=False).has_pixels


def _walk(data: bytes, start: int, transfer_syntax_uid: str, capture: bool) -> _Walker:
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
    walker = _Walker(body, explicit, little, capture)
    walker.elements(0, len(body), 0, until_item_end=False)
    return walker


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
    def __init__(
        self, buf: memoryview, explicit: bool, little: bool, capture: bool = False
    ) -> None:
        self.buf = buf
        self.explicit = explicit
        self.little = little
        self.prefix = "<" if little else ">"
        self.has_pixels = False
        self.capture = capture
        # Top-level elements the header needs, as pydicom's reader would have yielded them.
        self.found: dict[int, RawDataElement] = {}
        # Set where pydicom's reader might see these bytes differently from this walk.
        self.odd = False

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
            if self.capture and depth == 0 and not self.has_pixels:
                if self.explicit and not b"AA" <= vr <= b"ZZ":
                    # pydicom switches to implicit VR for such an element; leave it to pydicom.
                    self.odd = True
                tag = group << 16 | elem
                if tag in _WANTED_TAGS:
                    self._keep(tag, vr, length, offset)
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

    def _keep(self, tag: int, vr: bytes, length: int, offset: int) -> None:
        if length == _UNDEFINED:
            self.odd = True
            return
        raw_vr = vr.decode(default_encoding) if self.explicit else None
        # An empty value is what pydicom's reader puts in a raw element: b"" or None.
        value = (
            bytes(self.buf[offset : offset + length])
            if length
            else cast(bytes | None, empty_value_for_VR(raw_vr, raw=True))
        )
        self.found[tag] = RawDataElement(
            BaseTag(tag), raw_vr, length, value, offset, not self.explicit, self.little
        )

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


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# InstanceHeader field -> (pydicom keyword, how its value becomes the field).
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "sop_class_uid": ("SOPClassUID", _text),
    "sop_instance_uid": ("SOPInstanceUID", _text),
    "study_instance_uid": ("StudyInstanceUID", _text),
    "series_instance_uid": ("SeriesInstanceUID", _text),
    "instance_number": ("InstanceNumber", _int),
    "patient_id": ("PatientID", _text),
    "patient_name": ("PatientName", _text),
    "patient_birth_date": ("PatientBirthDate", _text),
    "patient_sex": ("PatientSex", _text),
    "accession_number": ("AccessionNumber", _text),
    "study_date": ("StudyDate", _text),
    "study_time": ("StudyTime", _text),
    "study_description": ("StudyDescription", _text),
    "referring_physician_name": ("ReferringPhysicianName", _text),
    "modality": ("Modality", _text),
    "series_number": ("SeriesNumber", _int),
    "series_description": ("SeriesDescription", _text),
    "body_part_examined": ("BodyPartExamined", _text),
    "protocol_name": ("ProtocolName", _text),
    "manufacturer": ("Manufacturer", _text),
    "slice_thickness": ("SliceThickness", _float),
    "image_type": ("ImageType", _text),
}
_KEYWORDS = tuple(keyword for keyword, _ in _FIELDS.values())
_TAG_KEYWORDS = {int(tag_for_keyword(keyword) or 0): keyword for keyword in _KEYWORDS}
_WANTED_TAGS = frozenset([*_TAG_KEYWORDS, _CHARSET_TAG])


def _header_from(values: Mapping[str, Any], tsuid: str) -> InstanceHeader:
    fields = {name: read(values.get(keyword)) for name, (keyword, read) in _FIELDS.items()}
    return InstanceHeader(transfer_syntax_uid=tsuid, **fields)
