"""The DICOM listener: C-ECHO and C-STORE SCP on pynetdicom, and the storage commitment
reports (N-EVENT-REPORT) peers send back on associations of their own.

Handlers get their dependencies bound (``evt_handlers`` with args); nothing here keeps
module state. Every failure inside a handler becomes a DIMSE status and a log line: a bad
object or a broken peer must never take the listener down.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from pacs_ai.audit.events import AuditEvent, Kind, Outcome
from pacs_ai.audit.trail import Auditor
from pacs_ai.config import Settings
from pacs_ai.dicom import commitment
from pacs_ai.dicom.contexts import (
    COMMITMENT_TRANSFER_SYNTAXES,
    STORAGE_COMMITMENT_PUSH_MODEL,
    STORAGE_TRANSFER_SYNTAXES,
    storage_sop_classes,
)
from pacs_ai.dicom.fastpath import MAX_PDU_BYTES, close_sockets_fully, on_conn_open
from pacs_ai.dicom.part10 import part10
from pacs_ai.dicom.status import StoreStatus
from pacs_ai.dicom.tls import server_context
from pacs_ai.storage import commitments
from pacs_ai.storage.ingest import Ingest

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CONGESTION = (0x02, 0x03, 0x01)

# What a peer that only reports storage commitment may use.
REPORT_CONTEXTS = frozenset({STORAGE_COMMITMENT_PUSH_MODEL, Verification})


# How long a busier receiver leaves a new connection to a less busy one before taking it
# itself (that one may be stuck, or gone), and how often it looks whether it was taken.
ACCEPT_YIELD_MAX_S = 0.1
ACCEPT_YIELD_POLL_MS = 5
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class ListeningSockets:
    """What the node opens once and hands to each receiver process.

    ``loads`` holds each receiver's open associations (a shared array, one slot per
    receiver), so that a new connection goes to the least busy one.
    """

    dicom: socket.socket
    tls: socket.socket | None = None
    loads: Any = None

    def close(self) -> None:
        for sock in (self.dicom, self.tls):
            if sock is not None:
                sock.close()


def open_listening_sockets(settings: Settings, loads: Any) -> ListeningSockets:
    """Bind and listen on the DICOM (and TLS) port, for receivers in other processes.

    ``loads`` is a shared integer array with a slot per receiver (``multiprocessing``'s
    ``Array("i", n, lock=False)``).
    """
    node = settings.node
    dicom = _listen(node.bind, node.dicom_port)
    try:
        tls = _listen(node.bind, settings.tls.port) if settings.tls.port else None
    except BaseException:
        dicom.close()
        raise
    return ListeningSockets(dicom, tls, loads)


def bind_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not yet listening; OSError if that is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As pynetdicom does: connections in TIME_WAIT from a previous run do not block us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _listen(host: str, port: int) -> socket.socket:
    sock = bind_port(host, port)
    try:
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with TLS handshakes in the connection's own thread.

    pynetdicom does them in ``get_request``, on the accepting thread and without a timeout,
    so one peer that connects and never speaks TLS would stop the listener accepting anyone
    else.
    """

    handshake_timeout_s = 10.0
    auditor: Auditor | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            request.settimeout(self.handshake_timeout_s)
            try:
                request.do_handshake()
            except (OSError, ValueError) as exc:
                # SSLError is an OSError: bad certificate, old protocol, plain DICOM on the
                # TLS port, or a peer that stalled past the timeout.
                logger.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                if self.auditor is not None:
                    self.auditor.record(
                        AuditEvent(
                            Kind.ASSOCIATION_REFUSED,
                            actor="",
                            address=str(client_address[0]),
                            outcome=Outcome.MINOR_FAILURE,
                            detail={"reason": f"TLS handshake failed: {exc}"[:300]},
                        )
                    )
                self.shutdown_request(request)
                return
            request.settimeout(previous)
        super().process_request_thread(request, client_address)


