"""The DICOM JSON model (PS3.18 F.2): elements built from index values, data sets from files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

MEDIA_TYPE = "application/dicom+json"

# Binary values above this many bytes are left out of metadata (PS3.18 allows a BulkDataURI
# instead; the node serves no bulk data resource, so leaving them out is the honest answer).
BULK_THRESHOLD = 1024
_OMIT = "pacs-ai:omitted-bulk-data"
_PIXEL_DATA = "7FE00010"
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def tag_key(keyword: str) -> str:
    """``PatientName`` -> ``00100010``, the key of an element in DICOM JSON."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword!r} is not a DICOM keyword")
    return f"{tag:08X}"


def resolve_keyword(name: str) -> str | None:
    """A keyword from a keyword or an 8-digit hex tag; None when it names no known attribute."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        return keyword or None
    return name if tag_for_keyword(name) is not None else None


def person_name(value: str) -> dict[str, str]:
    """A PN value as DICOM JSON: one key per component group that is present."""
    groups = value.split("=")
    return {key: text for key, text in zip(_PN_GROUPS, groups, strict=False) if text}


def element(vr: str, values: Iterable[Any]) -> dict[str, Any]:
    """One DICOM JSON element; empty values give an element without ``Value`` (zero length)."""
    kept = [v for v in values if v is not None and v != ""]
    if not kept:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [person_name(str(v)) for v in kept]}
    return {"vr": vr, "Value": kept}


def read_metadata(path: Path, only: Iterable[str] = ()) -> dict[str, Any]:
    """A stored instance as DICOM JSON without its pixel data or other bulk data.

    With ``only`` (keywords), just those top-level attributes.
    """
    keywords = list(only)
    tags = [tag_for_keyword(k) for k in keywords]
    ds = dcmread(
        path, stop_before_pixels=True, specific_tags=[t for t in tags if t is not None] or None
    )
    return dataset_json(ds)


def dataset_json(ds: Dataset) -> dict[str, Any]:
    # Invalid values in a sender's file are dropped rather than failing the whole answer.
    converted = ds.to_json_dict(
        bulk_data_threshold=BULK_THRESHOLD,
        bulk_data_element_handler=_bulk_marker,
        suppress_invalid_tags=True,
    )
    return _without_bulk(converted)


def _bulk_marker(_element: DataElement) -> str:
    return _OMIT


def _without_bulk(data: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key == _PIXEL_DATA or value.get("BulkDataURI") == _OMIT:
            continue
        if value.get("vr") == "SQ" and "Value" in value:
            value = {**value, "Value": [_without_bulk(item) for item in value["Value"]]}
        kept[key] = value
    return kept
