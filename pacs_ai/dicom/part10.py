"""Wrap a received data set in the DICOM File Format (PS3.10 7.1) without decoding it.

The data set bytes stay exactly as the peer sent them; only the 128-byte preamble, "DICM"
and the File Meta Information (group 0002, always explicit VR little endian) go in front.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pacs_ai import __version__

# pacs-ai's Implementation Class UID: a UUID-derived "2.25" UID (PS3.5 B.2), since we hold
# no registered root of our own.
IMPLEMENTATION_CLASS_UID = "2.25.208233147914046829934561209651271318418"
IMPLEMENTATION_VERSION_NAME = f"PACSAI_{__version__}"[:16]

_PREFIX = b"\x00" * 128 + b"DICM"


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    # Group 0002, explicit VR LE. Only OB (the version) takes the long form.
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def uid_bytes(value: str) -> bytes:
    """A UI value, NUL-padded to even length.

    A broken sender's UID may hold non-ASCII bytes; pydicom decoded them as Latin-1, so
    encoding back the same way gives exactly the sender's bytes (in the stored file meta, and
    in the C-STORE response), and the ingest refuses the UID with its reason.
    """
    raw = str(value).encode("latin-1", errors="replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = ""
) -> bytes:
    body = b"".join(
        [
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", uid_bytes(sop_class_uid)),
            _element(0x0003, b"UI", uid_bytes(sop_instance_uid)),
            _element(0x0010, b"UI", uid_bytes(transfer_syntax_uid)),
            _element(0x0012, b"UI", uid_bytes(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        ]
        + ([_element(0x0016, b"AE", _text(source_ae))] if source_ae else [])
    )
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


@dataclass(frozen=True)
class Part10:
    """A DICOM file in two pieces: our preamble and file meta, then the data set as received.

    Joining them would copy every received image once more only to be copied again into the
    spool's write buffer; the header read and the spool take the pieces as they are.
    """

    prefix: bytes
    data_set: bytes
    transfer_syntax_uid: str = ""
    """The prefix's Transfer Syntax UID, where the caller wrote it: the header read then
    need not read it back."""

    def __len__(self) -> int:
        return len(self.prefix) + len(self.data_set)

    def joined(self) -> bytes:
        return self.prefix + self.data_set


def part10(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    source_ae: str,
    dataset: bytes,
) -> Part10:
    """Preamble + "DICM" + file meta, and the data set exactly as received."""
    meta = file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae)
    return Part10(_PREFIX + meta, dataset, transfer_syntax_uid)