class ReceiverLoad:
    """One receiver's open associations, over its plain and TLS servers, published for the
    others in its slot of the node's shared array.

    Published when a connection arrives, when one is accepted, and every turn of each
    server's loop (0.5 s), so an association that ended stops counting within a turn.
    """

    def __init__(self, loads: Any, slot: int, associations: Callable[[], int]) -> None:
        self.loads, self.slot = loads, slot
        self.associations = associations  # the receiver's open associations, both servers
        self.accepted = 0  # accepted, association thread not started yet
        self.lock = threading.Lock()

    def add_accepted(self, change: int) -> None:
        with self.lock:
            self.accepted += change

    def publish(self) -> int:
        load = self.associations() + self.accepted
        self.loads[self.slot] = load
        return load

    def least_of_all(self) -> bool:
        return self.publish() <= int(min(self.loads))


class SharedSocketServer(NodeServer):
    """Serves a listening socket the node opened and shares with its other receivers.

    A new connection wakes every receiver. Each publishes how many associations it serves;
    one that serves more than another leaves the connection to it, for up to
    ``ACCEPT_YIELD_MAX_S``, and the least busy accepts. The socket is non-blocking, so the
    receivers that lose the race get nothing, and socketserver drops the failed accept.
    SO_REUSEPORT, used before, hashed connections to processes at random: 4 associations
    over 2 receivers split 3-1 or 4-0 in five cases out of eight, leaving one process, and
    its GIL, with most of the work.
    """

    def __init__(
        self, *args: Any, listening: socket.socket, load: ReceiverLoad, **kwargs: Any
    ) -> None:
        self._listening = listening
        self._load = load
        super().__init__(*args, **kwargs)
        load.publish()  # a replaced receiver's slot may still hold its predecessor's load

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.close()
        self.socket = self._listening
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening: the node called listen() before handing the socket over."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if not self._load.least_of_all():
            self._leave_to_less_busy()
        # BlockingIOError when another receiver took it: an OSError, which socketserver
        # treats as "no request this time".
        client, address = super().get_request()
        # Linux does not pass O_NONBLOCK on to accepted sockets; say so rather than rely on it.
        client.setblocking(True)
        self._load.add_accepted(1)
        self._load.publish()
        return client, address

    def _leave_to_less_busy(self) -> None:
        assert self.socket is not None
        poller = select.poll()
        poller.register(self.socket, select.POLLIN)
        deadline = time.monotonic() + ACCEPT_YIELD_MAX_S
        while time.monotonic() < deadline:
            # Sleep, then look: poll() with a timeout returns at once while the connection
            # waits, so looping on it would spin a core against this process's own C-STOREs.
            time.sleep(ACCEPT_YIELD_POLL_MS / 1000)
            if not poller.poll(0):
                return  # taken

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            # No thread started (none left to start?): nothing will count this one down.
            self._load.add_accepted(-1)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            # The association's own thread has started (or the connection is gone), so
            # active_associations counts it from here.
            self._load.add_accepted(-1)

    def service_actions(self) -> None:
        self._load.publish()
        super().service_actions()

    def server_close(self) -> None:
        # pynetdicom shuts the socket down first, which would stop it listening in every
        # process that shares it; closing drops only this process's descriptor.
        assert self.socket is not None
        self.socket.close()
        # What ThreadingMixIn.server_close adds: wait for connections still being set up (a
        # TLS handshake), so that their associations start before the drain looks for them.
        cast(Any, self)._threads.join()  # not in typeshed


def build_ae(settings: Settings) -> AE:
    close_sockets_fully()
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    # pynetdicom offers 16 KiB; at 1 MiB a 512x512 CT slice arrives in one P-DATA PDU instead
    # of 32, which measured 447 -> 675 images/s for pynetdicom alone (bench/ingest.py notes).
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.add_supported_context(Verification)
    for sop_class in storage_sop_classes():
        ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
    # A peer reporting storage commitment calls us in the SCP role of that SOP class (PS3.4
    # J.3.3), proposing role selection (Orthanc: SCU no, SCP yes); accept exactly that.
    ae.add_supported_context(
        STORAGE_COMMITMENT_PUSH_MODEL,
        list(COMMITMENT_TRANSFER_SYNTAXES),
        scu_role=False,
        scp_role=True,
    )
    return ae


