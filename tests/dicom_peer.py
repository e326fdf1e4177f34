"""A pynetdicom SCU for tests that need to misbehave on purpose, or see each file's status.

dcmtk's storescu refuses to send some of what a broken modality sends (truncated files,
mismatched UIDs); pynetdicom in chunked mode sends a file's bytes exactly as they are.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

_config.STORE_SEND_CHUNKED_DATASET = True


@contextmanager
def association(
    port: int, files: list[Path], calling_ae: str = "TESTSCU", called_ae: str = "PACSAI"
) -> Iterator[Any]:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    pairs = set()
    for path in files:
        meta = read_file_meta_info(path)
        pairs.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, [syntax])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "the node refused the association"
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def store(assoc: Any, path: Path) -> tuple[int, str]:
    rsp = assoc.send_c_store(path)
    assert "Status" in rsp, "no response to C-STORE"
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def store_all(port: int, files: list[Path], **kwargs: Any) -> list[tuple[Path, int, str]]:
    with association(port, files, **kwargs) as assoc:
        return [(path, *store(assoc, path)) for path in files]


def send_until_refused(
    port: int, files: list[Path], acked: list[Path], lock: threading.Lock
) -> None:
    try:
        with association(port, files, calling_ae="MODALITY") as assoc:
            for path in files:
                rsp = assoc.send_c_store(path)
                if rsp.get("Status") != 0x0000:
                    return  # no answer: the association was aborted by the stopping node
                with lock:
                    acked.append(path)
    except AssertionError:
        return  # association refused: the node had already stopped listening
