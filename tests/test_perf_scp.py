"""The receiver's replacements for pynetdicom's hot path: same bytes, same protocol."""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_RELEASE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket

from pacs_ai.config import NodeSettings, Settings, StorageSettings
from pacs_ai.dicom import fastpath, scp
from pacs_ai.dicom.status import StoreStatus
from pacs_ai.storage.db import open_database
from pacs_ai.storage.ingest import Ingest
from pacs_ai.storage.spool import Spool
from tests.databases import index_database
from tests.peers import free_port, wait_for
from tests.realdata import real_file


def test_the_pynetdicom_internals_we_stand_in_for_are_there() -> None:
    for cls, names in (
        (DULServiceProvider, ["_is_transport_event", "_process_recv_primitive", "_decode_pdu"]),
        (DIMSEServiceProvider, ["send_msg", "maximum_pdu_size"]),
    ):
        for name in names:
            assert hasattr(cls, name), f"{cls.__name__}.{name}"
    assoc = Association(AE(), "acceptor")
    for name in ("_reactor_checkpoint", "dimse", "dul"):
        assert hasattr(assoc, name)
    assert hasattr(assoc.dimse, "msg_queue")
    assert hasattr(assoc.dul, "to_user_queue") and hasattr(assoc.dul, "to_provider_queue")
    assert fastpath._PYNETDICOM_3


class _Service(StorageServiceClass):
    def __init__(self) -> None:  # validate_status needs no association
        pass


def _pynetdicom_command(rsp: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdata,) = list(message.encode_msg(1, 16382))
    return bytes(pdata.presentation_data_value_list[0][1])