@dataclass(frozen=True)
class _Gate:
    """What an association request is checked against."""

    settings: Settings
    ingest: Ingest
    auditor: Auditor


def _on_requested(event: Any, gate: _Gate) -> None:
    assoc = event.assoc
    requestor = assoc.requestor
    # The requestor's fields are filled from the A-ASSOCIATE-RQ only after this event.
    calling = requestor.primitive.calling_ae_title.strip()
    called = requestor.primitive.called_ae_title.strip()
    address = requestor.address
    node = gate.settings.node
    reason, rsd = None, None
    # A peer known only as one we ask for storage commitment may report it, nothing more.
    reports_only = False
    if node.check_called_ae and called != node.ae_title:
        reason, rsd = f"called AE {called!r} is not {node.ae_title!r}", REJECT_CALLED_AE
    elif node.require_known_peers and not _is_known_sender(gate.settings, calling, address):
        if _is_commitment_peer(gate.settings, calling, address):
            reports_only = True
        else:
            reason, rsd = (
                "calling AE and host are not a configured peer with send = true",
                REJECT_CALLING_AE,
            )
    # Reports need no spool room, and with retention.require_commitment they are what lets
    # a purge free some: a full disk must not refuse them. A plain C-ECHO still is refused
    # then, so that a sender's echo says the node is not taking images now.
    reports = _proposes_only(assoc, REPORT_CONTEXTS) and any(
        cx.abstract_syntax == STORAGE_COMMITMENT_PUSH_MODEL
        for cx in assoc.requestor.requested_contexts
    )
    if rsd is None and not reports and not gate.ingest.spool.has_room():
        reason, rsd = "free disk is below the reserve", REJECT_CONGESTION
    if rsd is None:
        _prefer_requestor_order(assoc, REPORT_CONTEXTS if reports_only else None)
        logger.info("association from %s@%s accepted", calling, address)
        return
    logger.warning("association from %s@%s rejected: %s", calling, address, reason)
    if rsd is not REJECT_CONGESTION:
        gate.auditor.record(
            AuditEvent(
                Kind.ASSOCIATION_REFUSED,
                actor=calling,
                address=address,
                outcome=Outcome.MINOR_FAILURE,
                target=called,
                detail={"reason": reason},
            )
        )
    assoc.acse.send_reject(*rsd)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def _proposes_only(assoc: Any, abstract_syntaxes: frozenset[str]) -> bool:
    return all(cx.abstract_syntax in abstract_syntaxes for cx in assoc.requestor.requested_contexts)


def _prefer_requestor_order(assoc: Any, allowed: frozenset[str] | None = None) -> None:
    """Accept, in each context, the first transfer syntax the *sender* proposed that we take.

    pynetdicom picks by the acceptor's order, so a modality offering [JPEG, Explicit LE] for a
    JPEG file would be told Explicit LE and have to decompress (dcmtk's storescu then fails).
    The sender lists its preference first, usually the syntax its data is in: taking that
    keeps the bytes as they are, and never asks a sender to compress what it holds natively.
    With ``allowed``, only those abstract syntaxes are accepted at all.
    """
    supported = {
        cx.abstract_syntax: cx
        for cx in assoc.acceptor.supported_contexts
        if allowed is None or cx.abstract_syntax in allowed
    }
    order: dict[str, list[str]] = {}
    for requested in assoc.requestor.requested_contexts:
        ours = supported.get(requested.abstract_syntax)
        if ours is None:
            continue
        chosen = order.setdefault(requested.abstract_syntax, [])
        chosen += [
            ts
            for ts in requested.transfer_syntax
            if ts in ours.transfer_syntax and ts not in chosen
        ]
    contexts = []
    for abstract_syntax, syntaxes in order.items():
        ours = supported[abstract_syntax]
        cx = PresentationContext()
        cx.abstract_syntax = abstract_syntax
        cx.transfer_syntax = list[str | bytes | UID](syntaxes)
        cx.scu_role, cx.scp_role = ours.scu_role, ours.scp_role
        contexts.append(cx)
    assoc.acceptor.supported_contexts = contexts


