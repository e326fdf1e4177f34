"""The node's own results (SEG, SR) as DICOM Part 10 bytes, byte for byte what pydicom writes.

A ct-organs-threshold SEG of a 300-slice CT holds ~850 frames, each with its own item in the
Per-Frame Functional Groups Sequence: some 7,500 nested data sets and 17,500 elements.
pydicom's writer spends 0.3-0.55 s on them (every data set is checked for ambiguous VRs,
every element goes through a fresh buffer, a charset conversion and a dispatch by VR), a
third of the job's encode stage. :func:`part10_bytes` writes the same bytes with one pass
per element.

It covers what the node's builders produce: explicit VR little endian, data sets built in
memory (no raw elements left from a parsed file), ASCII text. Anything else, an element it
does not know how to write exactly as pydicom would, returns ``None`` and the caller uses
pydicom; a PN, AT, or non-ASCII text value is written by pydicom's own function for its VR.
``tests/test_encode.py`` compares both writers byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from io import BytesIO
from typing import Any, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, dcmwrite, writers
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, VR

_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
)
"""VRs with a reserved field and a 32-bit length in explicit VR (PS3.5 7.1.2)."""
_STRING_PADDING = {"AE": " ", "AS": " ", "CS": " ", "UR": " ", "UI": "\0"}
"""``write_string`` VRs and their padding; DA, DT and TM join them when their value is text."""
_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
# Character sets in which ASCII text is its own encoding (PS3.3 C.12.1.1.2): the default
# repertoire, Latin-1 and UTF-8. Text under any other goes to pydicom's encoder.
_ASCII_CHARSETS = frozenset({default_encoding, "", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})
_NUMBER_STRING_VRS = frozenset({"DS", "IS"})
_DATE_TIME_VRS = frozenset({"DA", "DT", "TM"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
# SS is left to pydicom: it writes the first value of a LUT Descriptor as US.
_NUMBER_FORMATS = {"FD": "d", "FL": "f", "SL": "l", "SV": "q", "UL": "L", "US": "H", "UV": "Q"}
_DELEGATED_VRS = frozenset({"PN", "AT", "SS"})
"""Written through pydicom's own writer function for the VR, element by element."""

_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_ITEM_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_UNDEFINED = 0xFFFFFFFF


class _NotPlain(Exception):
    """Something only pydicom's writer knows how to write exactly."""


def part10_bytes(dataset: Dataset) -> bytes | None:
    """``dataset`` as pydicom's ``save_as(..., enforce_file_format=True)`` writes it, or
    ``None`` where this writer cannot promise the same bytes."""
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is None or file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return None
    tags = list(dataset.keys())  # iterating a Dataset yields its elements, not their tags
    if any(tag >> 16 in (0, 2) for tag in tags):
        return None  # dcmwrite refuses these, with its own message
    if "PixelData" in dataset:
        # As dcmwrite does for an uncompressed transfer syntax (PS3.5 A.4).
        dataset["PixelData"].is_undefined_length = False
    out: list[bytes] = []
    try:
        _write_dataset(out, dataset, default_encoding, [dataset])
    except (_NotPlain, UnicodeEncodeError, struct.error, OverflowError):
        # pydicom raises for a value it cannot encode, or writes what it alone knows how to.
        return None
    out.insert(0, _header(dataset))
    return b"".join(out)


def _header(dataset: Dataset) -> bytes:
    """Preamble, "DICM" and File Meta Information, by pydicom (it fills in and checks them)."""
    shell = Dataset()
    shell.file_meta = dataset.file_meta
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword in dataset:
            setattr(shell, keyword, dataset[keyword].value)
    preamble = getattr(dataset, "preamble", None)
    if preamble is not None:
        shell.preamble = preamble
    buffer = BytesIO()
    dcmwrite(buffer, shell, enforce_file_format=True)
    written = buffer.getvalue()
    # The group length (0002,0000) is the first element after "DICM": a UL whose value
    # counts the bytes of the rest of group 0002.
    (meta_length,) = struct.unpack_from("<I", written, 132 + 8)
    return written[: 132 + 12 + meta_length]


def _write_dataset(
    out: list[bytes], dataset: Dataset, parent_encoding: Any, ancestors: list[Dataset]
) -> None:
    """``ancestors``: ``dataset`` and the data sets that hold it, nearest first."""
    # A data set read from a file may hold raw elements, which pydicom writes as read: only
    # data sets built in memory are written here.
    if dataset.original_encoding != (None, None):
        raise _NotPlain
    encodings = dataset.get("SpecificCharacterSet", parent_encoding)
    for tag in sorted(dataset.keys()):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        element = dataset[tag]
        if element.VR in AMBIGUOUS_VR:
            # Resolved as pydicom does before it writes (Pixel Data's "OB or OW" by Bits
            # Allocated, "US or SS" by Pixel Representation, looked up in the ancestors).
            try:
                corrected = correct_ambiguous_vr_element(element, dataset, True, ancestors)
            except AttributeError:
                raise _NotPlain from None  # pydicom names what is missing
            if not isinstance(corrected, DataElement) or corrected.VR in AMBIGUOUS_VR:
                raise _NotPlain
            element = corrected
        _write_element(out, element, encodings, ancestors)


