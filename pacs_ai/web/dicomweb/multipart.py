"""``multipart/related`` bodies (RFC 2046, RFC 2387) read incrementally, as STOW-RS needs them.

:class:`MultipartReader` is fed the request body chunk by chunk and hands back each part as
soon as its closing delimiter arrives, so memory holds one part and never the whole request.
Every malformation is a :class:`MultipartError` (a ``ValueError``) with a reason a client
can act on; nothing else escapes, whatever bytes arrive (the reader is fuzzed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

# RFC 2046 5.1.1 says 1 to 70 characters, but Orthanc's STOW-RS client sends 73 (two UUIDs).
MAX_BOUNDARY = 256
# Generous for a part's headers (Content-Type, Content-Length, Content-Location ...).
MAX_HEADER_BYTES = 16 * 1024
# Transport padding after a delimiter: whitespace up to the line end, which should be short.
MAX_PADDING = 1024

_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


class MultipartError(ValueError):
    """The body (or its Content-Type) is not a well-formed multipart message."""


class MediaTypeError(ValueError):
    """The Content-Type is a media type we do not take (HTTP 415)."""


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Split ``type/subtype; name=value; name="quoted value"`` into the type and its parameters.

    Names and the media type are lower-cased; quoted values lose their quotes and backslash
    escapes. Parameters without ``=`` are ignored.
    """
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        j = i
        while j < n and rest[j] not in "=;":
            j += 1
        name = rest[i:j].strip().lower()
        if j >= n or rest[j] == ";":
            i = j + 1
            continue
        j += 1  # past "="
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            chars: list[str] = []
            j += 1
            while j < n and rest[j] != '"':
                if rest[j] == "\\" and j + 1 < n:
                    j += 1
                chars.append(rest[j])
                j += 1
            text = "".join(chars)
            while j < n and rest[j] != ";":  # anything after the closing quote
                j += 1
        else:
            k = j
            while j < n and rest[j] != ";":
                j += 1
            text = rest[k:j].strip()
        if name:
            params[name] = text
        i = j + 1
    return media.strip().lower(), params


def stow_boundary(content_type: str) -> bytes:
    """The boundary of a STOW-RS request, whose type must be ``application/dicom``.

    Raises :class:`MediaTypeError` for another media type (415) and :class:`MultipartError`
    for a missing or unusable boundary (400).
    """
    expected = 'multipart/related; type="application/dicom"; boundary=...'
    media, params = parse_media_type(content_type)
    if media != "multipart/related":
        raise MediaTypeError(
            f"STOW-RS takes Content-Type {expected}, not {media or 'no Content-Type'!r}"
        )
    part_type, _ = parse_media_type(params.get("type", ""))
    if part_type != "application/dicom":
        got = f"type={params['type']!r}" if "type" in params else "no type parameter"
        raise MediaTypeError(
            f"STOW-RS here takes only Part 10 objects: Content-Type {expected} ({got}); "
            "metadata + bulk data (application/dicom+json) is not supported"
        )
    boundary = params.get("boundary", "")
    if not boundary:
        raise MultipartError(f"the Content-Type has no boundary parameter; send {expected}")
    if len(boundary) > MAX_BOUNDARY or not all(" " <= c <= "~" for c in boundary):
        raise MultipartError(f"the boundary must be 1 to {MAX_BOUNDARY} printable ASCII characters")
    return boundary.encode("ascii")


@dataclass
class Part:
    """One body part: its headers (names lower-cased) and its content."""

    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return parse_media_type(self.headers.get("content-type", ""))[0]


class _State(Enum):
    PREAMBLE = "preamble"
    AFTER_DELIMITER = "after delimiter"
    HEADERS = "headers"
    BODY = "body"
    DONE = "done"


