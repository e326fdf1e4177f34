"""Soak: the fault tests of the suite at larger counts, with the figures the README reports.

1. Ingest under SIGKILL: a modality pushes a 500-image series over 4 associations; the
   whole node (receivers included) is killed mid-way, restarted, and the modality sends again
   what was not acknowledged. Repeated ``--cycles`` times. Counted: instances acknowledged,
   acknowledged but missing or unreadable afterwards (must be 0), half-written files visible
   under a final name (must be 0), and whether each study completed whole.
2. Inference under worker kills: ``--studies`` small CT studies go through the AI path to a
   real Orthanc while the worker process running a job is SIGKILLed ``--kills`` times.
   Counted: jobs not DELIVERED in the end (lost, must be 0) and SEG/SR objects beyond one
   each per job in Orthanc (duplicates, must be 0).

Fuzzing at volume is ``make fuzz`` (tests/test_fuzz.py with thousands of examples).
Run: ``.venv/bin/python bench/soak.py [--cycles 10] [--studies 6] [--kills 3]``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread

from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from tests.dicom_peer import send_until_refused
from tests.peers import (
    NodeProcess,
    OrthancProcess,
    kill_tree,
    orthanc_as_peer,
    pacs_and_node,
    results_in,
    running_job_worker,
    send_as,
    wait_for,
)


def ingest_cycles(root: Path, cycles: int, rng: random.Random) -> dict[str, int]:
    series = write_chest_ct(
        root / "series",
        Geometry(rows=256, columns=256, pixel_spacing_mm=1.4, slices=500, slice_thickness_mm=0.7),
        with_lung_series=False,
        with_scout=False,
    )
    files = sorted(series.files)
    totals = {"cycles": 0, "acked": 0, "missing": 0, "unreadable": 0, "half_files": 0}
    totals["complete_studies"] = 0
    for cycle in range(cycles):
        node = NodeProcess(root / f"node{cycle}", receivers=2, extra_node={"drain_timeout_s": 0})
        node.start()
        acked: list[Path] = []
        lock = threading.Lock()
        senders = [
            threading.Thread(target=send_until_refused, args=(node.port, files[k::4], acked, lock))
            for k in range(4)
        ]
        for sender in senders:
            sender.start()
        target = rng.randint(50, 400)
        wait_for(lambda: len(acked) >= target, 120, f"{target} acknowledged")  # noqa: B023
        assert node.process is not None
        kill_tree(node.process.pid)
        node.process.wait(30)
        for sender in senders:
            sender.join(120)
        node.stop()
        with lock:
            done = list(acked)
        totals["cycles"] += 1
        totals["acked"] += len(done)
        for path in done:
            kept = node.stored_path(path)
            if not kept.exists():
                totals["missing"] += 1
                continue
            try:
                dcmread(kept)
            except Exception:
                totals["unreadable"] += 1
        assert node.data_dir is not None
        for path in (node.data_dir / "studies").rglob("*.dcm"):
            try:
                dcmread(path)
            except Exception:
                totals["half_files"] += 1
        node.start()
        # The modality sends again what was not acknowledged, as a real one retries.
        held = set(done)
        for _ in range(3):
            rest = [f for f in files if f not in held]
            again: list[Path] = []
            send_until_refused(node.port, rest, again, lock)
            held.update(again)
            if len(held) == len(files):
                break

        def whole(node: NodeProcess = node) -> bool:
            (study,) = node.studies()
            return bool(study["state"] == "COMPLETE" and study["instance_count"] == len(files))

        try:
            wait_for(whole, 60, "the study complete with every instance")
            totals["complete_studies"] += 1
        except TimeoutError:
            print(f"  cycle {cycle + 1}: incomplete: {node.studies()}, resent {len(held)}")
        finally:
            node.stop()
        print(f"  cycle {cycle + 1}: {len(done)} acknowledged before the kill")
    return totals


def job_kills(root: Path, studies: int, kills: int) -> dict[str, int]:
    orthanc = OrthancProcess(root / "orthanc")
    node = NodeProcess(
        root / "node-ai",
        peers=[orthanc_as_peer(orthanc)],
        ai_worker=True,
        extra_worker={"lease_s": 3, "reconcile_interval_s": 0.5},
    )
    pacs_and_node(orthanc, node)
    # Big enough that a job runs for a few seconds, so there is a worker to kill mid-job.
    geometry = Geometry(
        rows=256, columns=256, pixel_spacing_mm=1.4, slices=80, slice_thickness_mm=2
    )
    made = [
        write_chest_ct(
            root / f"study{i}", geometry, seed=100 + i, patient_id=f"SOAK-{i}",
            with_lung_series=False, with_scout=False,
        )
        for i in range(studies)
    ]  # fmt: skip
    killed = 0
    sender = threading.Thread(
        target=lambda: [send_as(node, orthanc.ae_title, study.files) for study in made]
    )
    try:
        sender.start()
        deadline = time.monotonic() + 600
        while killed < kills and time.monotonic() < deadline:
            running = running_job_worker(node)
            if running is None:
                jobs = node.cli_json("jobs", "list")
                if len(jobs) == studies and all(j["state"] == "DELIVERED" for j in jobs):
                    break
                time.sleep(0.05)
                continue
            try:
                os.kill(running[1], signal.SIGKILL)
            except ProcessLookupError:
                continue  # the job ended just before
            killed += 1
            time.sleep(1)

        def settled() -> bool:
            states = [j["state"] for j in node.cli_json("jobs", "list")]
            return len(states) == studies and all(s in ("DELIVERED", "FAILED") for s in states)

        sender.join()
        wait_for(settled, 900, "every job settled", interval=2)
        jobs = node.cli_json("jobs", "list")
        duplicates = 0
        missing = 0
        for study in made:
            found = results_in(orthanc, study.study_instance_uid)
            duplicates += max(0, len(found["SEG"]) - 1) + max(0, len(found["SR"]) - 1)
            missing += (len(found["SEG"]) == 0) + (len(found["SR"]) == 0)
        return {
            "studies": studies,
            "worker_kills": killed,
            "jobs": len(jobs),
            "jobs_lost": sum(j["state"] != "DELIVERED" for j in jobs),
            "results_missing": missing,
            "duplicates": duplicates,
        }
    finally:
        node.stop()
        orthanc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="pacs-ai-soak-") as tmp:
        root = Path(tmp)
        print(f"ingest under SIGKILL, {args.cycles} cycles of 500 images over 4 associations:")
        ingest = ingest_cycles(root / "ingest", args.cycles, rng)
        print(f"inference under worker kills, {args.studies} studies:")
        jobs = job_kills(root / "jobs", args.studies, args.kills)
    print("\nresults")
    for key, value in {**ingest, **jobs}.items():
        print(f"  {key:<18} {value}")
    bad = ingest["missing"] + ingest["unreadable"] + ingest["half_files"] + jobs["jobs_lost"]
    bad += jobs["duplicates"] + jobs["results_missing"]
    bad += ingest["cycles"] - ingest["complete_studies"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