def _write_element(
    out: list[bytes], element: DataElement, encodings: Any, ancestors: list[Dataset]
) -> None:
    vr = element.VR
    tag = element.tag
    undefined = element.is_undefined_length
    if element.is_buffered or (undefined and vr != "SQ") or vr not in writers:
        raise _NotPlain  # pydicom refuses a VR it does not know, even on an empty element
    if element.is_empty:
        value = b""
    elif vr == "SQ":
        value = _sequence(element.value, encodings, ancestors)
    else:
        value = _value(element, vr, encodings)
    length = len(value)
    if vr in _LONG_VRS:
        out.append(
            struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0,
                        _UNDEFINED if undefined else length)
        )  # fmt: skip
    else:
        if length > 0xFFFF:
            raise _NotPlain  # pydicom writes it as UN, with a warning
        out.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length))
    out.append(value)
    if undefined:
        out.append(_SEQUENCE_DELIMITER)


def _sequence(items: Any, encodings: Any, ancestors: list[Dataset]) -> bytes:
    out: list[bytes] = []
    for item in items:
        body: list[bytes] = []
        _write_dataset(body, item, encodings, [item, *ancestors])
        encoded = b"".join(body)
        if getattr(item, "is_undefined_length_sequence_item", False):
            out += (_ITEM, struct.pack("<I", _UNDEFINED), encoded, _ITEM_DELIMITER)
        else:
            out += (_ITEM, struct.pack("<I", len(encoded)), encoded)
    return b"".join(out)


def _value(element: DataElement, vr: str, encodings: Any) -> bytes:
    value = element.value
    if vr in _NUMBER_FORMATS:
        return _numbers(value, _NUMBER_FORMATS[vr])
    if vr in _STRING_PADDING or (vr in _DATE_TIME_VRS and isinstance(value, str)):
        return _padded(_joined(value), _STRING_PADDING.get(vr, " ")).encode(default_encoding)
    if vr in _NUMBER_STRING_VRS:
        return _padded(_number_strings(value), " ").encode(default_encoding)
    if vr in _TEXT_VRS:
        text = _joined(value)
        if isinstance(encodings, str) and encodings in _ASCII_CHARSETS and text.isascii():
            return _padded(text, " ").encode("ascii")
    elif vr in _BYTES_VRS:
        if isinstance(value, bytes):
            return value + b"\x00" if len(value) % 2 else value
        raise _NotPlain
    elif vr == "UN" and isinstance(value, bytes):
        return value  # pydicom pads nothing here
    elif vr not in _DELEGATED_VRS and vr not in _DATE_TIME_VRS:
        raise _NotPlain  # a VR this writer does not know
    return _by_pydicom(element, vr, encodings)


def _by_pydicom(element: DataElement, vr: str, encodings: Any) -> bytes:
    """The value as pydicom's writer function for ``vr`` writes it (PN, AT, dates as dates,
    SS, text that is not ASCII)."""
    entry = writers[VR(vr)]
    write, parameter = cast(Callable[..., None], entry[0]), entry[1]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    if vr in ("PN", *_TEXT_VRS):
        write(buffer, element, encodings=convert_encodings(encodings or [default_encoding]))
    elif parameter is not None:
        write(buffer, element, parameter)
    else:
        write(buffer, element)
    return buffer.getvalue()


def _numbers(value: Any, fmt: str) -> bytes:
    if value is None or value == "":
        return b""
    if isinstance(value, (MultiValue, list)):
        return struct.pack(f"<{len(value)}{fmt}", *value)
    if isinstance(value, (int, float)):
        return struct.pack(f"<{fmt}", value)
    raise _NotPlain


def _joined(value: Any) -> Any:
    if isinstance(value, (MultiValue, list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise _NotPlain
        return "\\".join(value)
    if not isinstance(value, str):
        raise _NotPlain
    return value


def _number_strings(value: Any) -> str:
    values = value if isinstance(value, (MultiValue, list, tuple)) else [value]
    return "\\".join(v.original_string if hasattr(v, "original_string") else str(v) for v in values)


def _padded(text: str, padding: str) -> str:
    return text + padding if len(text) % 2 else text
