"""A PACS that accepts the connection and never answers holds only its own deliveries.

The node's embedded workers are two processes: one infers, one delivers in threads. A real
node sends a study's results to a stalled peer (a loopback socket that listens and never
speaks: the association request waits for its timeout) and to a real Orthanc. Orthanc gets
its SEG and SR while the stalled peer's first attempts are still waiting, and the next
study's model runs and its results reach Orthanc meanwhile: the stalled peer holds at most
``[delivery] max_per_peer`` of the delivery worker's threads. With one worker process for both
queues, or no limit per peer, they would wait out the stalled peer's timeout.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from tests.databases import read_rows
from tests.peers import NodeProcess, OrthancProcess, orthanc_as_peer, results_in, wait_for

pytestmark = pytest.mark.slow

STALLED_TIMEOUT_S = 90  # deliveries' timeouts: the window in which the checks run
SMALL = Geometry(rows=64, columns=64, pixel_spacing_mm=5.6, slices=24, slice_thickness_mm=5)


def test_a_stalled_pacs_holds_neither_the_other_destination_nor_inference(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        stalled = {
            "name": "stalled",
            "ae_title": "STALLED",
            "host": "127.0.0.1",
            "port": silent.getsockname()[1],
            "send": True,
            "receive": True,
        }
        orthanc = orthanc_factory(tmp_path / "orthanc").start()
        # The stalled peer first: its deliveries are on the queue ahead of Orthanc's.
        rule = f"""
[delivery]
timeout_s = {STALLED_TIMEOUT_S}
[[rules]]
name = "organs"
models = ["ct-organs-threshold"]
results_to = ["stalled", "orthanc"]
[rules.match]
Modality = "CT"
"""
        node = node_factory(
            tmp_path / "node",
            peers=[stalled, orthanc_as_peer(orthanc)],
            ai_worker=True,
            extra_toml=rule,
        ).start()
        # One axial series each, no scout: one job per study.
        first, second = (
            write_chest_ct(
                tmp_path / name,
                SMALL,
                seed=seed,
                patient_id=f"P{seed}",
                accession=f"A{seed}",
                with_lung_series=False,
                with_scout=False,
            )
            for seed, name in ((1, "first"), (2, "second"))
        )
        assert first.study_instance_uid != second.study_instance_uid

        _send(node, tmp_path / "first")
        wait_for(
            lambda: _back(orthanc, first.study_instance_uid),
            180,
            "the first study's SEG and SR in Orthanc",
            interval=0.5,
        )
        waiting = _to_stalled(node)
        assert len(waiting) == 2, waiting  # the SEG and the SR, both still in their first try
        assert {(state, attempts) for _, _, state, attempts in waiting} == {("SENDING", 1)}
        (first_id,) = {study_id for _, study_id, _, _ in waiting}

        # The next study: its model runs, and its results reach Orthanc, while the stalled peer
        # still holds the first study's two ([delivery] max_per_peer) and its own two wait.
        _send(node, tmp_path / "second")
        wait_for(
            lambda: _back(orthanc, second.study_instance_uid),
            STALLED_TIMEOUT_S,
            "the second study's SEG and SR in Orthanc",
            interval=0.5,
        )
        rows = _to_stalled(node)
        assert len(rows) == 4, rows
        for _, study_id, state, attempts in rows:
            if study_id == first_id:
                assert (state, attempts) == ("SENDING", 1)
            else:
                assert (state, attempts) == ("PENDING", 0)  # put off, no attempt spent
    # The stalled peer gone: the connections in its backlog are reset, and the node stops
    # without waiting out the stalled attempts.
    node.stop()


def _send(node: NodeProcess, folder: Path) -> None:
    sent = node.cli("send", str(folder), "--to", f"{node.ae_title}@127.0.0.1:{node.port}")
    assert sent.returncode == 0, sent.stderr


def _back(orthanc: OrthancProcess, study_uid: str) -> bool:
    found = results_in(orthanc, study_uid)
    return len(found["SEG"]) == 1 and len(found["SR"]) == 1


def _to_stalled(node: NodeProcess) -> list[tuple[Any, ...]]:
    """(id, study id, state, attempts) of the deliveries to the stalled peer, read from the
    index directly: a CLI process every half second would compete with the workers."""
    sql = "SELECT id, study_id, state, attempts FROM deliveries WHERE peer = 'stalled'"
    return read_rows(node.index_url, sql)
