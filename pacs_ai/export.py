"""What every export (reviews, audit trail) shares: safe CSV, and one reading of "since"."""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Iterable, Sequence
from typing import Any

from pacs_ai.errors import InvalidArgument


def _cell(value: Any) -> Any:
    # A value starting with = + - or @ would run as a formula in a spreadsheet (OWASP
    # "CSV injection"); comments and request paths come from users: a leading apostrophe
    # makes them text.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_text(rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> str:
    """``rows`` as CSV with a header of ``fields`` (other keys ignored), formula-safe."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def parse_since(value: str) -> float:
    """UNIX seconds, or an ISO 8601 date or time (UTC unless it names a zone)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            f"since must be UNIX seconds or an ISO 8601 date/time (YYYY-MM-DD), not {value!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()
