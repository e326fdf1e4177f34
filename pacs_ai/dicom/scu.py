"""Talking to peers as an SCU: C-ECHO and C-STORE of files as they are on disk."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_ai.config import PeerSettings
from pacs_ai.dicom.contexts import requested_contexts
from pacs_ai.dicom.fastpath import close_sockets_fully
from pacs_ai.dicom.status import describe
from pacs_ai.errors import NetworkError

logger = logging.getLogger(__name__)

# Sent files go out byte for byte from disk, never decoded and re-encoded.
_config.STORE_SEND_CHUNKED_DATASET = True

NO_RESPONSE = -1
MEDIA_STORAGE_DIRECTORY = (
    "1.2.840.10008.1.3.10"  # the peer answered nothing: association lost or DIMSE timeout
)


def _associate(
    ae: AE, peer: PeerSettings, contexts: Any = None, tls: ssl.SSLContext | None = None
) -> Any:
    if peer.tls and tls is None:
        raise NetworkError(
            f"peer {peer.name!r} wants TLS but no TLS context was given (configure [tls])"
        )
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=contexts,
        ae_title=peer.ae_title,
        tls_args=(tls, peer.host) if peer.tls and tls is not None else None,
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise NetworkError(f"{peer.ae_title}@{peer.host}:{peer.port} rejected the association")
        raise NetworkError(
            f"no association with {peer.ae_title}@{peer.host}:{peer.port} "
            "(peer down, wrong port, or it aborted)"
        )
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def _make_ae(calling_ae: str, timeout_s: float) -> AE:
    close_sockets_fully()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def echo(
    peer: PeerSettings, calling_ae: str, timeout_s: float = 10.0, tls: ssl.SSLContext | None = None
) -> int:
    """C-ECHO ``peer``; return the DIMSE status (0x0000 is success)."""
    ae = _make_ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer, tls=tls)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise NetworkError(f"{peer.ae_title} did not answer the C-ECHO")
    return int(status.Status)


@dataclass(frozen=True)
class SendableFile:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str
    sop_instance_uid: str


@dataclass
class SendReport:
    """What happened to each file: counts per DIMSE status, and every file not stored."""

    by_status: Counter[int] = field(default_factory=Counter)
    failures: list[tuple[Path, int, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sent(self) -> int:
        return sum(self.by_status.values())

    @property
    def succeeded(self) -> int:
        return sum(
            n for status, n in self.by_status.items() if status in (0x0000, 0xB000, 0xB006, 0xB007)
        )

    @property
    def ok(self) -> bool:
        """Every DICOM file was stored (files that are not DICOM objects are only reported)."""
        return self.succeeded == self.sent

    def record(self, path: Path, status: int, comment: str = "") -> None:
        with self.lock:
            self.by_status[status] += 1
            if status not in (0x0000, 0xB000, 0xB006, 0xB007):
                self.failures.append((path, status, comment))

    def as_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "succeeded": self.succeeded,
            "by_status": {
                f"0x{s:04X}" if s >= 0 else "no response": n
                for s, n in sorted(self.by_status.items())
            },
            "failures": [
                {
                    "path": str(p),
                    "status": f"0x{s:04X}" if s >= 0 else None,
                    "meaning": describe(s) if s >= 0 else "no response",
                    "comment": c,
                }
                for p, s, c in self.failures
            ],
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
        }


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files under ``paths``, folders walked recursively in a stable order."""
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield path


def scan(paths: Iterable[Path], report: SendReport) -> list[SendableFile]:
    """Read each file's meta; files that are not DICOM Part 10 are skipped, with a reason."""
    found = []
    for path in iter_files(paths):
        try:
            meta = read_file_meta_info(path)
            sop_class = str(meta.MediaStorageSOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
            # Type 1 like the class: storage commitment names each instance by it.
            sop_instance = str(meta.MediaStorageSOPInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            report.skipped.append((path, f"not a DICOM Part 10 file: {exc}"))
            continue
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            report.skipped.append((path, "a DICOMDIR indexes media; it is not sent"))
            continue
        found.append(SendableFile(path, sop_class, syntax, sop_instance))
    return found


def send(
    files: list[SendableFile],
    peer: PeerSettings,
    calling_ae: str,
    associations: int = 1,
    report: SendReport | None = None,
    on_sent: Callable[[SendableFile, int], None] | None = None,
    timeout_s: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> SendReport:
    """C-STORE ``files`` to ``peer`` over ``associations`` parallel associations."""
    report = report or SendReport()
    groups = [files[i::associations] for i in range(max(1, associations))]
    errors: list[BaseException] = []

    def worker(group: list[SendableFile]) -> None:
        try:
            _send_group(group, peer, calling_ae, report, on_sent, timeout_s, tls)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(g,)) for g in groups if g]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors and report.sent == 0:
        raise errors[0]
    return report


def _send_group(
    group: list[SendableFile],
    peer: PeerSettings,
    calling_ae: str,
    report: SendReport,
    on_sent: Callable[[SendableFile, int], None] | None,
    timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> None:
    contexts = requested_contexts({(f.sop_class_uid, f.transfer_syntax_uid) for f in group})
    ae = _make_ae(calling_ae, timeout_s)
    assoc = _associate(ae, peer, contexts, tls)
    try:
        for item in group:
            status, comment = _store_one(assoc, item)
            report.record(item.path, status, comment)
            if on_sent is not None:
                on_sent(item, status)
            if status == NO_RESPONSE and not assoc.is_established:
                lost = group[group.index(item) + 1 :]
                for rest in lost:
                    report.record(rest.path, NO_RESPONSE, "association lost")
                    if on_sent is not None:
                        on_sent(rest, NO_RESPONSE)
                logger.error(
                    "association with %s lost; %d files not sent", peer.ae_title, len(lost)
                )
                return
    finally:
        if assoc.is_established:
            assoc.release()


def _store_one(assoc: Any, item: SendableFile) -> tuple[int, str]:
    try:
        rsp = assoc.send_c_store(item.path)
    except ValueError as exc:
        # No accepted context for this SOP class / transfer syntax.
        return 0x0122, str(exc)  # SOP class not supported (PS3.7 C.4)
    if "Status" not in rsp:
        return NO_RESPONSE, "no response"
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))
