"""C-STORE requests assembled from their P-DATA without pydicom: the receiver's hot path.

For every message pynetdicom decodes the command set into a pydicom Dataset, converts each
element on its way into the primitive, and copies every data set fragment into a BytesIO:
~0.2 ms of Python per CT slice, a tenth of the receiver's. A C-STORE-RQ command set is a
handful of fixed elements, so :class:`StoreRequests` reads them itself and hands them to
pynetdicom's own primitive setters (same validation); the data set fragments stay views of
the received PDUs until one join at the end.

Anything else goes to pynetdicom unchanged: other messages, an element or a value that is
not plain (pydicom might read it differently or warn about it), fragments out of the usual
order, a handler bound to EVT_DIMSE_RECV, chunked data set mode. Where we had begun a
message, pynetdicom's state for it is rebuilt first, so it carries on as if it had done
the work. tests/test_store_request.py compares the primitives with pynetdicom's.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
# Command elements of a C-STORE-RQ (PS3.7 9.3.1.1), group 0000, implicit VR little endian.
_GROUP_LENGTH = 0x0000
_US_ELEMENTS = {
    0x0100: "CommandField",
    0x0110: "MessageID",
    0x0700: "Priority",
    0x0800: "CommandDataSetType",
    0x1031: "MoveOriginatorMessageID",
}
_UI_ELEMENTS = {0x0002: "AffectedSOPClassUID", 0x1000: "AffectedSOPInstanceUID"}
_AE_ELEMENT = 0x1030  # Move Originator Application Entity Title
# Fragments up to this size are copied as they come; larger ones are kept as views.
_KEEP_AS_VIEW = 64 * 1024
# Values pydicom converts without a warning and pynetdicom's setters take as they are.
_PLAIN_UID = re.compile(rb"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_PLAIN_AE = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the backslash


def parse_store_command(command: bytes) -> dict[str, int | str] | None:
    """The parameters of a C-STORE-RQ that carries a data set, as pynetdicom would set them.

    None for anything else, or for anything not plain: pynetdicom then decodes it itself.
    """
    values: dict[str, int | str] = {}
    offset, end, previous = 0, len(command), -1
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = struct.unpack_from("<HHI", command, offset)
        offset += 8
        if group != 0 or element <= previous or offset + length > end:
            return None
        previous = element
        value = command[offset : offset + length]
        offset += length
        if element == _GROUP_LENGTH:
            if length != 4:
                return None
        elif element in _US_ELEMENTS:
            if length != 2:
                return None
            values[_US_ELEMENTS[element]] = struct.unpack("<H", value)[0]
        elif element in _UI_ELEMENTS:
            # pydicom drops trailing NULs and spaces; an empty or odd value is its to judge.
            uid = value.rstrip(b"\0 ")
            if length > 64 or not _PLAIN_UID.fullmatch(uid):
                return None
            values[_UI_ELEMENTS[element]] = uid.decode("ascii")
        elif element == _AE_ELEMENT:
            title = value.strip(b" ")
            if length > 16 or not title or not _PLAIN_AE.fullmatch(value):
                return None
            values["MoveOriginatorApplicationEntityTitle"] = title.decode("ascii")
        else:
            return None
    if (
        values.get("CommandField") != _C_STORE_RQ
        or values.get("CommandDataSetType", _NO_DATA_SET) == _NO_DATA_SET
    ):
        return None
    return values


def store_primitive(values: dict[str, int | str]) -> C_STORE:
    """A C-STORE request primitive from :func:`parse_store_command`'s values."""
    primitive = C_STORE()
    for keyword, value in values.items():
        # CommandField and CommandDataSetType belong to the message, not the primitive.
        if hasattr(primitive, keyword):
            setattr(primitive, keyword, value)
    return primitive


@dataclass
class _Pending:
    """A C-STORE-RQ whose command set has arrived and whose data set is arriving."""

    context_id: int
    command: bytes
    request: C_STORE
    fragments: list[Any] = field(default_factory=list)

    def add(self, pdv: Any) -> None:
        """Keep a data set fragment (the PDV less its control byte)."""
        if len(pdv) > _KEEP_AS_VIEW:
            self.fragments.append(pdv[1:])  # a view of the received PDU: no copy yet
            return
        # Small ones are copied together: a view apiece would hold far more memory than
        # the bytes a peer sent in tiny fragments.
        if not self.fragments or not isinstance(self.fragments[-1], bytearray):
            self.fragments.append(bytearray())
        self.fragments[-1] += pdv[1:]


class StoreRequests:
    """Stands in for ``DIMSEServiceProvider.receive_primitive`` on one association."""

    def __init__(self, dimse: Any, receive_any: Callable[[P_DATA], None]) -> None:
        self.dimse = dimse
        self.receive_any = receive_any
        self.pending: _Pending | None = None

    def __call__(self, primitive: P_DATA) -> None:
        if self.pending is None and (self.dimse.message is not None or not self._allowed()):
            self.receive_any(primitive)
            return
        pdvs = primitive.presentation_data_value_list
        for index, (context_id, data) in enumerate(pdvs):
            if not data:
                self._hand_over(primitive, index)
                return
            control = data[0]
            if self.pending is None:
                # Only a whole command set in one fragment (control 0b11) starts ours.
                if control & 3 != 3 or not self._start(context_id, data):
                    self._hand_over(primitive, index)
                    return
            elif control & 1:
                # A command fragment in the middle of a data set: pynetdicom's to judge.
                self._hand_over(primitive, index)
                return
            else:
                self.pending.add(data)
                if control & 2:
                    self._finish()
                    # As pynetdicom's decoding does: the message is whole, the rest unread.
                    return

    def _allowed(self) -> bool:
        return not (
            _config.STORE_RECV_CHUNKED_DATASET or self.dimse.assoc.get_handlers(evt.EVT_DIMSE_RECV)
        )

    def _start(self, context_id: int, data: Any) -> bool:
        command = bytes(data[1:])
        values = parse_store_command(command)
        if values is None:
            return False
        try:
            request = store_primitive(values)
        except Exception:
            # pynetdicom raises the same from message_to_primitive once the data set is in,
            # and answers it its own way: leave the whole message to it.
            return False
        self.pending = _Pending(context_id, command, request)
        return True

    def _finish(self) -> None:
        pending = self.pending
        assert pending is not None
        self.pending = None
        fragments = pending.fragments
        data_set = b"".join(fragments)  # one copy, from one fragment or many
        request = pending.request
        # BytesIO over bytes shares them: getvalue() gives the same object back, uncopied.
        request.DataSet = BytesIO(data_set)
        request._context_id = pending.context_id
        request._dataset_path = None
        request._dataset_file = None
        self.dimse.msg_queue.put((pending.context_id, request))

    def _hand_over(self, primitive: P_DATA, index: int) -> None:
        """Give pynetdicom the PDVs from ``index`` on, with the state it would have built."""
        pending = self.pending
        if pending is not None:
            self.pending = None
            message = DIMSEMessage()
            message.encoded_command_set.write(pending.command)
            message.context_id = pending.context_id
            message.command_set = decode(message.encoded_command_set, True, True)
            message.__class__ = C_STORE_RQ
            data_set = message.data_set
            assert isinstance(data_set, BytesIO)  # a new message's is
            for fragment in pending.fragments:
                data_set.write(fragment)
            self.dimse.message = message
        if index == 0:
            self.receive_any(primitive)
            return
        rest = P_DATA()
        # Extended in place, as pynetdicom's PDU decoding fills it (its setter wants bytes).
        rest.presentation_data_value_list.extend(primitive.presentation_data_value_list[index:])
        self.receive_any(rest)