def _is_known_sender(settings: Settings, calling_ae: str, address: str) -> bool:
    for peer in settings.peers_with_ae(calling_ae):
        if peer.send and _same_host(peer.host, address):
            return True
    return False


def _is_commitment_peer(settings: Settings, calling_ae: str, address: str) -> bool:
    return any(
        peer.storage_commitment and _same_host(peer.host, address)
        for peer in settings.peers_with_ae(calling_ae)
    )


def _same_host(configured: str, address: str) -> bool:
    if configured == address:
        return True
    try:
        infos = socket.getaddrinfo(configured, None)
    except OSError:
        return False
    return any(info[4][0] == address for info in infos)


def _on_echo(event: Any) -> int:
    return 0x0000


def _on_event_report(event: Any, ingest: Ingest) -> tuple[int, Dataset | None]:
    # A storage commitment report for a request a worker made (pacs_ai/pipeline/deliver.py).
    return commitment.handle_event_report(
        event, lambda report: commitments.record_report(ingest.engine, report, ingest.clock())
    )


def _on_store(event: Any, ingest: Ingest) -> Dataset | int:
    assoc = event.assoc
    calling = assoc.requestor.ae_title.strip()
    request = event.request
    try:
        data = part10(
            request.AffectedSOPClassUID,
            request.AffectedSOPInstanceUID,
            event.context.transfer_syntax,
            calling,
            request.DataSet.getvalue(),
        )
        outcome = ingest.store(
            data,
            calling_ae=calling,
            affected_sop_class_uid=str(request.AffectedSOPClassUID or ""),
            affected_sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
            origin=f"dimse:{assoc.requestor.address}",
        )
        if outcome.status == StoreStatus.SUCCESS and outcome.header is not None:
            _tally(assoc, outcome.header.study_instance_uid)
    except Exception as exc:
        # The edge: whatever went wrong, the peer gets a status and the listener lives on,
        # and what it sent is kept for whoever looks into it.
        logger.exception("C-STORE from %s failed unexpectedly", calling)
        ingest.spool.quarantine(
            request.DataSet.getvalue(),
            f"internal error in the receiver: {type(exc).__name__}",
            {"status": "0x0110", "calling_ae": calling, "origin": "dimse", "data_set_only": True},
        )
        return _status(StoreStatus.PROCESSING_FAILURE, "Internal error in receiver")
    return _status(outcome.status, outcome.comment)


def _status(status: StoreStatus, comment: str) -> Dataset | int:
    if not comment or status == StoreStatus.SUCCESS:
        # A bare status spares pynetdicom copying a Dataset for every stored image.
        return int(status)
    rsp = Dataset()
    rsp.Status = int(status)
    # Error Comment is LO: 64 characters at most.
    rsp.ErrorComment = comment[:64]
    return rsp


_TALLY = "_pacs_ai_received"


def _tally(assoc: Any, study_uid: str) -> None:
    # Per association, instances acknowledged per study: one audit record each at the end
    # instead of one per image.
    counts: dict[str, int] = assoc.__dict__.setdefault(_TALLY, {})
    counts[study_uid] = counts.get(study_uid, 0) + 1


def _on_closed(event: Any, auditor: Auditor) -> None:
    assoc = event.assoc
    counts: dict[str, int] = assoc.__dict__.get(_TALLY, {})
    for study_uid, count in counts.items():
        auditor.record(
            AuditEvent(
                Kind.INSTANCES_RECEIVED,
                actor=assoc.requestor.ae_title.strip(),
                address=str(assoc.requestor.address),
                target=study_uid,
                detail={"instances": count, "protocol": "DIMSE"},
            )
        )


def _on_aborted(event: Any) -> None:
    logger.warning("association from %s aborted", event.assoc.requestor.ae_title.strip())


