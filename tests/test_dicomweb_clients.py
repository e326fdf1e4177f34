"""DICOMweb against real clients: the dicomweb-client package, and Orthanc's DICOMweb plugin.

Each test runs ``pacs-ai serve`` as a process and talks to it over HTTP on loopback.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread

from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from tests.databases import read_rows
from tests.peers import NodeProcess, OrthancProcess, orthanc_as_peer, pacs_and_node, wait_for
from tests.realdata import real_file

pytestmark = pytest.mark.slow


def client_for(node: NodeProcess, role: str = "integration", **token: str) -> DICOMwebClient:
    key = node.token(role, name=token.get("name", f"dicomweb-{role}"), peer=token.get("peer", ""))
    return DICOMwebClient(url=node.url + "/dicomweb", headers={"Authorization": f"Bearer {key}"})


def encoded(ds: pydicom.Dataset) -> bytes:
    """The bytes dicomweb-client puts in a STOW-RS part for ``ds``."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def first(item: dict[str, Any], tag: str) -> Any:
    return item[tag]["Value"][0]


def test_dicomweb_client_stores_searches_and_retrieves(
    node_factory: type[NodeProcess], tmp_path: Path
) -> None:
    node = node_factory(tmp_path / "node").start()
    client = client_for(node)
    phantom = write_chest_ct(
        tmp_path / "phantom", Geometry(rows=64, columns=64, slices=12), seed=4, patient_id="DWC-1"
    )
    datasets = [dcmread(p) for p in phantom.files]
    datasets.append(dcmread(real_file("US1_J2KR.dcm")))
    answer = client.store_instances(datasets)
    stored = {item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence}
    assert stored == {ds.SOPInstanceUID for ds in datasets}
    assert node.data_dir is not None
    for ds in datasets:
        held = node.data_dir / "studies" / ds.StudyInstanceUID / ds.SeriesInstanceUID
        assert (held / f"{ds.SOPInstanceUID}.dcm").read_bytes() == encoded(ds)

    (study,) = client.search_for_studies(search_filters={"PatientID": "DWC-1"})
    assert first(study, "0020000D") == phantom.study_instance_uid
    assert first(study, "00201208") == len(phantom.files)
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    by_name = client.search_for_studies(search_filters={"PatientName": "phantom*"}, limit=5)
    assert [first(s, "0020000D") for s in by_name] == [phantom.study_instance_uid]

    axial = phantom.series["AXIAL 1.25 SOFT TISSUE"]
    series = client.search_for_series(
        phantom.study_instance_uid, search_filters={"SeriesNumber": "2"}
    )
    assert [first(s, "0020000E") for s in series] == [axial]
    found = client.search_for_instances(
        phantom.study_instance_uid, axial, fields=["Rows"], limit=5, offset=2
    )
    assert [first(i, "00200013") for i in found] == [3, 4, 5, 6, 7]
    assert {first(i, "00280010") for i in found} == {64}

    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    one = datasets[5]
    got = client.retrieve_instance(one.StudyInstanceUID, one.SeriesInstanceUID, one.SOPInstanceUID)
    assert encoded(got) == encoded(one)
    whole = client.retrieve_series(phantom.study_instance_uid, axial)
    assert len(whole) == 12
    assert all(encoded(ds) == encoded(by_uid[ds.SOPInstanceUID]) for ds in whole)
    us = datasets[-1]
    (kept,) = client.retrieve_series(
        us.StudyInstanceUID,
        us.SeriesInstanceUID,
        media_types=(("application/dicom", "1.2.840.10008.1.2.4.90"),),
    )
    assert encoded(kept) == encoded(us)  # JPEG 2000 as stored, not transcoded
    metadata = client.retrieve_series_metadata(phantom.study_instance_uid, axial)
    assert sorted(first(m, "00080018") for m in metadata) == sorted(
        ds.SOPInstanceUID for ds in datasets if ds.SeriesInstanceUID == axial
    )
    assert all("7FE00010" not in m for m in metadata)


