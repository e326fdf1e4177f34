"""Read what the node needs from an encoded instance, without touching its pixel data.

:func:`read_header` checks that the encoded data set is whole (every element's length fits,
every undefined-length sequence is closed) and pulls out the attributes used to file, route
and list the instance. It never decodes pixels and never re-encodes anything.

The walk that checks completeness also picks up the few top-level elements the header needs:
parsing the whole header with ``dcmread`` as well cost three times the rest of the read. Where
the bytes are unusual enough that the walk might see them differently from pydicom (odd file
meta, a VR switch, an undefined-length value), the header comes from ``dcmread`` as before.

Converting those elements with pydicom was still most of the read, so the common ones are
decoded straight from their bytes (:mod:`pacs_ai.dicom.values`), reproducing pydicom's
conversion step for step (see :func:`_header_from_walk`); anything less plain goes through
pydicom as before.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom import config, dcmread
from pydicom.charset import convert_encodings, default_encoding, python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element, empty_value_for_VR
from pydicom.errors import InvalidDicomError
from pydicom.hooks import hooks, raw_element_value, raw_element_vr
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

from pacs_ai.dicom.part10 import Part10
from pacs_ai.dicom.values import DECODERS, NotPlain, as_float, as_int, as_text, as_uid

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


def read_header(data: bytes | Part10) -> InstanceHeader:
    """Parse a Part 10 object (preamble, file meta, data set) into an :class:`InstanceHeader`.

    Raises :class:`MalformedDataset` when the bytes are not a whole DICOM object. UIDs are
    returned as found (possibly empty): judging them is the caller's business. A
    :class:`Part10` in two pieces reads as its joined bytes would.
    """
    try:
        header = _read_walked(data)
    except MalformedDataset:
        # pydicom's reading below gives the reason a sender will recognise.
        header = None
    if header is None:
        header = _read_with_dcmread(data.joined() if isinstance(data, Part10) else data)
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


def _read_walked(data: bytes | Part10) -> InstanceHeader | None:
    """The header from the completeness walk, or None where only ``dcmread`` can vouch for it."""
    direct = _pydicom_as_shipped()
    if isinstance(data, Part10):
        if data.data_set[:2] == b"\x02\x00":
            # Group 0002 in the data set: read on, the meta would take it in as pydicom does.
            data = data.joined()
        elif data.transfer_syntax_uid:
            # Our own prefix, written from the negotiated syntax: nothing to read back.
            return _read_walked_from(data.data_set, 0, data.transfer_syntax_uid, direct)
        else:
            # A prefix ending where the data set starts.
            meta = _file_meta(data.prefix, direct)
            tsuid = None if meta is None else _meta_transfer_syntax(meta[1], direct)
            return None if tsuid is None else _read_walked_from(data.data_set, 0, tsuid, direct)
    meta = _file_meta(data, direct)
    tsuid = None if meta is None else _meta_transfer_syntax(meta[1], direct)
    if meta is None or tsuid is None:
        return None
    return _read_walked_from(data, meta[0], tsuid, direct)


def _meta_transfer_syntax(ts_element: RawDataElement, direct: bool) -> str | None:
    """The file meta's Transfer Syntax UID; None where only ``dcmread`` can read it."""
    try:
        return _transfer_syntax(ts_element, direct) or None
    except Exception:
        return None


def _read_walked_from(data: bytes, start: int, tsuid: str, direct: bool) -> InstanceHeader | None:
    walker = _walk(data, start, tsuid, capture=True)
    if walker.odd or walker.explicit == _pydicom_finds_implicit(walker.buf, tsuid):
        return None
    try:
        header = _header_from_walk(walker, tsuid, direct)
    except Exception:
        return None
    _check_pixels(header, walker.has_pixels)
    return header


def _pydicom_as_shipped() -> bool:
    """Whether pydicom converts values as the direct decoding assumes: its default settings.

    Hooks, callbacks and the numpy/Decimal/datetime options change what a value becomes; under
    RAISE, values the direct decoding accepts could still fail pydicom's checks.
    """
    return (
        config.data_element_callback is None
        and hooks.raw_element_vr is raw_element_vr
        and hooks.raw_element_value is raw_element_value
        and not hooks.raw_element_kwargs
        and config.settings.reading_validation_mode != config.RAISE
        and not config.datetime_conversion
        and not (config.use_DS_numpy or config.use_IS_numpy or config.use_DS_decimal)
    )


def _transfer_syntax(raw: RawDataElement, direct: bool) -> str:
    value = raw.value
    if direct and raw.VR == "UI" and value and b"\\" not in value:
        return as_uid("UI", value, None, config.settings.reading_validation_mode)
    # str() of a multi-valued UID is a list's repr: pydicom's answer, kept as it was.
    return str(convert_raw_data_element(raw, encoding=default_encoding).value)


