"""Plain routing end to end: forward rules send images on unchanged to real PACSs.

A modality sends a small three-series CT study to a real ``pacs-ai serve`` (dcmtk storescu);
its embedded worker forwards, with no model run, one matching series to one Orthanc and the
whole study to another. What each Orthanc holds is read back over its REST API and compared,
instance by instance, with the files the modality sent: nothing missing, nothing extra, and
every data set byte for byte the same (only the File Meta group, which the receiver writes
itself, may differ).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from pydicom import dcmread

from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from tests.databases import read_rows
from tests.peers import NodeProcess, OrthancProcess, orthanc_as_peer, send_as, wait_for

pytestmark = pytest.mark.slow

# Small enough to send in a second or two, yet several instances per series: a scout (1),
# a soft-tissue series (20) and a lung series (10).
SMALL = Geometry(rows=64, columns=64, pixel_spacing_mm=6.0, slices=20, slice_thickness_mm=5.0)

RULES = """
[[rules]]
name = "lung-series"
forward = ["lung-pacs"]
forward_level = "series"
[rules.match]
Modality = "CT"
SeriesDescription = { regex = "LUNG" }

[[rules]]
name = "archive-study"
forward = ["archive"]
forward_level = "study"
[rules.match]
ImageType = { contains = "LOCALIZER" }
"""
"""Only the lung series goes to ``lung-pacs``; the scout alone matches ``archive-study``,
whose forward still takes every series of the study."""


def data_set_bytes(part10: bytes) -> bytes:
    """The encoded data set of a Part 10 file: what follows the File Meta group.

    The File Meta group (0002) starts after the 128-byte preamble and "DICM" with its group
    length (0002,0000), always explicit VR little endian (PS3.10 7.1).
    """
    assert part10[128:132] == b"DICM", "not a Part 10 file"
    tag, vr, length = struct.unpack_from("<4s2sH", part10, 132)
    assert (tag, vr, length) == (b"\x02\x00\x00\x00", b"UL", 4), "no File Meta group length"
    (group_length,) = struct.unpack_from("<I", part10, 140)
    return part10[144 + group_length :]


def held_by(orthanc: OrthancProcess) -> dict[str, bytes]:
    """Every instance Orthanc holds, as SOP Instance UID -> the stored Part 10 file."""
    found: dict[str, bytes] = {}
    for instance in orthanc.get("/instances"):
        raw = orthanc.get_bytes(f"/instances/{instance}/file")
        uid = str(dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID)
        assert uid not in found, f"{uid} stored twice"
        found[uid] = raw
    return found


def assert_arrived_unchanged(
    orthanc: OrthancProcess, sent: dict[str, Path], expected: set[str]
) -> None:
    held = held_by(orthanc)
    assert set(held) == expected, (
        f"{orthanc.ae_title}: {len(expected - set(held))} missing, "
        f"{len(set(held) - expected)} not forwarded there"
    )
    for uid, raw in held.items():
        source = sent[uid].read_bytes()
        stored, original = dcmread(io.BytesIO(raw)), dcmread(io.BytesIO(source))
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, uid
        # Element by element first, for a readable failure; then the encoding itself.
        assert [e.tag for e in stored] == [e.tag for e in original], uid
        for element in original:
            assert stored[element.tag] == element, (uid, element.keyword or element.tag)
        assert data_set_bytes(raw) == data_set_bytes(source), uid


@pytest.fixture
def study(tmp_path: Path) -> ChestTruth:
    return write_chest_ct(tmp_path / "study", SMALL, seed=11)


def test_forward_rules_send_the_matching_series_and_the_whole_study_unchanged(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
    study: ChestTruth,
) -> None:
    # Ports are picked when the peers are made: the node can start first, and its workers
    # boot (the slow part) while the two Orthancs start.
    lung_pacs = orthanc_factory(tmp_path / "lung-pacs", ae_title="LUNGPACS")
    archive = orthanc_factory(tmp_path / "archive", ae_title="ARCHIVE")
    node = node_factory(
        tmp_path / "node",
        peers=[
            {**orthanc_as_peer(lung_pacs), "name": "lung-pacs", "send": False},
            {**orthanc_as_peer(archive), "name": "archive", "send": False},
        ],
        ai_worker=True,
        extra_toml=RULES,
        # Longer than a loaded machine pauses between two instances of the one association,
        # so the study completes (and is forwarded) once; it costs nothing, as the embedded
        # worker takes longer than this to start.
        quiet_period_s=3.0,
    ).start()
    lung_pacs.start()
    archive.start()

    send_as(node, "MODALITY", study.files)

    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in study.files}
    lung_uid = study.series["AXIAL 2.5 LUNG"]
    lung = {
        uid
        for uid, f in sent.items()
        if dcmread(f, stop_before_pixels=True).SeriesInstanceUID == lung_uid
    }
    assert len(sent) == 31 and len(lung) == 10  # the study is what this test means it to be

    # Polled in the index (a CLI per poll would compete with the worker for the CPU).
    def states() -> list[str]:
        return [str(r[0]) for r in read_rows(node.index_url, "SELECT state FROM deliveries")]

    # Generous: on a loaded machine the embedded worker alone can take half a minute to start.
    try:
        wait_for(lambda: states() == ["DONE", "DONE"], 120, "both forwards DONE", interval=0.5)
    except TimeoutError:
        raise AssertionError(f"deliveries: {states()}\n{node.log.read_text()}") from None
    deliveries = {
        (r["peer"], r["kind"], r["payload"], r["job_id"], r["state"])
        for r in node.cli_json("deliveries", "list")
    }
    assert deliveries == {
        ("lung-pacs", "SERIES", lung_uid, None, "DONE"),
        ("archive", "STUDY", study.study_instance_uid, None, "DONE"),
    }
    assert read_rows(node.index_url, "SELECT id FROM jobs") == []  # plain routing: no model

    assert_arrived_unchanged(lung_pacs, sent, lung)
    assert_arrived_unchanged(archive, sent, set(sent))
