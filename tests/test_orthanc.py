"""A real PACS pushes a study to the node: Orthanc's REST /modalities/{name}/store."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_ai.phantoms.chest_ct import ChestTruth
from tests.peers import (
    NodeProcess,
    OrthancProcess,
    dcmtk,
    orthanc_as_peer,
    pacs_and_node,
    wait_for,
)
from tests.realdata import dataset_bytes

pytestmark = pytest.mark.slow


def test_orthanc_pushes_a_study_and_the_node_assembles_it(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
    chest_ct: ChestTruth,
) -> None:
    orthanc = orthanc_factory(tmp_path / "orthanc")
    # Only Orthanc, from its host, may send: the node's allow-list is on.
    node = node_factory(
        tmp_path / "node",
        peers=[orthanc_as_peer(orthanc)],
        extra_node={"require_known_peers": True},
        probe_ae="ORTHANC",
    )
    pacs_and_node(orthanc, node)

    orthanc.upload(chest_ct.files)
    (study_id,) = orthanc.get("/studies")
    job = orthanc.post("/modalities/pacsai/store", {"Resources": [study_id], "Synchronous": True})
    assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == 451

    def complete() -> bool:
        studies = node.studies()
        return len(studies) == 1 and studies[0]["state"] == "COMPLETE"

    wait_for(complete, 60, "the study to complete")
    (study,) = node.studies()
    assert study["study_instance_uid"] == chest_ct.study_instance_uid
    assert study["calling_ae"] == "ORTHANC"
    assert (study["series_count"], study["instance_count"], study["duplicates"]) == (3, 451, 0)

    # What the PACS held is what the node keeps: every data set, byte for byte.
    assert node.data_dir is not None
    for source in chest_ct.files[::25]:
        kept = node.stored_path(source)
        assert dataset_bytes(kept.read_bytes()) == dataset_bytes(source.read_bytes())

    # Pushing the study again is harmless: stored once, counted as duplicates.
    orthanc.post("/modalities/pacsai/store", {"Resources": [study_id], "Synchronous": True})
    (study,) = node.studies()
    assert (study["instance_count"], study["duplicates"]) == (451, 451)

    # A caller that is not a configured peer is rejected, not aborted.
    stranger = dcmtk("echoscu", "-aet", "STRANGER", "-aec", "PACSAI", "127.0.0.1", str(node.port))
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr
    # The node answers Orthanc's own C-ECHO.
    assert orthanc.post("/modalities/pacsai/echo", {}) == {}
