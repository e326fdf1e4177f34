"""Scale benchmark: studies per hour with 1, 2 and 4 inference worker processes.

What it measures
    One node (``pacs-ai serve``) whose own worker only delivers (``[worker] queues =
    ["send"]``), a Redis server on a free loopback port as the broker (``[broker] url``), and a
    real Orthanc as the PACS: it is the calling AE the studies arrive from and the destination
    the SEG and SR go back to. One rule runs one model (default ``ct-organs-threshold``, the
    classical CPU model) on every CT series of 20 slices or more.

    For each worker count N (``--workers 1,2,4``) the bench starts N separate
    ``pacs-ai worker --queues infer --concurrency 1`` processes and waits until each has built
    its context, then sends S studies (``--studies``, each one axial 512×512 CT series of
    ``--slices`` slices, so one job per study) all at once: one dcmtk ``storescu`` per study,
    with ``TCP_NODELAY=1``, calling as Orthanc. It waits until every job is DELIVERED and every
    delivery DONE, and takes from the node's own records

        wall        first study COMPLETE → last job DELIVERED (its last delivery DONE)
        studies/h   S / wall × 3600, and its ratio to N = 1 (ideal: N)

    The workers are stopped between rounds and every round sends fresh UIDs to the same node.
    Each worker gets ``OMP_NUM_THREADS`` (and MKL's, OpenBLAS's) = max(1, CPUs // N), so that
    N workers together get the machine's CPUs once, not N times over (while N ≤ CPUs).

    ``--remote``: the workers share no disk with the node. Each runs in a fresh temporary
    folder with a config that holds only the broker URL and worker settings, and gets
    ``PACS_AI_WORKER__NODE_URL`` and ``PACS_AI_WORKER__TOKEN`` (a ``worker`` token): it reads
    the series by WADO-RS and uploads its results through the node's HTTP API.

    ``--device cuda``: N counts GPU workers, worker i on ``cuda:(i mod GPUs)``; the default
    model is then ``lung-nodule-demo`` (a torch U-Net), since the threshold model never
    touches the GPU.

How to run
    ``.venv/bin/python bench/scale.py [--workers 1,2,4] [--studies 8] [--slices 150]
    [--device cpu|cuda] [--remote] [--model NAME] [--json out.json]``

    Needs dcmtk's ``storescu`` (``/usr/bin``), Orthanc (``/usr/sbin``) and ``redis-server``;
    only loopback is used. The defaults take a few minutes on a 2-core machine, where the
    workers also share the CPUs with the node, the senders and Orthanc: read its ratios as a
    smoke check, not as the scaling of a worker server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread

from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from pacs_ai.processes import stop_process
from pacs_ai.storage.schema import WORKER_STAGES
from tests.databases import read_rows
from tests.peers import (
    TOOL_ENV,
    NodeProcess,
    OrthancProcess,
    RedisServer,
    kill_tree,
    orthanc_as_peer,
    pacs_and_node,
    wait_for,
)

STORESCU = "/usr/bin/storescu"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WORKER_READY_S = 120.0
STOP_TIMEOUT_S = 60.0
DEFAULT_MODEL = {"cpu": "ct-organs-threshold", "cuda": "lung-nodule-demo"}
SETTLED = ("DELIVERED", "FAILED", "SKIPPED")


# --- machine ----------------------------------------------------------------------------------


def cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def machine() -> dict[str, Any]:
    return {
        "cpus": cpus(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- studies ----------------------------------------------------------------------------------


@dataclass
class Template:
    """One generated series and, per file, the UIDs to rewrite in it."""

    files: list[Path]
    shared_uids: list[str]  # study, series, frame of reference
    sop_uids: list[str]  # per file


def make_template(out: Path, slices: int) -> Template:
    truth = write_chest_ct(
        out, Geometry(slices=slices), with_lung_series=False, with_scout=False, patient_id="SCALE"
    )
    files = sorted(truth.files)
    first = dcmread(files[0], stop_before_pixels=True)
    shared = [first.StudyInstanceUID, first.SeriesInstanceUID, first.FrameOfReferenceUID]
    sops = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return Template(files, [str(u) for u in shared], sops)


def _same_length_uid(uid: str, rng: random.Random) -> str:
    root, _, last = uid.rpartition(".")
    if len(last) < 12:
        raise ValueError(f"UID {uid} has too short a last component to restamp safely")
    digits = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in last[1:])
    return f"{root}.{digits}"


def restamp(template: Template, out_dir: Path, rng: random.Random) -> str:
    """Copy the template series under fresh UIDs; return the new StudyInstanceUID.

    Regenerating 512×512 slices costs ~15 ms each; replacing the UID bytes with new UIDs of
    the same length keeps every element length (and the file meta group length) valid and
    costs a copy.
    """
    out_dir.mkdir(parents=True)
    shared = {old: _same_length_uid(old, rng) for old in template.shared_uids}
    for index, (path, sop) in enumerate(zip(template.files, template.sop_uids, strict=True)):
        data = path.read_bytes()
        for old, new in (*shared.items(), (sop, _same_length_uid(sop, rng))):
            data = data.replace(old.encode("ascii"), new.encode("ascii"))
        (out_dir / f"{index:05d}.dcm").write_bytes(data)
    return shared[template.shared_uids[0]]


# --- broker -----------------------------------------------------------------------------------


# --- the node ---------------------------------------------------------------------------------


def make_node(workdir: Path, orthanc: OrthancProcess, broker_url: str, model: str) -> NodeProcess:
    return NodeProcess(
        workdir,
        quiet_period_s=1.0,
        receivers=0,
        peers=[orthanc_as_peer(orthanc)],
        # The node's own worker only delivers: inference is left to the workers under test.
        ai_worker=True,
        extra_node={"log_level": "INFO"},
        extra_worker={"queues": ["send"], "reconcile_interval_s": 1},
        extra_toml=(
            f"[broker]\nurl = {json.dumps(broker_url)}\n"
            f'[[rules]]\nname = "scale"\nmodels = ["{model}"]\nresults_to = ["orthanc"]\n'
            'match = { Modality = "CT", NumberOfSeriesRelatedInstances = { min = 20 } }\n'
        ),
    )


def query(node: NodeProcess, sql: str) -> list[tuple[Any, ...]]:
    """Read the node's index directly: a CLI call per poll would cost the workers CPU."""
    return read_rows(node.index_url, sql)


