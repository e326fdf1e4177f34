"""Fast paths that stand in for pynetdicom 3 internals on the C-STORE hot path.

pynetdicom is correct but slow for a hospital's ingest: two threads per association poll
with 1 ms sleeps, PDUs are read 4 KiB per recv(), every response is built through pydicom
and every P-DATA is copied several times. :func:`on_conn_open` (bound to EVT_CONN_OPEN)
swaps in the replacements below for each association. They only switch on for pynetdicom
3.x, and tests/test_perf_scp.py checks them against the installed version (same bytes out,
same behaviour on store, refusal, release, reject and abort).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import select
import socket
import ssl
import struct
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
import pynetdicom.association
from pynetdicom import evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from pacs_ai.dicom.part10 import uid_bytes
from pacs_ai.dicom.store_request import StoreRequests

logger = logging.getLogger(__name__)
# pynetdicom's own, for the messages of the reader that stands in for its DUL's.
_dul_logger = logging.getLogger("pynetdicom.dul")

# What the node advertises as its maximum PDU (pynetdicom offers 16 KiB; see scp.build_ae).
MAX_PDU_BYTES = 1 << 20
# How long an idle association's threads sleep between checks of their timers.
_IDLE_WAKE_S = 0.05
# The hot-path replacements below (response encoding, event-driven reactors) stand in for
# pynetdicom 3 internals; tests/test_perf_scp.py checks them against the installed version.
_PYNETDICOM_3 = pynetdicom.__version__.startswith("3.")

# pynetdicom binds these to every association; they format a description of every PDU and
# DIMSE message for its INFO/DEBUG log, and the C-STORE one copies the whole data set to do
# so (~0.1 ms of CPU per 512 KiB image). Without a reader at those levels they are pure cost.
_PYNETDICOM_LOG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)

# A PDU's length excludes its 6-byte header; a little slack for senders that round up.
PDU_HEADER_SLACK = 1024


def _shutdown_and_close(self: AssociationSocket) -> None:
    # pynetdicom's own skips close() when shutdown() raises, as it does after a peer reset or
    # a TLS alert; the descriptor then waits for the garbage collector. A delivery retrying a
    # refusing peer for hours, or a listener under a scan, must not pile them up.
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def close_sockets_fully() -> None:
    """Make every pynetdicom socket close even when its shutdown fails (idempotent)."""
    if _PYNETDICOM_3:
        AssociationSocket._shutdown_socket = _shutdown_and_close  # type: ignore[method-assign]


class _ReactorTime:
    """``time`` as pynetdicom's association module sees it, less the acceptor reactor's nap.

    pynetdicom's acceptor reactor sleeps 1 ms at the top of every turn before it looks for a
    message. An association made event-driven here blocks on its checkpoint instead, so
    there the nap is pure delay: up to 1 ms on every C-STORE, ~15 % of an association
    thread's time under load. Every other sleep, in every thread, goes through unchanged.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def sleep(self, seconds: float) -> None:
        # An association is its reactor's thread.
        if sys._getframe(1).f_code is _REACTOR_CODE and isinstance(
            getattr(threading.current_thread(), "_reactor_checkpoint", None), _Checkpoint
        ):
            return
        self._real.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


_REACTOR_CODE = Association._run_reactor.__code__


def on_conn_open(event: Any) -> None:
    assoc = event.assoc
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        for log_event, handler in _PYNETDICOM_LOG_HANDLERS:
            assoc.unbind(log_event, handler)
    if _PYNETDICOM_3:
        dimse, dul = assoc.dimse, assoc.dul
        dimse.send_msg = functools.partial(_send_msg, dimse, dimse.send_msg)
        dul._decode_pdu = functools.partial(_decode_pdu, dul, dul._decode_pdu)
        dimse.receive_primitive = StoreRequests(dimse, dimse.receive_primitive)
        _make_event_driven(assoc)
        module = cast(Any, pynetdicom.association)
        if not isinstance(module.time, _ReactorTime):
            module.time = _ReactorTime(time)
    assoc_socket = assoc.dul.socket
    sock = assoc_socket.socket
    if sock is None:
        return
    # pynetdicom leaves Nagle on; with it, every small DIMSE response waits for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # pynetdicom reads an accepted socket with no timeout: a peer that announces a PDU and
    # stops sending inside it would hold its association (and a slot of max_associations)
    # forever. Reads start only once data is waiting, so an idle association is unaffected;
    # its idle limit is the network timeout the reactor keeps.
    if assoc.network_timeout is not None:
        sock.settimeout(assoc.network_timeout)
    # pynetdicom reads PDUs 4 KiB per recv(), so a 512 KiB slice costs 128 system calls and
    # as many GIL hand-offs. Same contract, read straight into one buffer.
    assoc_socket.recv = functools.partial(recv_exactly, sock)
    if _PYNETDICOM_3:
        assoc.dul._read_pdu_data = functools.partial(_read_pdu_data, assoc.dul, sock)


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that tells a waiting reactor when something was put in it."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _Checkpoint(threading.Event):
    """Stands in for an association reactor's checkpoint and paces the reactor.

    pynetdicom's acceptor reactor sleeps 1 ms and then waits on this Event, every turn,
    idle or not. Open, this one holds the reactor until a message or primitive arrives
    (or ``_IDLE_WAKE_S`` passes, for the timers); closed, it blocks as the original does.
    """

    def __init__(self, kick: threading.Event) -> None:
        super().__init__()
        self._kick = kick
        self.set()

    def set(self) -> None:
        super().set()
        self._kick.set()

    def wait(self, timeout: float | None = None) -> bool:
        if not super().wait(timeout):
            return False
        self._kick.wait(_IDLE_WAKE_S)
        self._kick.clear()
        # Paused while we waited (release, send_*): block until resumed, as the original would.
        return super().wait(timeout)


