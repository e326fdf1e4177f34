"""Fuzzing the C-STORE path: mutated and truncated real DICOM files, wrong VRs, giant lengths,
bogus transfer syntaxes and deeply nested sequences.

In-process, every mutation goes through :class:`Ingest` (what a receiver does with the bytes
of a C-STORE); over the network, mutated data sets go to a running node. Nothing may raise,
hang or be acknowledged unless it is a readable instance; every refusal is quarantined with
its reason, and the node still answers C-ECHO afterwards.

The example count comes from ``PACS_AI_FUZZ_EXAMPLES`` (``make fuzz`` runs thousands).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_file_meta_info

from pacs_ai.dicom.header import read_header
from pacs_ai.dicom.status import StoreStatus
from pacs_ai.storage.db import open_database
from pacs_ai.storage.ingest import Ingest
from pacs_ai.storage.spool import Spool, is_valid_uid
from tests.databases import index_database
from tests.dicom_peer import association, store
from tests.peers import NodeProcess, echoscu_ok
from tests.realdata import real_file
from tests.web import bearer, web_client

EXAMPLES = int(os.environ.get("PACS_AI_FUZZ_EXAMPLES", "150"))
SOURCES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "test-SR.dcm")
BASES = {name: real_file(name).read_bytes() for name in SOURCES}
META_END = 132  # preamble + "DICM"


def _deep_sequence(depth: int) -> bytes:
    """A data set of ``depth`` nested sequences with undefined lengths, never closed."""
    sq = struct.pack("<HH", 0x0008, 0x1115) + b"SQ\x00\x00" + b"\xff\xff\xff\xff"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    return (sq + item) * depth


@dataclass(frozen=True)
class Mutation:
    """A mutated real file, described compactly (Hypothesis prints this, not the bytes)."""

    source: str
    kind: str
    edits: tuple[tuple[int, bytes], ...] = ()
    cut: int = -1
    tail: bytes = b""

    def bytes(self) -> bytes:
        data = bytearray(BASES[self.source])
        for pos, value in self.edits:
            data[pos : pos + len(value)] = value
        if self.cut >= 0:
            data = data[: self.cut]
        return bytes(data) + self.tail


@st.composite
def mutated(draw: st.DrawFn) -> Mutation:
    source = draw(st.sampled_from(SOURCES))
    data = BASES[source]
    kind = draw(st.sampled_from(["truncate", "flip", "giant", "vr", "syntax", "nest", "splice"]))
    if kind == "truncate":
        return Mutation(source, kind, cut=draw(st.integers(0, len(data) - 1)))
    if kind == "flip":
        edits = tuple(
            (draw(st.integers(META_END, len(data) - 1)), bytes([draw(st.integers(0, 255))]))
            for _ in range(draw(st.integers(1, 16)))
        )
        return Mutation(source, kind, edits)
    if kind == "giant":
        pos = draw(st.integers(META_END, len(data) - 4))
        size = draw(st.sampled_from([0xFFFFFFF0, 2**31, 2**30]))
        return Mutation(source, kind, ((pos, struct.pack("<I", size)),))
    if kind == "vr":
        found = [i for i in range(META_END, len(data) - 1) if data[i : i + 2] in (b"UI", b"US")]
        wrong = draw(st.sampled_from([b"SQ", b"OB", b"UN", b"ZZ", b"\x00\x00"]))
        return Mutation(source, kind, ((draw(st.sampled_from(found)), wrong),) if found else ())
    if kind == "syntax":
        for syntax in (b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2\x00"):
            pos = data.find(syntax)
            if pos > 0:
                bogus = draw(st.sampled_from([b"9.9.9.9.9.9.9.9.9\x00", b"1.2.840.10008.1.2.4."]))
                return Mutation(
                    source, kind, ((pos, bogus.ljust(len(syntax), b"\x00")[: len(syntax)]),)
                )
        return Mutation(source, kind)
    if kind == "nest":
        meta_length = struct.unpack_from("<I", data, 140)[0]
        depth = draw(st.integers(30, 400))
        return Mutation(source, kind, cut=144 + meta_length, tail=_deep_sequence(depth))
    # splice: the head of this file on the tail of another
    other = draw(st.sampled_from(SOURCES))
    cut = draw(st.integers(META_END, min(len(data), len(BASES[other])) - 1))
    return Mutation(source, f"splice:{other}", cut=cut, tail=BASES[other][cut:])


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ingest]:
    data_dir = tmp_path_factory.mktemp("fuzz")
    spool = Spool(data_dir, 0)
    spool.prepare(clean_tmp=True)
    with index_database(data_dir / "index.sqlite3") as url:
        ingest = Ingest(spool, open_database(url))
        yield ingest
        ingest.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=mutated())
def test_ingest_answers_every_mutation_and_quarantines_refusals(
    ingest: Ingest, mutation: Mutation
) -> None:
    data = mutation.bytes()
    before = ingest.spool.quarantine_count()
    outcome = ingest.store(data, "FUZZER")
    assert isinstance(outcome.status, StoreStatus)
    if outcome.status == StoreStatus.SUCCESS:
        # Acknowledged: it was a readable instance, and it is held.
        header = read_header(data)
        held = ingest.spool.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        assert ingest.spool.path_of(held).exists()
    else:
        assert outcome.status != StoreStatus.OUT_OF_RESOURCES
        assert ingest.spool.quarantine_count() == before + 1
        newest = max(ingest.spool.quarantine_dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        assert json.loads(newest.read_text())["reason"]


@pytest.fixture(scope="module")
def live_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path_factory.mktemp("fuzz-node")).start()
    yield node
    node.stop()


@pytest.mark.slow
@settings(
    max_examples=max(20, EXAMPLES // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=mutated())
# Found by this test: a non-ASCII byte in the SOP Instance UID broke the C-STORE response.
@example(mutation=Mutation("CT_small.dcm", "flip", ((200, b"\x80"),)))
def test_mutated_data_sets_over_the_network_get_an_answer(
    live_node: NodeProcess, tmp_path_factory: pytest.TempPathFactory, mutation: Mutation
) -> None:
    """Mutated data sets behind a readable file meta, which pynetdicom sends as they are."""
    data = mutation.bytes()
    meta_length = struct.unpack_from("<I", data, 140)[0] if len(data) >= 144 else -1
    if data[128:132] != b"DICM" or meta_length < 0 or len(data) < 144 + meta_length:
        return  # no usable file meta: a DIMSE client could not send it at all
    path = tmp_path_factory.mktemp("m") / "mutated.dcm"
    path.write_bytes(data)
    try:
        meta = read_file_meta_info(path)
        uids = (meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    except Exception:  # any failure here is the client library's, before the node is involved
        return
    if not all(is_valid_uid(str(uid)) for uid in uids):
        return  # pynetdicom cannot even propose such a context
    assert live_node.data_dir is not None
    quarantine = live_node.data_dir / "quarantine"
    refused_before = len(list(quarantine.glob("*.json")))
    try:
        with association(live_node.port, [path], calling_ae="FUZZER") as assoc:
            status, _ = store(assoc, path)  # asserts that the node answered
    except (
        ValueError,
        KeyError,
        AttributeError,
        TypeError,
        NotImplementedError,
        InvalidDicomError,
        BytesLengthException,
    ):
        return  # pynetdicom itself refused the file before anything reached the node
    refused_now = len(list(quarantine.glob("*.json")))
    if status == StoreStatus.SUCCESS:
        assert refused_now == refused_before  # acknowledged, so kept, not quarantined
    else:
        assert refused_now == refused_before + 1, f"0x{status:04X} without a quarantine record"
    assert echoscu_ok(live_node.ae_title, live_node.port)


@pytest.fixture(scope="module")
def stow_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    with web_client(tmp_path_factory.mktemp("stow-fuzz")) as (client, ctx):
        yield client, bearer(ctx, "integration")


@settings(
    max_examples=max(30, EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(mutated(), min_size=1, max_size=4), broken=st.integers(0, 3))
def test_stow_answers_every_mutated_upload(
    stow_client: tuple[Any, dict[str, str]], mutations: list[Mutation], broken: int
) -> None:
    """Mutated files as STOW-RS parts, and a body cut short: a STOW answer, never a 500."""
    client, headers = stow_client
    boundary = "fuzzBOUNDARY"
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + m.bytes()
            + b"\r\n"
            for m in mutations
        )
        + f"--{boundary}--\r\n".encode()
    )
    if broken == 1:
        body = body[: len(body) // 2]  # the upload stops half-way
    response = client.post(
        "/dicomweb/studies",
        content=body,
        headers={
            **headers,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
    )
    assert response.status_code in (200, 202, 400, 409), response.text[:300]
    if response.status_code in (200, 202, 409):
        answer = response.json()
        referenced = answer.get("00081199", {}).get("Value", [])
        failed = answer.get("00081198", {}).get("Value", [])
        assert referenced or failed