@dataclass
class MultipartReader:
    """Incremental parser: :meth:`feed` chunks, take the parts it returns, then :meth:`close`."""

    boundary: bytes
    _buffer: bytearray = field(default_factory=bytearray)
    _state: _State = _State.PREAMBLE
    _scan_from: int = 0
    _headers: dict[str, str] = field(default_factory=dict)
    parts_seen: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.boundary) <= MAX_BOUNDARY:
            raise MultipartError(f"the boundary must be 1 to {MAX_BOUNDARY} characters")
        self._dash = b"--" + self.boundary
        # RFC 2046: the CRLF before "--boundary" belongs to the delimiter, not to the part.
        self._delimiter = b"\r\n" + self._dash

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def feed(self, data: bytes) -> list[Part]:
        """Add bytes; return the parts they completed, in order."""
        if self._state is _State.DONE:
            return []  # the epilogue: ignored, never kept
        self._buffer += data
        parts: list[Part] = []
        while self._step(parts):
            pass
        return parts

    def close(self) -> None:
        """Raise :class:`MultipartError` if the body ended before the close delimiter."""
        if self._state is _State.DONE:
            return
        if self._state is _State.PREAMBLE:
            raise MultipartError(
                "the body holds no part: the boundary from the Content-Type never appears"
            )
        where = "part headers" if self._state is _State.HEADERS else "a part"
        if self._state is _State.BODY:
            where = f"part {self.parts_seen + 1}"
        raise MultipartError(
            f"the body ended inside {where}, before the closing --boundary-- (truncated upload?)"
        )

    def _step(self, parts: list[Part]) -> bool:
        """Advance as far as the buffered bytes allow; False when more bytes are needed."""
        if self._state is _State.PREAMBLE:
            return self._preamble()
        if self._state is _State.AFTER_DELIMITER:
            return self._after_delimiter()
        if self._state is _State.HEADERS:
            return self._read_headers()
        if self._state is _State.BODY:
            return self._body(parts)
        return False

    def _preamble(self) -> bool:
        buf = self._buffer
        while True:
            at = buf.find(self._dash, self._scan_from)
            if at < 0:
                # Keep only what could be the start of a boundary split across chunks.
                keep = len(self._dash)
                if len(buf) > keep:
                    del buf[: len(buf) - keep]
                self._scan_from = 0
                return False
            if at == 0 or buf[at - 1] == 0x0A:  # a boundary starts a line
                del buf[: at + len(self._dash)]
                self._scan_from = 0
                self._state = _State.AFTER_DELIMITER
                return True
            self._scan_from = at + 1

    def _after_delimiter(self) -> bool:
        buf = self._buffer
        if len(buf) < 2:
            return False
        if buf[:2] == b"--":
            self._state = _State.DONE
            buf.clear()
            return False
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > MAX_PADDING:
                raise MultipartError("no line end after a boundary delimiter")
            return False
        if buf[:end].strip(b" \t\r"):
            raise MultipartError(
                "unexpected bytes after a boundary delimiter: is the boundary also used "
                "inside a part? Pick a boundary that does not occur in the data"
            )
        del buf[: end + 1]
        self._state = _State.HEADERS
        return True

    def _read_headers(self) -> bool:
        buf = self._buffer
        if buf[:2] == b"\r\n" or buf[:1] == b"\n":
            # No headers at all: the part starts right away.
            del buf[: 2 if buf[:1] == b"\r" else 1]
            self._headers = {}
            self._state = _State.BODY
            return True
        if len(buf) < 2:
            return False
        found = _BLANK_LINE.search(buf, 0, MAX_HEADER_BYTES + 4)
        if found is None:
            if len(buf) > MAX_HEADER_BYTES:
                raise MultipartError(f"part headers longer than {MAX_HEADER_BYTES} bytes")
            return False
        self._headers = _parse_headers(bytes(buf[: found.start()]))
        del buf[: found.end()]
        self._state = _State.BODY
        return True

    def _body(self, parts: list[Part]) -> bool:
        buf = self._buffer
        at = buf.find(self._delimiter, self._scan_from)
        if at < 0:
            # Resume where a delimiter split across chunks could start: linear, not quadratic.
            self._scan_from = max(0, len(buf) - len(self._delimiter) + 1)
            return False
        with memoryview(buf) as view:
            body = bytes(view[:at])
        del buf[: at + len(self._delimiter)]
        self._scan_from = 0
        parts.append(Part(self._headers, body))
        self.parts_seen += 1
        self._headers = {}
        self._state = _State.AFTER_DELIMITER
        return True


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = ""
    for raw in block.split(b"\n"):
        line = raw.rstrip(b"\r").decode("latin-1")
        if not line:
            continue
        if line[0] in " \t" and last:  # obsolete line folding
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise MultipartError(f"malformed part header line {line[:80]!r}")
        headers[name] = value.strip()
        last = name
    return headers