class _DulWaker:
    """Lets the DUL reactor block on its socket and still hear of primitives to send."""

    def __init__(self, dul: Any) -> None:
        self.dul = dul
        self.read_end, self.write_end = socket.socketpair()
        self.read_end.setblocking(False)
        self.write_end.setblocking(False)
        self.is_transport_event = dul._is_transport_event
        # Closed with the connection; the finalizer is a backstop for a peer that vanished.
        self._closer = weakref.finalize(self, _close_all, self.read_end, self.write_end)

    def close(self, _event: Any = None) -> None:
        self._closer()

    def notify(self) -> None:
        # A full buffer already holds a wake-up; a closed one has nobody left to wake.
        with contextlib.suppress(OSError):
            self.write_end.send(b"\0")

    def wait_for_event(self) -> bool:
        """``_is_transport_event``, waiting up to ``_IDLE_WAKE_S`` for something to do."""
        dul = self.dul
        sock = dul.socket.socket if dul.socket is not None else None
        if (
            sock is None
            or not dul.socket._is_connected
            or not dul.event_queue.empty()
            # Awaiting the peer's close (Sta13), pynetdicom closes at once if nothing came.
            or dul.state_machine.current_state == "Sta13"
            or (isinstance(sock, ssl.SSLSocket) and sock.pending())
        ):
            return bool(self.is_transport_event())
        try:
            readable, _, _ = select.select([sock, self.read_end], [], [], _IDLE_WAKE_S)
        except (OSError, ValueError):
            return bool(self.is_transport_event())
        if self.read_end in readable:
            self._drain()
        if sock in readable:
            return bool(self.is_transport_event())
        # Queue the event for a primitive to send now, or the reactor naps 1 ms first.
        dul._process_recv_primitive()
        return False

    def _drain(self) -> None:
        # Non-blocking: stops with BlockingIOError once every wake-up byte is read.
        with contextlib.suppress(OSError):
            while self.read_end.recv(4096):
                pass