@pytest.mark.parametrize("status", list(StoreStatus))
@pytest.mark.parametrize("comment", ["", "odd", "even", "x" * 80])
@pytest.mark.parametrize("sop_class", ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"])
def test_store_response_bytes_equal_pynetdicoms(
    status: StoreStatus, comment: str, sop_class: str
) -> None:
    for message_id, instance in ((1, "1.2.3.4"), (65535, "1.2.3.45")):
        rsp = C_STORE()
        rsp.MessageID = rsp.MessageIDBeingRespondedTo = message_id
        rsp.AffectedSOPClassUID = sop_class
        rsp.AffectedSOPInstanceUID = instance
        rsp = _Service().validate_status(scp._status(status, comment), rsp)
        ours = fastpath.store_response_command(rsp)
        assert ours is not None
        assert b"\x03" + ours == _pynetdicom_command(rsp)


def test_other_responses_go_the_usual_way() -> None:
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 1
    echo.Status = 0
    assert fastpath.store_response_command(echo) is None
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.Status = 0xC000
    rsp.OffendingElement = [0x00100010]
    assert fastpath.store_response_command(rsp) is None


class _FakeDul:
    def __init__(self) -> None:
        self.assoc = Association(AE(), "acceptor")
        for log_event, handler in fastpath._PYNETDICOM_LOG_HANDLERS:
            self.assoc.unbind(log_event, handler)
        self.fallback_calls = 0

    def decode_any(self, bytestream: bytearray) -> tuple[Any, str]:
        self.fallback_calls += 1
        return DULServiceProvider._decode_pdu(self, bytestream)  # type: ignore[arg-type]


def test_p_data_decoded_over_a_view_equals_pynetdicoms_decoding() -> None:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [
        [3, b"\x01" + b"cmd"],
        [3, b"\x02" + bytes(range(256)) * 9],
    ]
    encoded = bytearray(P_DATA_TF(primitive).encode())
    dul = _FakeDul()
    pdu, event = fastpath._decode_pdu(dul, dul.decode_any, encoded)
    expected, expected_event = DULServiceProvider._decode_pdu(dul, bytes(encoded))  # type: ignore[arg-type]
    assert dul.fallback_calls == 0 and event == expected_event == "Evt10"
    ours = [(cx, bytes(data)) for cx, data in pdu.to_primitive().presentation_data_value_list]
    assert ours == [
        (cx, bytes(data)) for cx, data in expected.to_primitive().presentation_data_value_list
    ]
    release = bytearray(A_RELEASE_RQ().encode())
    assert fastpath._decode_pdu(dul, dul.decode_any, release)[1] == "Evt12"
    assert dul.fallback_calls == 1


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[scp.Receiver]:
    settings = Settings(
        node=NodeSettings(bind="127.0.0.1", dicom_port=free_port(), data_dir=tmp_path),
        storage=StorageSettings(reserve_mb=0),
    )
    spool = Spool(tmp_path, reserve_bytes=0)
    spool.prepare()
    with index_database(tmp_path / "index.sqlite3") as url:
        ingest = Ingest(spool, open_database(url))
        receiver = scp.Receiver(settings, ingest)
        receiver.start()
        yield receiver
        receiver.stop(drain_timeout_s=2)
        ingest.close()


def _associate(port: int) -> Any:
    ae = AE(ae_title="PERFSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    return assoc


def test_a_real_association_stores_answers_and_ends_promptly(receiver: scp.Receiver) -> None:
    assert receiver.server is not None
    port = receiver.server.server_address[1]
    good = dcmread(real_file("CT_small.dcm"))
    bad = dcmread(real_file("CT_small.dcm"))
    del bad.StudyInstanceUID
    assoc = _associate(port)
    try:
        (server_side,) = receiver.server.active_associations
        assert isinstance(server_side._reactor_checkpoint, fastpath._Checkpoint)
        time.sleep(0.3)  # idle: nothing may be lost or delayed by the event-driven wait
        started = time.monotonic()
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(good).Status == 0
        assert time.monotonic() - started < 1.0
        refused = assoc.send_c_store(bad, msg_id=7)
        assert refused.Status == StoreStatus.MISSING_UID
        assert refused.ErrorComment == "Missing StudyInstanceUID"
        assert assoc.send_c_store(good).Status == 0  # a duplicate, counted
    finally:
        started = time.monotonic()
        assoc.release()
    assert assoc.is_released and time.monotonic() - started < 1.0
    deadline = time.monotonic() + 2
    while receiver.active_associations() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.active_associations() == 0


def _wait_no_associations(receiver: scp.Receiver, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while receiver.active_associations() and time.monotonic() < deadline:
        time.sleep(0.01)
    return receiver.active_associations() == 0


def test_rejected_and_aborted_associations_end_promptly(receiver: scp.Receiver) -> None:
    assert receiver.server is not None
    port = receiver.server.server_address[1]
    ae = AE(ae_title="PERFSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    rejected = ae.associate("127.0.0.1", port, ae_title="NOTUS")
    assert rejected.is_rejected
    assert _wait_no_associations(receiver)  # not left waiting for the ARTIM timer
    aborted = _associate(port)
    assert aborted.send_c_echo().Status == 0
    aborted.abort()
    assert _wait_no_associations(receiver)


class _CountingTime:
    """``time`` that counts the acceptor reactor's naps and lets every sleep through."""

    def __init__(self) -> None:
        self.napping: set[threading.Thread] = set()

    def sleep(self, seconds: float) -> None:
        if sys._getframe(2).f_code is fastpath._REACTOR_CODE:  # past _ReactorTime.sleep
            self.napping.add(threading.current_thread())
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_event_driven_reactors_skip_the_nap_and_nothing_else_does(
    receiver: scp.Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynetdicom.association as association_module

    counting = _CountingTime()
    monkeypatch.setattr(association_module, "time", fastpath._ReactorTime(counting))
    assert receiver.server is not None
    good = dcmread(real_file("CT_small.dcm"))
    assoc = _associate(receiver.server.server_address[1])
    try:
        (acceptor,) = receiver.server.active_associations
        for message_id in range(1, 11):
            assert assoc.send_c_store(good, msg_id=message_id).Status == 0
    finally:
        assoc.release()
    assert assoc.is_released
    wait_for(lambda: receiver.active_associations() == 0, 30, "the acceptor to end")
    # The requestor's reactor (pynetdicom's own, in this process) napped as it always does;
    # the event-driven acceptor's reactor did not.
    assert assoc in counting.napping and acceptor not in counting.napping
    # Called from anywhere but the reactor's loop, even on its thread, a sleep goes through.
    slept: list[float] = []
    fastpath._ReactorTime(SimpleNamespace(sleep=slept.append)).sleep(0.05)
    assert slept == [0.05]


def _pdu_streams() -> list[bytes]:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[1, b"\x02" + bytes(range(256)) * 40]]
    p_data = P_DATA_TF(primitive).encode()
    return [
        p_data,
        A_RELEASE_RQ().encode(),
        b"\x09\x00\x00\x00\x00\x04abcd",  # unknown PDU type
        p_data[: len(p_data) // 2],  # the peer closes inside the PDU
        p_data[:4],  # ... inside its header
        struct.pack(">BBL", 4, 0, fastpath.MAX_PDU_BYTES * 2),  # more than we advertised
        b"",
    ]


def _read_one_pdu(stream: bytes, ours: bool) -> tuple[list[str], list[Any]]:
    near, far = socket.socketpair()
    with near, far:
        far.sendall(stream)
        far.shutdown(socket.SHUT_WR)
        dul = Association(AE(), "acceptor").dul
        if ours:
            fastpath._read_pdu_data(dul, near)
        else:
            # pynetdicom's own socket reading too, so that ours is compared with all of it.
            plain = SimpleNamespace(socket=near)
            dul.socket = SimpleNamespace(recv=lambda n: AssociationSocket.recv(plain, n))  # type: ignore[assignment]
            DULServiceProvider._read_pdu_data(dul)
        events = list(dul.event_queue.queue)
        pdus = [
            [(cx, bytes(data)) for cx, data in pdu.to_primitive().presentation_data_value_list]
            if isinstance(pdu, P_DATA_TF)
            else type(pdu).__name__
            for pdu in dul._recv_pdu.queue
        ]
    return events, pdus


@pytest.mark.parametrize("index", range(len(_pdu_streams())))
def test_pdus_are_read_as_pynetdicom_reads_them(index: int) -> None:
    stream = _pdu_streams()[index]
    ours = _read_one_pdu(stream, ours=True)
    assert ours == _read_one_pdu(stream, ours=False)
    assert ours[0], "every read ends in an event"
