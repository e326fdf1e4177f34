"""End-to-end latency of the AI path, stage by stage, for each built-in model.

A generated 300-slice 512×512 chest CT is sent by dcmtk ``storescu`` to a running
``pacs-ai serve`` (embedded Redis and worker); one rule runs the model under test and sends
the SEG and SR to a real Orthanc. The stages come from the node's own records (instance
``received_at``, study ``completed_at``, job ``enqueued_at`` / ``started_at`` / stage timings /
``finished_at``):

    receive     first C-STORE sent → last instance stored
    quiet       last instance → study COMPLETE (the configured quiet period, by design)
    dispatch    COMPLETE → job on the queue
    queue wait  on the queue → claimed by a worker
    warm-up     waiting for the worker's warm-up, when the job came while the worker started
    load        loading the model, when the worker's warm-up did not
    volume      reading the series and building the volume, or taking the one a worker
                built during the quiet period (``worker.prepare_mb``; that reading is printed
                apart, as "prepared", and is not part of the end-to-end time)
    inference   the model
    encode      SEG + SR
    delivery    encoded → last delivery DONE at Orthanc

"Node overhead" is everything but inference, as a share of the end-to-end time without the
quiet period (the issue's target: ≤ 25 %).

Moving the data takes time whatever receives and sends it, so each round also measures the
same transfers with dcmtk: the study sent by the same ``storescu`` command to ``storescp``
(no index, no fsync), and the node's SEG and SR, read from its data dir, sent by
``storescu`` to a fresh Orthanc. From these it prints the node's overhead beyond those
transfers, and the lowest overhead share any node could show next to this model's compute
on this machine: the transfers alone, as a share of transfers plus inference. dcmtk's times
run to ``storescu``'s exit (association release included), the node's receive only to its
last stored instance: if anything, the floors read a little high.

The study is sent once the node's embedded inference worker has finished its warm-up, as in
a node that runs before its studies arrive; a warm-up or a model load that a job still waits
for counts as overhead.

``--earlier N`` first sends N other studies of the same size, each waited for until its
results are delivered, and measures the study after them: a node that has been running for
a while, whose worker has done jobs before (``worker.retain_memory_mb`` keeps their memory).
The default, 0, measures a fresh node's first study. ``--prepare-mb 0`` turns the reading
in the quiet period off (each job reads its series itself), for a comparison.
Run: ``.venv/bin/python bench/latency.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from pacs_ai.storage.schema import SOURCE, WORKER_STAGES
from tests.databases import read_rows
from tests.peers import (
    TOOL_ENV,
    NodeProcess,
    OrthancProcess,
    echoscu_ok,
    orthanc_as_peer,
    pacs_and_node,
    wait_for,
)
from tests.ports import free_port

STAGES = (
    "receive",
    "quiet",
    "dispatch",
    "queue wait",
    "warm-up",
    "load",
    "volume",
    "inference",
    "encode",
    "delivery",
)

FLOORS = ("receive floor", "delivery floor")


def _node(
    workdir: Path, orthanc: OrthancProcess, model: str, quiet_s: float, prepare_mb: int | None
) -> NodeProcess:
    worker: dict[str, Any] = {"reconcile_interval_s": 1}
    if prepare_mb is not None:
        worker["prepare_mb"] = prepare_mb
    node = NodeProcess(
        workdir,
        quiet_period_s=quiet_s,
        receivers=0,
        peers=[orthanc_as_peer(orthanc)],
        ai_worker=True,
        extra_worker=worker,
        extra_toml=(
            f'[[rules]]\nname = "bench"\nmodels = ["{model}"]\nresults_to = ["orthanc"]\n'
            'match = { Modality = "CT", NumberOfSeriesRelatedInstances = { min = 20 } }\n'
        ),
    )
    return node


def _stages(node: NodeProcess, study_uid: str, sent_at: float) -> dict[str, float]:
    ((study_id, completed),) = read_rows(
        node.index_url,
        f"SELECT id, completed_at FROM studies WHERE study_instance_uid = '{study_uid}'",
    )
    # Source images only: the job's SEG and SR are indexed as instances of the study too, and
    # their received_at is when the worker stored them.
    last_received = read_rows(
        node.index_url,
        f"SELECT max(received_at) FROM instances WHERE kind = '{SOURCE}' AND study_id = {study_id}",
    )[0][0]
    enqueued, started, finished, timings = read_rows(
        node.index_url,
        "SELECT enqueued_at, started_at, finished_at, timings FROM jobs "
        f"WHERE study_id = {study_id}",
    )[0]
    t = json.loads(timings)
    encoded_at = started + sum(t[k] for k in WORKER_STAGES)
    return {
        "receive": last_received - sent_at,
        "quiet": completed - last_received,
        "dispatch": enqueued - completed,
        "queue wait": started - enqueued,
        "warm-up": t["warm-up"],
        "load": t["load"],
        "volume": t["volume"],
        "inference": t["inference"],
        "encode": t["encode"],
        "delivery": finished - encoded_at,
        "total": finished - sent_at,
        # Read during the quiet period, off the critical path (0: the job read the series).
        "prepared": t.get("prepared", 0.0),
    }


def _timed_storescu(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(["/usr/bin/storescu", *args], check=True, env=TOOL_ENV, capture_output=True)
    return time.perf_counter() - started


def _floors(work: Path, files: list[Path], results: list[Path]) -> dict[str, float]:
    """The same transfers with dcmtk: ``files`` to storescp as the node received them, and
    ``results`` to a fresh Orthanc as the node delivered them."""
    port = free_port()
    (work / "storescp").mkdir(parents=True)
    scp = subprocess.Popen(
        ["/usr/bin/storescp", "-od", str(work / "storescp"), str(port)],
        env=TOOL_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: echoscu_ok("STORESCP", port), 30, "storescp")
        receive = _timed_storescu(
            "-aet", "ORTHANC", "-aec", "STORESCP", "127.0.0.1", str(port), *map(str, files)
        )
    finally:
        scp.terminate()
        scp.wait(30)
    orthanc = OrthancProcess(work / "orthanc-floor").start()
    try:
        # The node delivers to an Orthanc that has run a while: one store first, untimed.
        _timed_storescu(
            "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port), str(files[0])
        )
        # -R: propose only the SOP classes of the files, one context each, as the node does.
        delivery = _timed_storescu(
            "-R", "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port),
            *map(str, results),
        )  # fmt: skip
    finally:
        orthanc.stop()
    return {"receive floor": receive, "delivery floor": delivery}


def _result_files(node: NodeProcess, study_uid: str) -> list[Path]:
    assert node.data_dir is not None
    rows = read_rows(
        node.index_url,
        "SELECT i.path FROM instances i JOIN studies s ON s.id = i.study_id "
        f"WHERE s.study_instance_uid = '{study_uid}' AND i.kind <> '{SOURCE}'",
    )
    return [node.data_dir / path for (path,) in rows]


def _send_and_wait(node: NodeProcess, study: ChestTruth, model: str) -> None:
    subprocess.run(
        ["/usr/bin/storescu", "-aet", "ORTHANC", "-aec", "PACSAI", "127.0.0.1", str(node.port),
         *map(str, study.files)],
        check=True,
        env=TOOL_ENV,
    )  # fmt: skip

    def delivered() -> bool:
        # Read the index, not `pacs-ai jobs list`: each CLI run costs ~0.5 s of CPU at
        # normal priority, taken from the worker (nice 10) on a small machine, and it
        # made every worker stage look up to three times slower.
        states = read_rows(
            node.index_url,
            "SELECT j.state FROM jobs j JOIN studies s ON s.id = j.study_id "
            f"WHERE s.study_instance_uid = '{study.study_instance_uid}'",
        )
        # No job yet while the study waits out its quiet period.
        return bool(states) and all(s in ("DELIVERED", "FAILED", "SKIPPED") for (s,) in states)

    wait_for(delivered, 900, f"{model} to deliver", interval=0.5)
    for job in node.cli_json("jobs", "list"):
        if job["state"] != "DELIVERED":
            raise RuntimeError(f"{model}: job ended {job['state']}: {job['reason']}")


def run_once(
    work: Path, studies: list[ChestTruth], model: str, quiet_s: float, prepare_mb: int | None
) -> dict[str, float]:
    """Send ``studies`` one after the other; the stages of the last."""
    orthanc = OrthancProcess(work / "orthanc")
    node = _node(work / "node", orthanc, model, quiet_s, prepare_mb)
    try:
        pacs_and_node(orthanc, node)
        # A node's worker starts long before its studies arrive; here the study would
        # otherwise race the embedded worker's start-up and warm-up.
        wait_for(lambda: b"warm-up done" in node.log.read_bytes(), 300, "the worker's warm-up")
        for study in studies:
            sent_at = time.time()
            _send_and_wait(node, study, model)
        last = studies[-1].study_instance_uid
        stages = _stages(node, last, sent_at)
        results = _result_files(node, last)
    finally:
        node.stop()
        orthanc.stop()
    return stages | _floors(work / "floors", studies[-1].files, results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quiet", type=float, default=2.0, help="quiet period, seconds")
    parser.add_argument("--models", default="ct-organs-threshold,lung-nodule-demo")
    parser.add_argument(
        "--earlier",
        type=int,
        default=0,
        help="studies the node processes before the one measured (0: a fresh node's first)",
    )
    parser.add_argument(
        "--prepare-mb",
        type=int,
        help="the worker's prepare_mb (default: the node's default; 0: no reading ahead)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from pacs_ai.models.registry import available

    models = [m for m in args.models.split(",") if m in available()]
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pacs-ai-latency-") as tmp:
        root = Path(tmp)
        studies = [
            write_chest_ct(
                root / f"study-{n}",
                Geometry(slices=args.slices),
                seed=n,
                accession=f"ACC{n:04d}",
                with_lung_series=False,
                with_scout=False,
            )
            for n in range(args.earlier + 1)
        ]
        for model in models:
            for round_no in range(args.rounds):
                stages = run_once(
                    root / f"{model}-{round_no}", studies, model, args.quiet, args.prepare_mb
                )
                results.setdefault(model, []).append(stages)
                print(
                    f"{model} round {round_no + 1}: total {stages['total']:.1f} s, "
                    f"inference {stages['inference']:.1f} s",
                    flush=True,
                )
    which = f"after {args.earlier} earlier studies" if args.earlier else "a fresh node's first"
    print(f"\n{args.slices}-slice 512x512 CT ({which}), median of {args.rounds} round(s), seconds:")
    header = f"{'stage':12}" + "".join(f"{m:>22}" for m in results)
    print(header)
    print("-" * len(header))
    medians = {
        m: {
            k: statistics.median(r[k] for r in runs)
            for k in (*STAGES, "total", "prepared", *FLOORS)
        }
        for m, runs in results.items()
    }
    for stage in (*STAGES, "total", "prepared"):
        print(f"{stage:12}" + "".join(f"{medians[m][stage]:22.2f}" for m in results))
    print("(prepared: the series read in the quiet period, not part of the total)")
    summary: dict[str, Any] = {}
    print("\nThe same transfers with dcmtk, in the same rounds (seconds):")
    for floor in FLOORS:
        print(f"{floor:15}" + "".join(f"{medians[m][floor]:19.2f}" for m in results))
    for model, med in medians.items():
        without_quiet = med["total"] - med["quiet"]
        overhead = (without_quiet - med["inference"]) / without_quiet
        transfers = med["receive floor"] + med["delivery floor"]
        beyond = (without_quiet - med["inference"] - transfers) / without_quiet
        lowest = transfers / (transfers + med["inference"])
        summary[model] = {
            "stages": med,
            "overhead_share": overhead,
            "overhead_beyond_transfers_share": beyond,
            "transfers_only_share": lowest,
        }
        verdict = "met" if overhead <= 0.25 else "NOT met"
        print(
            f"{model}: node overhead {overhead:.0%} of end-to-end time without the quiet "
            f"period (target <= 25 %: {verdict}); {beyond:.0%} beyond dcmtk's transfers; "
            f"the transfers alone would be {lowest:.0%}"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