def test_orthanc_sends_a_study_by_stow_rs(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
) -> None:
    phantom = write_chest_ct(tmp_path / "phantom", Geometry(slices=24), seed=6)
    orthanc = orthanc_factory(tmp_path / "orthanc", dicomweb=True)
    node = node_factory(tmp_path / "node", peers=[orthanc_as_peer(orthanc)])
    token = node.token("integration", name="orthanc-stow", peer="orthanc")
    orthanc.extra_config["DicomWeb"] = {
        "Enable": True,
        "Servers": {
            "pacsai": {
                "Url": node.url + "/dicomweb/",
                "HttpHeaders": {"Authorization": f"Bearer {token}"},
            }
        },
    }
    pacs_and_node(orthanc, node)
    orthanc.upload(phantom.files)
    (study_id,) = orthanc.get("/studies")
    orthanc.post("/dicom-web/servers/pacsai/stow", {"Resources": [study_id]})

    def complete() -> bool:
        return [s["state"] for s in node.studies()] == ["COMPLETE"]

    wait_for(complete, 60, "the study sent by STOW-RS to complete", interval=0.5)
    (study,) = node.studies()
    assert study["study_instance_uid"] == phantom.study_instance_uid
    assert study["calling_ae"] == orthanc.ae_title  # the token stands for the Orthanc peer
    assert (study["series_count"], study["instance_count"]) == (3, len(phantom.files))
    for path in phantom.files:
        assert node.stored_path(path).read_bytes() == path.read_bytes()


def test_an_ai_result_appears_in_qido_and_wado(
    node_factory: type[NodeProcess],
    orthanc_factory: type[OrthancProcess],
    tmp_path: Path,
) -> None:
    from tests.test_ai_path import setup_pacs_and_node

    phantom = write_chest_ct(
        tmp_path / "phantom",
        Geometry(slices=24),
        seed=8,
        with_lung_series=False,
        with_scout=False,
    )
    orthanc, node = setup_pacs_and_node(node_factory, orthanc_factory, tmp_path)
    orthanc.upload(phantom.files)
    (study_id,) = orthanc.get("/studies")
    orthanc.post("/modalities/pacsai/store", {"Resources": [study_id], "Synchronous": True})

    def delivered() -> bool:
        return [j["state"] for j in node.cli_json("jobs", "list")] == ["DELIVERED"]

    wait_for(delivered, 240, "the AI job to deliver its results", interval=1)
    assert node.data_dir is not None
    # The job's outputs, as its deliveries name them (path relative to the data dir).
    made = {
        sop: (kind, path)
        for kind, path, sop in read_rows(
            node.index_url, "SELECT kind, payload, sop_instance_uid FROM deliveries"
        )
    }
    assert sorted(kind for kind, _ in made.values()) == ["SEG", "SR"]

    client = client_for(node, "radiologist")
    series = client.search_for_series(phantom.study_instance_uid)
    modalities = {first(s, "00080060"): first(s, "0020000E") for s in series}
    assert set(modalities) == {"CT", "SEG", "SR"}
    for modality in ("SEG", "SR"):
        (instance,) = client.search_for_instances(phantom.study_instance_uid, modalities[modality])
        sop = first(instance, "00080018")
        assert sop in made
        got = client.retrieve_instance(phantom.study_instance_uid, modalities[modality], sop)
        assert encoded(got) == (node.data_dir / made[sop][1]).read_bytes()
    (qido,) = client.search_for_studies(
        search_filters={"StudyInstanceUID": phantom.study_instance_uid}
    )
    assert first(qido, "00201208") == len(phantom.files) + 2
    assert qido["00080061"]["Value"] == ["CT", "SEG", "SR"]

    kinds = dict(read_rows(node.index_url, "SELECT sop_instance_uid, kind FROM instances"))
    assert {kinds[sop] for sop in made} == {"result"}
    assert sum(k == "source" for k in kinds.values()) == len(phantom.files)
    (study,) = node.studies()
    # The results did not reopen the study, nor count as received instances.
    assert (study["reopened"], study["completions"]) == (0, 1)
    assert study["instance_count"] == len(phantom.files)