class Receiver:
    """One DICOM listener: on ports of its own, or on sockets the node opened and shares."""

    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        sockets: ListeningSockets | None = None,
        auditor: Auditor | None = None,
        slot: int = 0,
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.ae = build_ae(settings)
        self.sockets = sockets
        self.load = (
            ReceiverLoad(sockets.loads, slot, self.active_associations)
            if sockets is not None
            else None
        )
        self.auditor = auditor or Auditor(ingest.engine, settings)
        self.server: ThreadedAssociationServer | None = None
        self.tls_server: ThreadedAssociationServer | None = None

    def start(self) -> tuple[str, int]:
        gate = _Gate(self.settings, self.ingest, self.auditor)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, on_conn_open),
            (evt.EVT_CONN_CLOSE, _on_closed, [self.auditor]),
            (evt.EVT_REQUESTED, _on_requested, [gate]),
            (evt.EVT_C_ECHO, _on_echo),
            (evt.EVT_C_STORE, _on_store, [self.ingest]),
            (evt.EVT_N_EVENT_REPORT, _on_event_report, [self.ingest]),
            (evt.EVT_ABORTED, _on_aborted),
        ]
        node = self.settings.node
        shared = self.sockets
        self.server = self._serve(
            handlers, node.dicom_port, None, shared.dicom if shared is not None else None
        )
        host, port = self.server.server_address[:2]
        logger.info("listening for DICOM as %s on %s:%d", node.ae_title, host, port)
        tls = self.settings.tls
        if tls.port:
            self.tls_server = self._serve(
                handlers,
                tls.port,
                server_context(tls),
                shared.tls if shared is not None else None,
            )
            logger.info(
                "listening for DICOM TLS on %s:%d (client certificates %s)",
                host,
                tls.port,
                "required" if tls.verify_clients else "not required",
            )
        return str(host), int(port)

    def _serve(
        self,
        handlers: list[Any],
        port: int,
        ssl_context: ssl.SSLContext | None,
        listening: socket.socket | None,
    ) -> ThreadedAssociationServer:
        shared: dict[str, Any] = {}
        if listening is not None:
            shared = {"listening": listening, "load": self.load}
        server = self.ae.make_server(
            (self.settings.node.bind, port),
            evt_handlers=handlers,
            server_class=NodeServer if listening is None else SharedSocketServer,
            ssl_context=ssl_context,
            **shared,
        )
        cast(NodeServer, server).handshake_timeout_s = self.settings.tls.handshake_timeout_s
        cast(NodeServer, server).auditor = self.auditor
        # What AE.start_server(block=False) does, which cannot take a server class.
        self.ae._servers.append(server)
        name = "dicom-tls-listener" if ssl_context else "dicom-listener"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
        return server

    def _servers(self) -> list[ThreadedAssociationServer]:
        return [s for s in (self.server, self.tls_server) if s is not None]

    def active_associations(self) -> int:
        return sum(len(s.active_associations) for s in self._servers())

    def stop(self, drain_timeout_s: float) -> None:
        """Stop accepting, let open associations finish, then abort what is left.

        An instance is acknowledged only once durable, so an abort loses nothing the peer
        believes we hold; draining first spares the peer a retry.
        """
        servers = self._servers()
        if not servers:
            return
        self.server = self.tls_server = None
        for server in servers:
            server.shutdown()
        deadline = time.monotonic() + drain_timeout_s

        def open_associations() -> list[Any]:
            return [a for server in servers for a in server.active_associations]

        # Only established associations can still deliver instances; a half-open or garbage
        # connection is waiting out a protocol timer and is not worth waiting for.
        while time.monotonic() < deadline and any(a.is_established for a in open_associations()):
            time.sleep(0.05)
        left = open_associations()
        established = [a for a in left if a.is_established]
        for assoc in left:
            if assoc.is_established:
                assoc.abort()
            else:
                assoc.kill()
        if established:
            logger.warning("aborted %d association(s) still open after the drain", len(established))
        for assoc in established:
            assoc.join(timeout=2)
        logger.info("DICOM listener stopped")