def _close_all(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()


def _make_event_driven(assoc: Any) -> None:
    """Replace pynetdicom's 1 ms polling in both association threads by waiting on events.

    Each association's two threads otherwise wake a thousand times a second whether or not
    anything happened (7 % of a core for four idle associations), and every message waits
    for the next wake-up on its way in and on its way out.
    """
    kick = threading.Event()
    assoc._reactor_checkpoint = _Checkpoint(kick)
    assoc.dimse.msg_queue = _NotifyingQueue(kick.set)
    dul = assoc.dul
    dul.to_user_queue = _NotifyingQueue(kick.set)
    waker = _DulWaker(dul)
    dul.to_provider_queue = _NotifyingQueue(waker.notify)
    dul._is_transport_event = waker.wait_for_event
    assoc.bind(evt.EVT_CONN_CLOSE, waker.close)


def _decode_pdu(dul: Any, decode_any: Any, bytestream: bytearray) -> tuple[Any, str]:
    """pynetdicom's ``_decode_pdu``, with P-DATA-TF decoded over a view of the received bytes.

    pynetdicom copies each PDU whole for an event nobody here listens to, then copies every
    PDV out of it, and the DIMSE layer copies each PDV once more to drop its first byte:
    three extra passes over every 512 KiB image. Slices of a memoryview are views, and the
    DIMSE layer keeps its own copy of what it needs, so the bytes are read once.
    """
    assoc = dul.assoc
    if (
        bytestream[:1] != b"\x04"
        or assoc.get_handlers(evt.EVT_DATA_RECV)
        or assoc.get_handlers(evt.EVT_PDU_RECV)
    ):
        return cast(tuple[Any, str], decode_any(bytestream))
    pdu = P_DATA_TF()
    pdu.decode(cast(bytes, memoryview(bytestream)))  # slicing and unpacking is all it does
    return pdu, "Evt10"


def _send_msg(dimse: Any, send_any: Any, primitive: Any, context_id: int) -> None:
    """pynetdicom's ``send_msg``, with C-STORE responses encoded directly.

    pynetdicom builds every response through pydicom Datasets and encodes the command set
    twice (once for its group length): a quarter of the receiver's Python time per image.
    A C-STORE-RSP is eight fixed elements, so we write the same bytes ourselves
    (tests/test_perf_scp.py compares them with pynetdicom's) and hand the P-DATA to the
    same DUL queue. Anything else, or anyone listening for sent messages, goes the usual way.
    """
    command = store_response_command(primitive)
    max_pdu = dimse.maximum_pdu_size
    if (
        command is None
        or (max_pdu and len(command) > max_pdu - 6)
        or dimse.assoc.get_handlers(evt.EVT_DIMSE_SENT)
    ):
        send_any(primitive, context_id)
        return
    pdata = P_DATA()
    # Message control header 0x03: command information, last fragment (PS3.8 E.2).
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
    dimse.dul.send_pdu(pdata)


def store_response_command(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set for ``primitive`` (implicit VR little endian, PS3.7 9.3.1.2).

    None unless ``primitive`` is a C-STORE response holding only what ours hold: the UIDs,
    the message id, a status and optionally an ASCII error comment.
    """
    if (
        not isinstance(primitive, C_STORE)
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.OffendingElement is not None
        or primitive.DataSet is not None
    ):
        return None
    comment = primitive.ErrorComment
    if comment is not None and not comment.isascii():
        return None
    # In tag order, as a Dataset would be written; absent values are left out, as pynetdicom does.
    elements = [
        _command_element(0x0002, _padded_uid(primitive.AffectedSOPClassUID)),
        _command_element(0x0100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
        _command_element(0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _command_element(0x0800, struct.pack("<H", 0x0101)),  # no data set follows
        _command_element(0x0900, struct.pack("<H", primitive.Status)),
        _command_element(0x0902, None if comment is None else _padded_text(comment)),
        _command_element(0x1000, _padded_uid(primitive.AffectedSOPInstanceUID)),
    ]
    body = b"".join(element for element in elements if element)
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def _command_element(element: int, value: bytes | None) -> bytes:
    if value is None:
        return b""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _padded_uid(uid: str | None) -> bytes | None:
    return None if uid is None else uid_bytes(uid)


def _padded_text(text: str) -> bytes:
    raw = text.encode("latin-1", errors="replace")
    return raw + b" " if len(raw) % 2 else raw


def recv_exactly(sock: socket.socket, nr_bytes: int, prefix: bytes | bytearray = b"") -> bytearray:
    """``prefix`` and then ``nr_bytes`` read (blocking); fewer only if the peer closed.

    The length comes from the peer's PDU header, so it is bounded before anything is
    allocated: no PDU we accept may exceed the maximum we advertised.
    """
    if nr_bytes > MAX_PDU_BYTES + PDU_HEADER_SLACK:
        raise ConnectionError(f"peer announced a {nr_bytes}-byte PDU; the limit is {MAX_PDU_BYTES}")
    start = len(prefix)
    buffer = bytearray(start + nr_bytes)
    buffer[:start] = prefix
    view = memoryview(buffer)
    got = start
    while got < len(buffer):
        n = sock.recv_into(view[got:], len(buffer) - got)
        if n == 0:
            del view
            return buffer[:got]
        got += n
    return buffer


def _read_pdu_data(dul: Any, sock: socket.socket) -> None:
    """pynetdicom's ``_read_pdu_data``, with the PDU read into the buffer that holds its header.

    pynetdicom appends the body to the header (``bytestream += ...``), one more copy of every
    512 KiB image. Same events and log messages, branch for branch.
    """
    try:
        header = recv_exactly(sock, 6)
    except (OSError, TimeoutError) as exc:
        _dul_logger.error("Connection closed before the entire PDU was received")
        _dul_logger.exception(exc)
        dul.event_queue.put("Evt17")
        return
    try:
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    except struct.error:
        dul.event_queue.put("Evt17")
        return
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        _dul_logger.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        dul.event_queue.put("Evt19")
        return
    try:
        bytestream = recv_exactly(sock, pdu_length, prefix=header)
    except (OSError, TimeoutError) as exc:
        _dul_logger.error("Connection closed before the entire PDU was received")
        _dul_logger.exception(exc)
        dul.event_queue.put("Evt17")
        return
    if len(bytestream) != 6 + pdu_length:
        _dul_logger.error(
            f"The received PDU is shorter than expected ({len(bytestream)} of "
            f"{6 + pdu_length} bytes received)"
        )
        dul.event_queue.put("Evt17")
        return
    try:
        pdu, event = dul._decode_pdu(bytestream)
        dul.event_queue.put(event)
    except Exception as exc:
        _dul_logger.error("Unable to decode the received PDU data")
        _dul_logger.exception(exc)
        dul.event_queue.put("Evt19")
        return
    dul._recv_pdu.put(pdu)
