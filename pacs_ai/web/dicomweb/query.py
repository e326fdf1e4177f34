"""QIDO-RS query parameters (PS3.18 8.3.4) parsed into matches and the fields to return.

Matching follows PS3.4 C.2.2.2: single value (exact; PN case-insensitive), wildcard ``*`` and
``?`` (case-insensitive), universal (empty value or ``*``: no filter, but the attribute is
returned), range on DA and TM (``20200101-20201231``, open at either end), and list matching
of UIDs and of codes (``CT,MR`` or ``CT\\MR``). Attributes are named by keyword or by tag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from pacs_ai.web.dicomweb.attributes import ATTRIBUTES, FILE_DEFAULTS, Attribute, Level
from pacs_ai.web.dicomweb.dicomjson import resolve_keyword

# Results per answer when the client asks for more or gives no limit; the Warning header
# tells it that more can be had with offset.
MAX_LIMIT = 1000

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_LIST_VRS = frozenset({"UI", "CS"})
_CONTROL_PARAMS = frozenset({"includefield", "limit", "offset", "fuzzymatching"})


class QueryError(ValueError):
    """A query the node cannot answer as asked (HTTP 400); the message says what to change."""


class Kind(Enum):
    EXACT = "exact"
    WILDCARD = "wildcard"
    LIST = "list"
    RANGE = "range"


@dataclass(frozen=True)
class Match:
    attribute: Attribute
    kind: Kind
    # EXACT/WILDCARD: (value,); LIST: the values; RANGE: (low, high), either may be "".
    values: tuple[str, ...]


@dataclass
class Query:
    """One QIDO-RS request: what to match, which levels and attributes to return, and paging."""

    levels: frozenset[Level]
    matches: list[Match] = field(default_factory=list)
    # Keywords to return beyond the defaults of the levels.
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    # Instance attributes the index does not hold, read from the stored files.
    file_fields: list[str] = field(default_factory=list)
    limit: int = MAX_LIMIT
    offset: int = 0
    warnings: list[str] = field(default_factory=list)

    def returns(self, attribute: Attribute) -> bool:
        if attribute.level not in self.levels:
            return False
        return attribute.default or self.include_all or attribute.keyword in self.include


def parse_query(
    params: Iterable[tuple[str, str]], levels: frozenset[Level], matchable: frozenset[Level]
) -> Query:
    """Read the query string of a search that returns ``levels`` and may match ``matchable``."""
    query = Query(levels)
    unsupported: list[str] = []
    for name, value in params:
        if name in _CONTROL_PARAMS:
            _control(query, name, value)
            continue
        keyword = resolve_keyword(name)
        attribute = ATTRIBUTES.get(keyword or "")
        if attribute is None or attribute.level not in matchable:
            unsupported.append(name)
            continue
        query.include.add(attribute.keyword)
        match = _match(attribute, value)
        if match is None:
            continue
        if attribute.column is None and attribute.keyword != "ModalitiesInStudy":
            # Computed or not indexed (counts, StudyID): returned, but not matched on.
            unsupported.append(name)
            continue
        query.matches.append(match)
    if unsupported:
        query.warnings.append(
            "these query keys are not supported here and were ignored: "
            + ", ".join(sorted(set(unsupported)))
        )
    return query


def _control(query: Query, name: str, value: str) -> None:
    if name == "includefield":
        for item in (v.strip() for v in value.split(",")):
            if item:
                _include(query, item)
    elif name == "limit":
        query.limit = _count(name, value)
        if query.limit > MAX_LIMIT or query.limit == 0:
            query.limit = MAX_LIMIT
    elif name == "offset":
        query.offset = _count(name, value)
    elif value.strip().lower() == "true":  # fuzzymatching
        query.warnings.append(
            "The fuzzymatching parameter is not supported. Only literal matching has been "
            "performed."
        )


def _include(query: Query, item: str) -> None:
    if item.lower() == "all":
        query.include_all = True
        if Level.INSTANCE in query.levels:
            query.file_fields += [k for k in FILE_DEFAULTS if k not in query.file_fields]
        return
    keyword = resolve_keyword(item)
    if keyword is None:
        raise QueryError(
            f"includefield={item!r} names no DICOM attribute; give a keyword (PatientAge), "
            "an 8-digit hex tag (00101010) or all"
        )
    attribute = ATTRIBUTES.get(keyword)
    if attribute is not None:
        query.include.add(keyword)
    elif Level.INSTANCE in query.levels:
        if keyword not in query.file_fields:
            query.file_fields.append(keyword)
    else:
        query.warnings.append(
            f"includefield {keyword} is not kept in the index at this level and was ignored; "
            "ask for it at the instance level"
        )


def _count(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise QueryError(f"{name} must be a whole number of 0 or more, not {value!r}")
    return number


def _match(attribute: Attribute, value: str) -> Match | None:
    """The match a value asks for; None for universal matching (return only)."""
    value = value.strip()
    if value in ("", "*"):
        return None
    vr = attribute.vr
    if vr in ("DA", "TM"):
        return _date_or_time(attribute, value)
    if vr in _LIST_VRS:
        values = tuple(v.strip() for v in re.split(r"[,\\]", value) if v.strip())
        if vr == "CS" and len(values) == 1 and _has_wildcard(values[0]):
            return Match(attribute, Kind.WILDCARD, values)
        return Match(attribute, Kind.LIST, values)
    if vr in ("IS", "DS"):
        if not _NUMBER.match(value):
            raise QueryError(
                f"{attribute.keyword} takes a number, not {value!r}; wildcards and ranges "
                "are not supported on numbers"
            )
        return Match(attribute, Kind.EXACT, (value,))
    if _has_wildcard(value):
        return Match(attribute, Kind.WILDCARD, (value,))
    return Match(attribute, Kind.EXACT, (value,))


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def _date_or_time(attribute: Attribute, value: str) -> Match:
    pattern, example = (_DATE, "20200101") if attribute.vr == "DA" else (_TIME, "0830")
    low, dash, high = value.partition("-")
    bounds = (low, high) if dash else (value,)
    for bound in bounds:
        if bound and not pattern.match(bound):
            raise QueryError(
                f"{attribute.keyword}={value!r} is not a {attribute.vr} value or range; "
                f"use {example}, {example}-{example}, -{example} or {example}-"
            )
    if not dash:
        return Match(attribute, Kind.EXACT, (value,))
    if not low and not high:
        raise QueryError(f"{attribute.keyword}=- gives neither end of the range")
    return Match(attribute, Kind.RANGE, (low, high))
