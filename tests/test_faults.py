"""Faults the node must survive, with real processes: a broker that loses everything, a
destination PACS that is down for a while or for good, and peers that stall, flood or
never release.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from tests.peers import (
    DCMTK,
    TOOL_ENV,
    NodeProcess,
    OrthancProcess,
    RedisServer,
    echoscu_ok,
    free_port,
    kill_tree,
    orthanc_as_peer,
    results_in,
    running_job_worker,
    send_as,
    wait_for,
)

pytestmark = pytest.mark.slow

SMALL_CT = Geometry(rows=128, columns=128, pixel_spacing_mm=2.8, slices=24, slice_thickness_mm=5)
BUSY_CT = Geometry(rows=256, columns=256, pixel_spacing_mm=1.4, slices=80, slice_thickness_mm=2)


def small_study(folder: Path, seed: int) -> ChestTruth:
    return write_chest_ct(
        folder,
        SMALL_CT,
        seed=seed,
        patient_id=f"FAULT-{seed}",
        accession=f"F{seed:04d}",
        with_lung_series=False,
        with_scout=False,
    )


def jobs_by_state(node: NodeProcess) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in node.cli_json("jobs", "list"):
        counts[job["state"]] = counts.get(job["state"], 0) + 1
    return counts


# --- the broker loses everything -------------------------------------------------------------


def test_redis_lost_mid_run_loses_no_job_and_doubles_none(
    tmp_path: Path, orthanc_factory: type[OrthancProcess]
) -> None:
    redis = RedisServer(free_port())
    redis.start()
    orthanc = orthanc_factory(tmp_path / "orthanc").start()
    node = NodeProcess(
        tmp_path / "node",
        peers=[orthanc_as_peer(orthanc)],
        ai_worker=True,
        # A QUEUED job whose message is gone is sent again after 5 s.
        extra_worker={"requeue_after_s": 5, "lease_s": 6},
        extra_toml=f'[broker]\nurl = "{redis.url}"\n',
    )
    # Big enough that one job runs for seconds while the others wait as messages in Redis.
    studies = [
        write_chest_ct(
            tmp_path / f"study{i}", BUSY_CT, seed=i, patient_id=f"REDIS-{i}",
            with_lung_series=False, with_scout=False,
        )
        for i in range(3)
    ]  # fmt: skip
    try:
        node.start()
        for study in studies:
            send_as(node, orthanc.ae_title, study.files)
        # Once the worker runs the first job, the other two wait as messages in Redis.
        wait_for(lambda: jobs_by_state(node).get("QUEUED", 0) >= 1, 120, "jobs on the queue")
        redis.kill()
        # Back, empty (no persistence): every queued message is gone. Not asserted here: the
        # node's reconciler may already be sending the jobs again.
        redis.start()

        def all_delivered() -> bool:
            return jobs_by_state(node) == {"DELIVERED": 3}

        wait_for(all_delivered, 300, "every job delivered after the broker loss", interval=2)
        # The jobs that waited in the lost Redis came back through the reconciler.
        assert "reconciler: re-enqueueing job" in node.log.read_text()
        for study in studies:
            found = results_in(orthanc, study.study_instance_uid)
            # Exactly one SEG and one SR per job, whatever ran twice.
            assert (len(found["SEG"]), len(found["SR"])) == (1, 1), study.study_instance_uid
    finally:
        node.stop()
        redis.kill()


# --- the destination is down ----------------------------------------------------------------


def test_destination_down_then_back_and_one_gone_for_good(
    tmp_path: Path, orthanc_factory: type[OrthancProcess]
) -> None:
    orthanc = orthanc_factory(tmp_path / "orthanc")  # configured, not started: down
    gone_port = free_port()
    gone = {
        "name": "gone",
        "ae_title": "GONE",
        "host": "127.0.0.1",
        "port": gone_port,
        "send": False,
        "receive": True,
    }
    node = NodeProcess(
        tmp_path / "node",
        peers=[orthanc_as_peer(orthanc), gone],
        ai_worker=True,
        extra_toml=(
            # Six attempts (1, 2, 4, 8, 16 s apart): the down PACS has half a minute to come
            # back before its deliveries would be given up, on a slow machine too.
            "[delivery]\nmax_attempts = 6\nbackoff_s = 1\ntimeout_s = 5\n"
            '[[rules]]\nname = "ct"\nmodels = ["ct-organs-threshold"]\n'
            'results_to = ["orthanc", "gone"]\n'
            'match = { Modality = "CT", NumberOfSeriesRelatedInstances = { min = 20 } }\n'
        ),
    )
    study = small_study(tmp_path / "study", seed=11)
    node.start()
    try:
        send_as(node, "MODALITY", study.files)

        def deliveries() -> list[dict[str, Any]]:
            return list(node.cli_json("deliveries", "list"))

        def orthanc_retried() -> bool:
            rows = [d for d in deliveries() if d["peer"] == "orthanc"]
            return len(rows) == 2 and all(d["attempts"] >= 2 for d in rows)

        wait_for(orthanc_retried, 180, "deliveries to the down PACS retried", interval=1)
        rows = [d for d in deliveries() if d["peer"] == "orthanc"]
        # Still being tried (a retry may be under way at this very moment), neither given up
        # nor done, and the reason is there for the admin.
        assert {d["state"] for d in rows} <= {"PENDING", "SENDING"}
        assert all("no association" in d["last_error"] for d in rows)

        orthanc.start()  # the PACS is back

        def orthanc_done() -> bool:
            return {d["state"] for d in deliveries() if d["peer"] == "orthanc"} == {"DONE"}

        wait_for(orthanc_done, 120, "deliveries done once the PACS is back", interval=1)
        found = results_in(orthanc, study.study_instance_uid)
        assert (len(found["SEG"]), len(found["SR"])) == (1, 1)

        def gone_failed() -> bool:
            return {d["state"] for d in deliveries() if d["peer"] == "gone"} == {"FAILED"}

        wait_for(gone_failed, 120, "deliveries to a dead peer FAILED", interval=1)
        failed = [d for d in deliveries() if d["peer"] == "gone"]
        assert all(d["attempts"] == 6 and "no association" in d["last_error"] for d in failed)
        (job,) = node.cli_json("jobs", "list")
        assert job["state"] == "ENCODED"  # visible: not every destination has it

        # The site fixes the peer and retries from the CLI.
        received = tmp_path / "gone-fixed"
        received.mkdir()
        storescp = subprocess.Popen(
            [str(DCMTK / "storescp"), "-aet", "GONE", "-od", str(received), str(gone_port)],
            env=TOOL_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: echoscu_ok("GONE", gone_port), 20, "storescp")
            for d in failed:
                retried = node.cli("deliveries", "retry", str(d["id"]))
                assert retried.returncode == 0, retried.stderr
            wait_for(lambda: len(list(received.iterdir())) == 2, 120, "retried deliveries")
            wait_for(
                lambda: node.cli_json("jobs", "list")[0]["state"] == "DELIVERED", 60, "delivered"
            )
        finally:
            storescp.terminate()
            storescp.wait(10)
    finally:
        node.stop()


# --- peers that stall, flood, or never release --------------------------------------------


def _associate(port: int, calling_ae: str) -> Any:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="PACSAI")


def test_stalled_flooding_and_unreleased_peers_do_not_starve_others(tmp_path: Path) -> None:
    node = NodeProcess(
        tmp_path / "node",
        extra_node={
            "max_associations": 6,
            "acse_timeout_s": 2,
            "dimse_timeout_s": 3,
            "network_timeout_s": 10,  # well past the flood loop on a slow machine
        },
    )
    node.start()
    held: list[Any] = []
    raw: list[socket.socket] = []
    try:
        # 1. Connects and never sends an A-ASSOCIATE-RQ.
        raw.append(socket.create_connection(("127.0.0.1", node.port)))
        # 2. Stalls inside a PDU: announces 1000 bytes of A-ASSOCIATE-RQ, sends 10.
        stalled = socket.create_connection(("127.0.0.1", node.port))
        stalled.sendall(struct.pack(">BBL", 0x01, 0, 1000) + bytes(10))
        raw.append(stalled)
        # The node still serves a well-behaved peer meanwhile.
        assert echoscu_ok(node.ae_title, node.port)

        # 3. Opens associations until refused, and never releases them.
        refused = 0
        for i in range(10):
            assoc = _associate(node.port, f"FLOOD{i}")
            if assoc.is_established:
                held.append(assoc)
            else:
                refused += 1
                assert assoc.is_rejected  # a proper A-ASSOCIATE-RJ, not a dropped connection
        assert refused >= 4 and len(held) <= 6

        # The stalled and idle ones are timed out (network/ACSE timeouts), which frees room.
        for sock in raw:
            sock.settimeout(30)
            dropped = sock.recv(4096)
            # Closed (b""), or told so first: A-ASSOCIATE-RJ (0x03) or A-ABORT (0x07).
            assert dropped == b"" or dropped[0] in (0x03, 0x07), dropped[:8]
        wait_for(lambda: not any(a.is_established for a in held), 30, "idle associations dropped")
        started = time.monotonic()
        assert echoscu_ok(node.ae_title, node.port)
        assert time.monotonic() - started < 5
        assert node.process is not None and node.process.poll() is None
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.abort()
        for sock in raw:
            sock.close()
        node.stop()


# --- the node dies, or is stopped, with AI work in flight ----------------------------------


def _ai_node(tmp_path: Path, orthanc: OrthancProcess, **delivery: Any) -> NodeProcess:
    settings = {"max_attempts": 20, "backoff_s": 1, "timeout_s": 5, **delivery}
    return NodeProcess(
        tmp_path / "node",
        peers=[orthanc_as_peer(orthanc)],
        ai_worker=True,
        extra_worker={"lease_s": 3, "reconcile_interval_s": 0.5},
        extra_toml="[delivery]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()),
    )


def test_node_killed_between_inference_and_delivery_delivers_once(
    tmp_path: Path, orthanc_factory: type[OrthancProcess]
) -> None:
    orthanc = orthanc_factory(tmp_path / "orthanc")  # down while the job is encoded
    node = _ai_node(tmp_path, orthanc)
    study = small_study(tmp_path / "study", seed=21)
    node.start()
    try:
        send_as(node, orthanc.ae_title, study.files)
        wait_for(lambda: jobs_by_state(node) == {"ENCODED": 1}, 180, "the job encoded")
        assert node.process is not None
        kill_tree(node.process.pid)  # results written, deliveries PENDING, nothing drains
        node.process.wait(30)
        node.stop()
        orthanc.start()
        node.start()
        wait_for(lambda: jobs_by_state(node) == {"DELIVERED": 1}, 180, "delivered after restart")
        (job,) = node.cli_json("jobs", "list")
        assert job["attempts"] == 1  # inference was not run again: the results were durable
        found = results_in(orthanc, study.study_instance_uid)
        assert (len(found["SEG"]), len(found["SR"])) == (1, 1)
    finally:
        node.stop()


def test_sigterm_with_a_job_running_loses_nothing(
    tmp_path: Path, orthanc_factory: type[OrthancProcess]
) -> None:
    orthanc = orthanc_factory(tmp_path / "orthanc").start()
    node = _ai_node(tmp_path, orthanc)
    # Big enough that the job is still running when the node is told to stop.
    study = write_chest_ct(tmp_path / "study", BUSY_CT, with_lung_series=False, with_scout=False)
    node.start()
    try:
        send_as(node, orthanc.ae_title, study.files)
        wait_for(lambda: running_job_worker(node) is not None, 180, "a RUNNING job", interval=0.05)
        assert node.stop(timeout=90) == 0  # SIGTERM: drained, a clean exit
        node.start()
        wait_for(lambda: jobs_by_state(node) == {"DELIVERED": 1}, 240, "the job delivered")
        found = results_in(orthanc, study.study_instance_uid)
        assert (len(found["SEG"]), len(found["SR"])) == (1, 1)
    finally:
        node.stop()
