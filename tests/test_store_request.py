"""C-STORE requests assembled without pydicom give what pynetdicom's own assembly gives."""

from __future__ import annotations

import itertools
import struct
from io import BytesIO
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

from pacs_ai.dicom import fastpath
from pacs_ai.dicom.store_request import StoreRequests, parse_store_command

_PARAMETERS = (
    "MessageID",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "Priority",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
)


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _command(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _store_command(
    sop_class: bytes = b"1.2.840.10008.5.1.4.1.1.2\x00",
    sop_instance: bytes = b"1.2.826.0.1.3680043.8.498.1",
    message_id: int = 7,
    priority: int = 2,
    move_ae: bytes | None = None,
    move_id: int | None = None,
    data_set_type: int = 0x0001,
) -> bytes:
    elements = [
        _element(0x0002, sop_class),
        _element(0x0100, _us(0x0001)),
        _element(0x0110, _us(message_id)),
        _element(0x0700, _us(priority)),
        _element(0x0800, _us(data_set_type)),
        _element(0x1000, sop_instance),
    ]
    if move_ae is not None:
        elements.append(_element(0x1030, move_ae))
    if move_id is not None:
        elements.append(_element(0x1031, _us(move_id)))
    return _command(*elements)


def _pynetdicoms(encoded: bytes) -> C_STORE:
    message = C_STORE_RQ()
    message.encoded_command_set.write(encoded)
    message.command_set = decode(message.encoded_command_set, True, True)
    message.context_id = 1
    return message.message_to_primitive()


def _parameters(primitive: Any) -> dict[str, Any]:
    return {name: getattr(primitive, name, None) for name in _PARAMETERS}


@pytest.mark.parametrize(
    "command",
    [
        _store_command(),
        _store_command(sop_instance=b"1.2.3.4.5.6.7.8.9.1" + b"1" * 45),  # 64 characters
        _store_command(sop_class=b"1.2.840.10008.5.1.4.1.1.2 "),  # space padded
        _store_command(priority=0, message_id=65535),
        _store_command(move_ae=b"ORTHANC         ", move_id=3),
        _store_command(move_ae=b"  MOVER ", move_id=0),
        _store_command(data_set_type=0x0102),
    ],
    ids=["plain", "uid-64", "space-pad", "priority", "move", "move-spaces", "dataset-type"],
)
def test_command_read_as_pynetdicom_reads_it(command: bytes) -> None:
    values = parse_store_command(command)
    assert values is not None
    ours = C_STORE()
    for keyword, value in values.items():
        if hasattr(ours, keyword):
            setattr(ours, keyword, value)
    assert _parameters(ours) == _parameters(_pynetdicoms(command))


@pytest.mark.parametrize(
    "command",
    [
        _store_command(data_set_type=0x0101),  # no data set
        _store_command(sop_instance=b"1.2.03"),  # pydicom warns about a leading zero
        _store_command(sop_instance=b"1.2.3\\1.2.4"),  # two values
        _store_command(sop_instance=b""),
        _store_command(sop_instance=b"1" * 65),
        _store_command(move_ae=b"M\xc3\x96VER", move_id=1),
        _store_command(move_ae=b"A\\B", move_id=1),
        _store_command(move_ae=b"    ", move_id=1),
        _store_command()[:-3],  # truncated
        _command(_element(0x0100, _us(0x0030))),  # C-ECHO-RQ
        _store_command() + _element(0x0901, b"\x00\x10\x00\x10"),  # an element we don't read
        _command(_element(0x0100, _us(0x0001)), _element(0x0002, b"1.2")),  # out of order
    ],
    ids=[
        "no-data-set",
        "leading-zero",
        "multi-valued",
        "empty-uid",
        "long-uid",
        "non-ascii-ae",
        "backslash-ae",
        "blank-ae",
        "truncated",
        "echo",
        "unknown-element",
        "out-of-order",
    ],
)
def test_anything_not_plain_is_left_to_pynetdicom(command: bytes) -> None:
    assert parse_store_command(command) is None


# --- whole messages, fragment by fragment ------------------------------------------------------


def _association(fast: bool) -> Association:
    assoc = Association(AE(), "acceptor")
    for log_event, handler in fastpath._PYNETDICOM_LOG_HANDLERS:
        assoc.unbind(log_event, handler)
    if fast:
        dimse = assoc.dimse
        dimse.receive_primitive = StoreRequests(dimse, dimse.receive_primitive)  # type: ignore[method-assign]
    return assoc


def _p_data(*pdvs: tuple[int, bytes]) -> P_DATA:
    primitive = P_DATA()
    for context_id, data in pdvs:
        # As the PDU decoding leaves them: views of the received bytes.
        primitive.presentation_data_value_list.append([context_id, memoryview(data)])
    return primitive


def _feed(assoc: Association, primitives: list[list[tuple[int, bytes]]]) -> list[Any]:
    for pdvs in primitives:
        assoc.dimse.receive_primitive(_p_data(*pdvs))
    out = []
    while not assoc.dimse.msg_queue.empty():
        context_id, primitive = assoc.dimse.msg_queue.get_nowait()
        data_set = getattr(primitive, "DataSet", None)
        out.append(
            (
                context_id,
                type(primitive).__name__,
                _parameters(primitive),
                data_set.getvalue() if isinstance(data_set, BytesIO) else None,
            )
        )
    message = assoc.dimse.message
    if message is not None:
        assert isinstance(message.data_set, BytesIO)
        state = (type(message).__name__, message.context_id, message.data_set.getvalue())
        out.append(("in progress", *state, message.encoded_command_set.getvalue()))
    return out


def _same_as_pynetdicom(primitives: list[list[tuple[int, bytes]]]) -> list[Any]:
    expected = _feed(_association(fast=False), primitives)
    assert _feed(_association(fast=True), primitives) == expected
    return expected


def _fragments(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def _data_pdvs(data_set: bytes, cuts: list[int], context_id: int = 1) -> list[tuple[int, bytes]]:
    parts = _fragments(data_set, cuts)
    return [
        (context_id, (b"\x02" if i == len(parts) - 1 else b"\x00") + part)
        for i, part in enumerate(parts)
    ]


def test_a_store_in_separate_p_data_as_storescu_sends_it() -> None:
    data_set = bytes(range(256)) * 2048
    out = _same_as_pynetdicom(
        [[(1, b"\x03" + _store_command())], *[[pdv] for pdv in _data_pdvs(data_set, [4096, 9000])]]
    )
    assert [(o[0], o[1], o[3]) for o in out] == [(1, "C_STORE", data_set)]


def test_command_and_data_in_one_p_data_and_two_stores_in_a_row() -> None:
    first, second = b"\x08\x00\x16\x00" + b"a" * 98, b"b" * 5000
    out = _same_as_pynetdicom(
        [
            [(3, b"\x03" + _store_command(message_id=1)), *_data_pdvs(first, [])],
            [(3, b"\x03" + _store_command(message_id=2, move_ae=b"MOVER", move_id=9))],
            _data_pdvs(second, [100, 200]),
        ]
    )
    assert [(o[2]["MessageID"], o[3]) for o in out] == [(1, first), (2, second)]


def test_what_pynetdicom_must_judge_reaches_it_with_its_own_state() -> None:
    data_set = b"x" * 3000
    # A command fragment in the middle of a data set: pynetdicom takes over mid-message.
    _same_as_pynetdicom(
        [
            [(1, b"\x03" + _store_command()), (1, b"\x00" + data_set[:1000])],
            [(1, b"\x01" + _store_command(message_id=9)[:20])],
        ]
    )
    # A command set in two fragments, and an echo: pynetdicom from the start.
    command = _store_command()
    out = _same_as_pynetdicom(
        [
            [(1, b"\x01" + command[:30])],
            [(1, b"\x03" + command[30:])],
            _data_pdvs(data_set, [7]),
            [
                (
                    1,
                    b"\x03"
                    + _command(
                        _element(0x0100, _us(0x0030)),
                        _element(0x0110, _us(4)),
                        _element(0x0800, _us(0x0101)),
                    ),
                )
            ],
        ]
    )
    assert [o[1] for o in out] == ["C_STORE", "C_ECHO"]


def test_a_uid_pydicom_would_warn_about_is_assembled_by_pynetdicom() -> None:
    command = _store_command(sop_instance=b"1.2.03")
    out = _same_as_pynetdicom([[(1, b"\x03" + command)], _data_pdvs(b"y" * 10, [])])
    assert [(o[2]["AffectedSOPInstanceUID"], o[3]) for o in out] == [("1.2.03", b"y" * 10)]


@settings(max_examples=150, deadline=None)
@given(
    message_id=st.integers(0, 65535),
    priority=st.sampled_from([0, 1, 2]),
    move=st.booleans(),
    data_set=st.binary(min_size=1, max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    grouping=st.lists(st.integers(1, 3), max_size=8),
)
def test_any_fragmentation_gives_what_pynetdicom_gives(
    message_id: int,
    priority: int,
    move: bool,
    data_set: bytes,
    cuts: list[int],
    grouping: list[int],
) -> None:
    command = _store_command(
        message_id=message_id,
        priority=priority,
        move_ae=b"MOVER " if move else None,
        move_id=message_id if move else None,
    )
    pdvs = [(1, b"\x03" + command), *_data_pdvs(data_set, cuts)]
    primitives, at = [], 0
    for size in [*grouping, len(pdvs)]:
        if at >= len(pdvs):
            break
        primitives.append(pdvs[at : at + size])
        at += size
    out = _same_as_pynetdicom(primitives)
    assert [o[3] for o in out] == [data_set]


def test_a_dimse_listener_gets_pynetdicoms_own_path() -> None:
    assoc = _association(fast=True)
    heard: list[Any] = []
    assoc.bind(fastpath.evt.EVT_DIMSE_RECV, lambda event: heard.append(event.message))
    assoc.dimse.receive_primitive(_p_data((1, b"\x03" + _store_command())))
    receiver = assoc.dimse.receive_primitive
    assert isinstance(receiver, StoreRequests) and receiver.pending is None
    assoc.dimse.receive_primitive(_p_data((1, b"\x02" + b"data")))
    assert [type(message).__name__ for message in heard] == ["C_STORE_RQ"]
    assert assoc.dimse.msg_queue.get_nowait()[1].DataSet.getvalue() == b"data"


def test_what_follows_a_whole_message_in_the_same_p_data_is_left_unread() -> None:
    data_set = b"z" * 500
    out = _same_as_pynetdicom(
        [
            [
                (1, b"\x03" + _store_command()),
                *_data_pdvs(data_set, [100]),
                (1, b"\x02" + b"stray"),
                (1, b"\x03" + _store_command(message_id=8)),
            ],
        ]
    )
    assert [(o[2]["MessageID"], o[3]) for o in out] == [(7, data_set)]


def test_tiny_fragments_are_kept_together_not_one_view_each() -> None:
    assoc = _association(fast=True)
    receiver = assoc.dimse.receive_primitive
    assert isinstance(receiver, StoreRequests)
    tiny = [(1, b"\x00" + bytes([i % 256])) for i in range(5000)]
    big = (1, b"\x00" + b"B" * 100_000)
    assoc.dimse.receive_primitive(_p_data((1, b"\x03" + _store_command()), *tiny, big, *tiny))
    assert receiver.pending is not None and len(receiver.pending.fragments) == 3
    assoc.dimse.receive_primitive(_p_data((1, b"\x02" + b"end")))
    (_, request) = assoc.dimse.msg_queue.get_nowait()
    expected = bytes(i % 256 for i in range(5000))
    assert request.DataSet.getvalue() == expected + b"B" * 100_000 + expected + b"end"


def test_chunked_mode_gets_pynetdicoms_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[P_DATA] = []
    dimse = _association(fast=False).dimse
    receiver = StoreRequests(dimse, handed.append)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    primitive = _p_data((1, b"\x03" + _store_command()))
    receiver(primitive)
    assert handed == [primitive] and receiver.pending is None
