"""Direct value decoders: raw element bytes of a given VR into the header's Python values.

Converting the header's elements with pydicom was most of reading a header, so the common
ones are decoded here straight from their bytes, reproducing pydicom's conversion step for
step, without building a pydicom DataElement. Each decoder reproduces pydicom's converter for
the VR (pydicom.values) followed by the field's reader (:func:`as_text`, :func:`as_int`,
:func:`as_float`); a value it cannot vouch for raises :class:`NotPlain` and goes through
pydicom instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydicom.charset import default_encoding
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value


class NotPlain(Exception):
    """The value is one the direct decoding does not reproduce; pydicom converts it."""


# Each decoder reproduces pydicom's converter for the VR (pydicom.values) followed by the
# field's reader (as_text, as_int, as_float) for a value of non-zero length; it calls pydicom's
# validate_value where pydicom's reading does, so WARN mode warns alike.
def _string(vr: str, value: bytes, encoding: str | None, mode: int) -> str:
    # CS, DA, TM (convert_string): Latin-1 whatever the character set, padding cut from the
    # end of the whole value only.
    return _joined(value.decode(default_encoding).rstrip(" \0").split("\\"))


def as_uid(vr: str, value: bytes, encoding: str | None, mode: int) -> str:
    # convert_UI, then UID(), which validates each value and strips it.
    items = value.decode(default_encoding).rstrip("\0 ").split("\\")
    for item in items:
        validate_value("UI", item, mode)
    return "\\".join(item.strip() for item in items)


def _short_or_long(vr: str, value: bytes, encoding: str | None, mode: int) -> str:
    # SH, LO (convert_text): each value validated, then cut off trailing NULs and spaces.
    parts = _decoded(value, encoding).split("\\")
    for part in parts:
        validate_value(vr, part, mode)
    return _joined([part.rstrip("\0 ") for part in parts])


def _person_name(vr: str, value: bytes, encoding: str | None, mode: int) -> str:
    # convert_PN: str() of each PersonName joins its component groups without empty
    # trailing ones.
    names = []
    for name in _decoded(value.rstrip(b"\0 "), encoding).split("\\"):
        validate_value("PN", name, mode)
        groups = name.split("=")
        while groups and not groups[-1]:
            groups.pop()
        names.append("=".join(groups))
    return _joined(names)


# Valid IS and DS values (PS3.5 6.2, as pydicom's validators read them): IS() and DSfloat()
# take them without a warning and hold int(value) / float(value). Anything else (several
# values, "1.0", "nan", over-long) goes to pydicom, whose fallbacks are its own business.
_IS_VALUE = re.compile(r" *[+-]?[0-9]+")
_DS_VALUE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _integer_string(vr: str, value: bytes, encoding: str | None, mode: int) -> int:
    item = value.decode(default_encoding).rstrip(" \0")
    if len(item) > 12 or not _IS_VALUE.fullmatch(item):
        raise NotPlain
    return int(item)


def _decimal_string(vr: str, value: bytes, encoding: str | None, mode: int) -> float:
    item = value.decode(default_encoding).strip().rstrip(" \0")
    if not _DS_VALUE.fullmatch(item):
        raise NotPlain
    return float(item)


def _decoded(value: bytes, encoding: str | None) -> str:
    # pydicom's decode_bytes without escape sequences: one codec; on failure it substitutes
    # replacement characters and warns, which we leave to it.
    if encoding is None or b"\x1b" in value:
        raise NotPlain
    try:
        return value.decode(encoding)
    except UnicodeDecodeError as exc:
        raise NotPlain from exc


def _joined(values: list[str]) -> str:
    # as_text: a single value stripped, several joined as they are.
    return values[0].strip() if len(values) == 1 else "\\".join(values)


DECODERS: dict[str, Callable[[str, bytes, str | None, int], Any]] = {
    "CS": _string,
    "DA": _string,
    "TM": _string,
    "UI": as_uid,
    "SH": _short_or_long,
    "LO": _short_or_long,
    "PN": _person_name,
    "IS": _integer_string,
    "DS": _decimal_string,
}


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def as_int(value: Any) -> int | None:
    try:
        number = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    # An IS longer than its 12 characters (pydicom only warns) can pass what the index's
    # 64-bit column holds: such a number is as good as absent, not a reason to refuse.
    return number if number is None or -(2**63) <= number < 2**63 else None


def as_float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