def _header_from_walk(walker: _Walker, tsuid: str, direct: bool) -> InstanceHeader:
    """The header from the elements the walk kept, as pydicom would convert them.

    With ``direct``, an element written with its dictionary VR (or in implicit VR, where
    pydicom takes the dictionary VR) is decoded here; one the decoder cannot vouch for
    (:class:`NotPlain`) and any other VR go through pydicom, as does text under a Specific
    Character Set outside :data:`_PLAIN_CHARSETS`.
    """
    found = walker.found
    encoding = _plain_encoding(walker) if direct else None
    pydicom_encoding: str | list[str] = default_encoding
    if encoding is not None:
        pydicom_encoding = [encoding]
    elif _CHARSET_TAG in found:
        charset = convert_raw_data_element(walker.raw_element(_CHARSET_TAG)).value
        pydicom_encoding = convert_encodings(charset)
    mode = config.settings.reading_validation_mode
    fields: dict[str, Any] = {}
    for name, tag, vr, read in _SOURCES:
        entry = found.get(tag)
        if entry is None:
            fields[name] = read(None)
            continue
        if direct and entry[0] in (None, vr):
            if not entry[1]:
                # pydicom gives an empty value ("", None or an empty PersonName): all read alike.
                fields[name] = read(None)
                continue
            try:
                fields[name] = DECODERS[vr](vr, walker.value(tag), encoding, mode)
                continue
            except NotPlain:
                pass
        raw = walker.raw_element(tag)
        fields[name] = read(convert_raw_data_element(raw, encoding=pydicom_encoding).value)
    return InstanceHeader(transfer_syntax_uid=tsuid, **fields)


# Specific Character Sets under which pydicom decodes a text value free of escape sequences
# with one Python codec and nothing else: ASCII (as Latin-1, like pydicom), Latin-1, UTF-8.
_PLAIN_CHARSETS = {
    name: python_encoding[name]
    for name in ("ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 100", "ISO_IR 192")
} | {"": default_encoding}


def _plain_encoding(walker: _Walker) -> str | None:
    """The codec for SH, LO and PN values, or None where pydicom must handle the charset."""
    entry = walker.found.get(_CHARSET_TAG)
    if entry is None:
        return default_encoding
    if entry[0] not in (None, "CS"):
        return None
    # As pydicom reads the CS value; several values (code extensions) are never plain.
    name = walker.value(_CHARSET_TAG).decode(default_encoding).rstrip(" \0")
    return _PLAIN_CHARSETS.get(name)


def _check_pixels(header: InstanceHeader, has_pixels: bool) -> None:
    # A cut that falls exactly between two elements leaves a well-formed data set; for an
    # image it also leaves no pixels, which is how we still catch it.
    if not has_pixels and "Image Storage" in UID(header.sop_class_uid).name:
        raise MalformedDataset("image object without Pixel Data (truncated?)")


def _file_meta(data: bytes, direct: bool = False) -> tuple[int, RawDataElement] | None:
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
        # dcmread converts the first meta element to check the encoding; we refuse where that
        # fails. A 4-byte UL (the usual group length) always converts under default settings.
        plain_ul = direct and vr == b"UL" and length == 4
        if offset == 132 and not plain_ul and not _converts(raw):
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
        # Top-level elements the header needs: VR as written (None in implicit VR), length
        # and where the value starts in buf.
        self.found: dict[int, tuple[str | None, int, int]] = {}
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
        self.found[tag] = (vr.decode(default_encoding) if self.explicit else None, length, offset)

    def value(self, tag: int) -> bytes:
        _, length, offset = self.found[tag]
        return bytes(self.buf[offset : offset + length])

    def raw_element(self, tag: int) -> RawDataElement:
        """A kept element as pydicom's reader would have yielded it."""
        vr, length, offset = self.found[tag]
        # An empty value is what pydicom's reader puts in a raw element: b"" or None.
        value = self.value(tag) if length else cast(bytes | None, empty_value_for_VR(vr, raw=True))
        return RawDataElement(
            BaseTag(tag), vr, length, value, offset, not self.explicit, self.little
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


# InstanceHeader field -> (pydicom keyword, how its value becomes the field).
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "sop_class_uid": ("SOPClassUID", as_text),
    "sop_instance_uid": ("SOPInstanceUID", as_text),
    "study_instance_uid": ("StudyInstanceUID", as_text),
    "series_instance_uid": ("SeriesInstanceUID", as_text),
    "instance_number": ("InstanceNumber", as_int),
    "patient_id": ("PatientID", as_text),
    "patient_name": ("PatientName", as_text),
    "patient_birth_date": ("PatientBirthDate", as_text),
    "patient_sex": ("PatientSex", as_text),
    "accession_number": ("AccessionNumber", as_text),
    "study_date": ("StudyDate", as_text),
    "study_time": ("StudyTime", as_text),
    "study_description": ("StudyDescription", as_text),
    "referring_physician_name": ("ReferringPhysicianName", as_text),
    "modality": ("Modality", as_text),
    "series_number": ("SeriesNumber", as_int),
    "series_description": ("SeriesDescription", as_text),
    "body_part_examined": ("BodyPartExamined", as_text),
    "protocol_name": ("ProtocolName", as_text),
    "manufacturer": ("Manufacturer", as_text),
    "slice_thickness": ("SliceThickness", as_float),
    "image_type": ("ImageType", as_text),
}
_KEYWORDS = tuple(keyword for keyword, _ in _FIELDS.values())
# InstanceHeader field -> (tag, its dictionary VR, reader), in _FIELDS order.
_SOURCES = tuple(
    (name, tag, dictionary_VR(tag), read)
    for name, (keyword, read) in _FIELDS.items()
    for tag in [int(tag_for_keyword(keyword) or 0)]
)
_WANTED_TAGS = frozenset([*(tag for _, tag, _, _ in _SOURCES), _CHARSET_TAG])


def _header_from(values: Mapping[str, Any], tsuid: str) -> InstanceHeader:
    fields = {name: read(values.get(keyword)) for name, (keyword, read) in _FIELDS.items()}
    return InstanceHeader(transfer_syntax_uid=tsuid, **fields)