def in_list(values: list[str] | list[int]) -> str:
    """A SQL ``IN`` list of the bench's own UIDs (digits and dots) or integer ids."""
    return ",".join(f"'{v}'" if isinstance(v, str) else str(int(v)) for v in values)


def worker_token(node: NodeProcess) -> str:
    result = node.cli("tokens", "create", "--role", "worker", "--name", "bench-scale-worker")
    if result.returncode != 0:
        raise SystemExit(
            "bench: `pacs-ai tokens create --role worker` failed, so --remote cannot run:\n"
            + (result.stderr or result.stdout)
        )
    return result.stdout.strip().splitlines()[-1]


# --- workers ----------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    node: NodeProcess
    broker_url: str
    device: str
    threads: int
    remote: bool
    token: str
    root: Path
    gpus: int = 0


class Worker:
    """One ``pacs-ai worker --queues infer --concurrency 1`` process."""

    def __init__(self, spec: WorkerSpec, index: int, round_no: int) -> None:
        self.spec = spec
        self.index = index
        self.workdir = spec.root / f"round{round_no}-worker{index}"
        self.workdir.mkdir(parents=True)
        self.log = self.workdir / "worker.log"
        self.process: subprocess.Popen[bytes] | None = None

    def device(self) -> str:
        if self.spec.device == "cuda":
            return f"cuda:{self.index % max(1, self.spec.gpus)}"
        return self.spec.device

    def env(self) -> dict[str, str]:
        # Nothing from the caller's PACS_AI_* may change what the bench configured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
        env.update({var: str(self.spec.threads) for var in THREAD_VARS})
        env["TCP_NODELAY"] = "1"
        if self.spec.remote:
            env["PACS_AI_WORKER__NODE_URL"] = self.spec.node.url
            env["PACS_AI_WORKER__TOKEN"] = self.spec.token
        return env

    def config(self) -> Path:
        if not self.spec.remote:
            return self.spec.node.config
        # Only the broker and the worker's settings: no data dir, database or peers of the
        # node's (the default data dir is ./pacs-ai-data inside this fresh folder).
        path = self.workdir / "pacs-ai.toml"
        path.write_text(
            "[node]\n"
            'log_level = "INFO"\n'
            "[broker]\n"
            f"url = {json.dumps(self.spec.broker_url)}\n"
            "[worker]\n"
            "embedded = false\n"
            'queues = ["infer"]\n'
            "concurrency = 1\n"
            f"device = {json.dumps(self.device())}\n"
        )
        return path

    def command(self, config: Path) -> list[str]:
        return [
            sys.executable, "-m", "pacs_ai", "worker", "--config", str(config),
            "--queues", "infer", "--concurrency", "1", "--device", self.device(),
        ]  # fmt: skip

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(self.config()),
                cwd=self.workdir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ready(self) -> bool:
        """Celery is consuming and the pool process has built its context (warm-up)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"worker {self.index} exited with {self.process.returncode}:\n{self.tail()}"
            )
        text = self.log.read_text(errors="replace")
        return " ready." in text and "worker context" in text

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        # Celery's warm shutdown; the round is over, so no task is in hand.
        stop_process(self.process, STOP_TIMEOUT_S, kill=lambda p: kill_tree(p.pid))
        self.process = None


# --- one round --------------------------------------------------------------------------------


@dataclass
class RoundResult:
    workers: int
    studies: int
    threads_per_worker: int
    wall_s: float
    studies_per_hour: float
    send_s: float
    job_s_median: float
    delivery_lag_s_median: float
    failed: int
    problem: str = ""


def send_studies(node: NodeProcess, caller: str, folders: list[Path], logdir: Path) -> float:
    """One storescu per study, all at once; return the seconds until the last one exited."""
    started = time.monotonic()
    procs = []
    for i, folder in enumerate(folders):
        with (logdir / f"storescu-{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [STORESCU, "+sd", "+r", "-aet", caller, "-aec", node.ae_title,
                     "127.0.0.1", str(node.port), str(folder)],
                    env=TOOL_ENV,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"storescu exit codes {codes}; see {logdir}/storescu-*.log")
    return time.monotonic() - started


def round_rows(node: NodeProcess, study_uids: list[str]) -> list[tuple[Any, ...]]:
    return query(
        node,
        "SELECT s.study_instance_uid, s.completed_at, j.id, j.state, j.reason, j.started_at,"
        " j.finished_at, j.timings"
        " FROM studies s LEFT JOIN jobs j ON j.study_id = s.id"
        f" WHERE s.study_instance_uid IN ({in_list(study_uids)})",
    )


def settled(node: NodeProcess, study_uids: list[str]) -> bool:
    rows = round_rows(node, study_uids)
    if len({r[0] for r in rows if r[2] is not None}) < len(study_uids):
        return False
    if not all(r[3] in SETTLED for r in rows):
        return False
    job_ids = [int(r[2]) for r in rows]
    open_deliveries = query(
        node,
        f"SELECT count(*) FROM deliveries WHERE job_id IN ({in_list(job_ids)}) AND state != 'DONE'",
    )[0][0]
    failed = any(r[3] != "DELIVERED" for r in rows)
    return bool(failed or open_deliveries == 0)


def run_round(
    node: NodeProcess,
    orthanc: OrthancProcess,
    template: Template,
    spec: WorkerSpec,
    n: int,
    studies: int,
    round_no: int,
    rng: random.Random,
    timeout_s: float,
) -> RoundResult:
    folders = [spec.root / f"round{round_no}-study{i}" for i in range(studies)]
    uids = [restamp(template, folder, rng) for folder in folders]
    workers = [Worker(spec, i, round_no) for i in range(n)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            try:
                wait_for(worker.ready, WORKER_READY_S, f"worker {worker.index} ready", 0.25)
            except TimeoutError:
                raise RuntimeError(f"worker {worker.index} not ready:\n{worker.tail()}") from None
        send_s = send_studies(node, orthanc.ae_title, folders, spec.root)
        wait_for(lambda: settled(node, uids), timeout_s, "every job delivered", 0.5)
    finally:
        for worker in workers:
            worker.stop()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    rows = round_rows(node, uids)
    bad = [r for r in rows if r[3] != "DELIVERED"]
    first_complete = min(r[1] for r in rows)
    last_delivered = max((r[6] for r in rows if r[6] is not None), default=first_complete)
    wall = last_delivered - first_complete
    job_s, lag_s = [], []
    for row in rows:
        if row[3] != "DELIVERED":
            continue
        t = json.loads(row[7])
        encoded_at = row[5] + sum(t[k] for k in WORKER_STAGES)
        job_s.append(encoded_at - row[5])
        lag_s.append(row[6] - encoded_at)
    return RoundResult(
        workers=n,
        studies=studies,
        threads_per_worker=spec.threads,
        wall_s=wall,
        studies_per_hour=(studies - len(bad)) / wall * 3600 if wall > 0 else 0.0,
        send_s=send_s,
        job_s_median=statistics.median(job_s) if job_s else 0.0,
        delivery_lag_s_median=statistics.median(lag_s) if lag_s else 0.0,
        failed=len(bad),
        problem="; ".join(f"job {r[2]} {r[3]}: {r[4]}" for r in bad),
    )


# --- report -----------------------------------------------------------------------------------


def print_report(results: list[RoundResult], args: argparse.Namespace, model: str) -> None:
    base = next((r for r in results if r.workers == 1), results[0] if results else None)
    print()
    where = "remote (WADO-RS + HTTP upload)" if args.remote else "local (shared disk)"
    print(
        f"{model} on {args.device}, {where} workers; each study one {args.slices}-slice "
        "512x512 CT series (one job); wall = first study COMPLETE -> last job DELIVERED"
    )
    header = (
        f"{'workers':>7} | {'studies':>7} | {'wall s':>7} | {'studies/hour':>12} | "
        f"{'ratio vs 1':>10} | {'threads/w':>9} | {'job s':>6} | {'send lag s':>10} | "
        f"{'ingest s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        ratio = r.studies_per_hour / base.studies_per_hour if base and base.studies_per_hour else 0
        print(
            f"{r.workers:>7} | {r.studies:>7} | {r.wall_s:>7.1f} | {r.studies_per_hour:>12.0f} | "
            f"{ratio:>9.2f}x | {r.threads_per_worker:>9} | {r.job_s_median:>6.1f} | "
            f"{r.delivery_lag_s_median:>10.1f} | {r.send_s:>8.1f}"
        )
    if base is not None and base.workers != 1:
        print(f"(no 1-worker round: ratios are against {base.workers} workers)")
    m = machine()
    print(
        f"machine: {m['cpus']} CPUs usable ({m['cpu_count']} on the host), Python {m['python']}, "
        f"{m['platform']}"
    )
    print(
        "threads/w: OMP_NUM_THREADS = MKL_NUM_THREADS = OPENBLAS_NUM_THREADS given to each "
        "worker (CPUs // workers, at least 1)"
    )
    print(
        "job s: median claim -> SEG+SR encoded per job; send lag s: median encoded -> "
        "delivered; ingest s: all storescu associations, first start -> last exit"
    )
    for r in results:
        if r.failed:
            print(f"FAILED with {r.workers} workers: {r.problem}")


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--studies", type=int, default=8, help="studies per round (8)")
    parser.add_argument("--slices", type=int, default=150, help="slices per study (150)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="", help="default: ct-organs-threshold on cpu, "
                        "lung-nodule-demo on cuda")  # fmt: skip
    parser.add_argument("--remote", action="store_true", help="workers share no disk")
    parser.add_argument("--timeout", type=float, default=1800, help="per round, seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args(argv)
    try:
        args.counts = [int(v) for v in args.workers.split(",") if v.strip()]
    except ValueError:
        parser.error("--workers takes integers, e.g. 1,2,4")
    if not args.counts or min(args.counts) < 1 or args.studies < 1 or args.slices < 20:
        parser.error("worker counts and --studies must be >= 1, --slices >= 20")
    args.model = args.model or DEFAULT_MODEL[args.device]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpus = gpu_count() if args.device == "cuda" else 0
    if args.device == "cuda" and gpus == 0:
        raise SystemExit("bench: --device cuda, but torch sees no GPU")
    from pacs_ai.models.registry import available

    if args.model not in available():
        raise SystemExit(f"bench: model {args.model!r} is not installed ({sorted(available())})")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="pacs-ai-scale-"))
    results: list[RoundResult] = []
    print(f"machine: {cpus()} CPUs usable, {os.cpu_count()} on the host; device {args.device}")
    print(f"generating a {args.slices}-slice 512x512 CT series ...", flush=True)
    template = make_template(root / "template", args.slices)
    redis = RedisServer(workdir=root / "redis")
    orthanc = OrthancProcess(root / "orthanc")
    redis.start()
    node = make_node(root / "node", orthanc, redis.url, args.model)
    try:
        pacs_and_node(orthanc, node)
        token = worker_token(node) if args.remote else ""
        for round_no, n in enumerate(args.counts):
            threads = max(1, cpus() // n)
            spec = WorkerSpec(node, redis.url, args.device, threads, args.remote, token, root, gpus)
            print(
                f"{n} worker(s), {threads} thread(s) each: {args.studies} studies ...", flush=True
            )
            result = run_round(
                node, orthanc, template, spec, n, args.studies, round_no, rng, args.timeout
            )
            results.append(result)
            print(
                f"  wall {result.wall_s:.1f} s, {result.studies_per_hour:.0f} studies/hour"
                + (f", {result.failed} FAILED" if result.failed else ""),
                flush=True,
            )
    finally:
        node.stop()
        orthanc.stop()
        redis.stop()
        if args.keep:
            print(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print_report(results, args, args.model)
    if args.json is not None:
        report = {
            "model": args.model,
            "device": args.device,
            "remote": args.remote,
            "slices": args.slices,
            "machine": machine(),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
