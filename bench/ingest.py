"""Ingest benchmark: how fast pacs-ai stores CT images compared with Orthanc and bare storescp.

What it measures
    N CT images of 512×512 (default 500, made once by the project's chest phantom) are sent by
    dcmtk ``storescu`` over 4 parallel associations (4 processes, the files split round-robin)
    to each of three receivers on this machine:

    * pacs-ai (``python -m pacs_ai serve``), durability on: every instance is fsynced and
      indexed before its C-STORE response;
    * Orthanc, storing to disk with its SQLite index;
    * dcmtk ``storescp`` writing each file to a folder (the floor: no index, no fsync).

    The clock runs from launching the first ``storescu`` to the exit of the last one;
    images/s = N / seconds. A round counts only when every ``storescu`` exited 0 and the
    receiver then holds N instances. Receivers take turns round by round (pacs-ai, Orthanc,
    storescp, pacs-ai, ...), each round starting from an empty storage folder, and the table
    gives median, min and max over the rounds with the ratios pacs-ai/Orthanc (target ≥ 1.0)
    and pacs-ai/storescp, plus the share of CPU time busy during each send (from /proc/stat)
    and the CPU milliseconds per image spent by the receiver's processes (rx, from
    /proc/PID/stat over its process tree) and by the storescu senders (tx, from getrusage).
    On a machine with fewer cores than busy processes, rx + tx is what bounds images/s.

    Every process gets ``TCP_NODELAY=1``: dcmtk's tools and Orthanc turn Nagle off only with it.

How to run
    ``make bench`` (runs ``.venv/bin/python bench/ingest.py``), or directly::

        python bench/ingest.py [--images 500] [--rounds 3] [--receivers 0] [--json out.json]

    Needs dcmtk (storescu, storescp, echoscu) and Orthanc on the PATH (or /usr/sbin). Only
    loopback is used. The exit status is 0 whether or not the target is met; the last lines say.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from pacs_ai.processes import stop_process

SENDERS = 4
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
COUNT_TIMEOUT_S = 15.0
TARGET_RATIO = 1.0


# --- environment ------------------------------------------------------------------------------


def find_tool(name: str) -> str:
    """Path of an executable on PATH or in the usual system folders (Orthanc lives in sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit(f"bench: {name} not found; install dcmtk and Orthanc (make system-deps)")


def child_env() -> dict[str, str]:
    """Environment for every child: Nagle off, and no PACS_AI_* overriding the bench config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    env["TCP_NODELAY"] = "1"
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from the first line of /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and every process below it."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                text = stat.read()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def pacs_ai_command() -> list[str]:
    """``python -m pacs_ai``, or the console script beside the interpreter if that fails."""
    probe = subprocess.run(
        [sys.executable, "-m", "pacs_ai", "--version"], capture_output=True, check=False
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "pacs_ai"]
    script = Path(sys.executable).with_name("pacs-ai")
    if script.exists():
        return [str(script)]
    raise SystemExit("bench: neither `python -m pacs_ai` nor the pacs-ai script works")


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


# --- receivers --------------------------------------------------------------------------------


class Receiver:
    """One receiver process started in its own empty work folder and stopped after one round."""

    name = ""
    ae_title = ""

    def __init__(self, tools: dict[str, str]) -> None:
        self.tools = tools
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path()
        self.port = 0
        self.log = Path()

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write whatever config the receiver needs into ``self.workdir``."""

    def ready(self) -> bool:
        return echo(self.tools["echoscu"], self.ae_title, self.port)

    def count(self) -> int:
        raise NotImplementedError

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.prepare()
        self.log = workdir / f"{self.name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=workdir,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_until(self._started, START_TIMEOUT_S, 0.25):
            self.stop()
            raise RuntimeError(f"{self.name} did not become ready:\n{tail(self.log)}")

    def _started(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode} at start:\n{tail(self.log)}"
            )
        return self.ready()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, STOP_TIMEOUT_S)


def echo(echoscu: str, ae_title: str, port: int) -> bool:
    result = subprocess.run(
        [echoscu, "-aec", ae_title, "127.0.0.1", str(port)],
        env=child_env(),
        capture_output=True,
        check=False,
        timeout=10,
    )
    return result.returncode == 0


class PacsAi(Receiver):
    name = "pacs-ai"
    ae_title = "PACSAI"

    def __init__(self, tools: dict[str, str], cli: list[str], receivers: int) -> None:
        super().__init__(tools)
        self.cli = cli
        self.receivers = receivers

    @property
    def config(self) -> Path:
        return self.workdir / "pacs-ai.toml"

    def prepare(self) -> None:
        data_dir = json.dumps(str(self.workdir / "data"))  # a TOML basic string
        self.config.write_text(
            "[node]\n"
            f'ae_title = "{self.ae_title}"\n'
            'bind = "127.0.0.1"\n'
            f"dicom_port = {self.port}\n"
            f"data_dir = {data_dir}\n"
            "quiet_period_s = 2\n"
            f"receivers = {self.receivers}\n"
            'log_level = "WARNING"\n'
            "[storage]\n"
            "reserve_mb = 100\n"
            # The receiver is what is compared with Orthanc and storescp, which run no AI:
            # no inference worker here (bench/latency.py measures the AI path).
            "[worker]\n"
            "embedded = false\n"
        )

    def command(self) -> list[str]:
        return [*self.cli, "serve", "--config", str(self.config)]

    def count(self) -> int:
        result = subprocess.run(
            [*self.cli, "studies", "list", "--json", "--config", str(self.config)],
            env=child_env(),
            capture_output=True,
            check=False,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pacs-ai studies list failed: {result.stderr.strip()}")
        return sum(int(study["instance_count"]) for study in json.loads(result.stdout))


class Orthanc(Receiver):
    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, tools: dict[str, str]) -> None:
        super().__init__(tools)
        self.http_port = 0

    @property
    def config(self) -> Path:
        return self.workdir / "orthanc.json"

    def prepare(self) -> None:
        self.http_port = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {},
            "Plugins": [],
            "StorageCompression": False,
        }
        self.config.write_text(json.dumps(config, indent=2))

    def command(self) -> list[str]:
        return [self.tools["Orthanc"], str(self.config)]

    def _get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def ready(self) -> bool:
        try:
            self._get("/system")
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return True

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


class StoreScp(Receiver):
    name = "storescp"
    ae_title = "STORESCP"

    @property
    def out_dir(self) -> Path:
        return self.workdir / "out"

    def prepare(self) -> None:
        self.out_dir.mkdir()

    def command(self) -> list[str]:
        return [self.tools["storescp"], "-od", str(self.out_dir), str(self.port)]

    def count(self) -> int:
        return sum(1 for entry in self.out_dir.iterdir() if entry.is_file())


# --- one round --------------------------------------------------------------------------------


@dataclass
class RoundResult:
    receiver: str
    round: int
    seconds: float
    images_per_s: float
    cpu_busy: float
    received: int
    ok: bool
    problem: str = ""
    receiver_cpu_ms: float = 0.0  # CPU time of the receiver's processes per image
    sender_cpu_ms: float = 0.0  # CPU time of the storescu processes per image


def send_all(storescu: str, ae_title: str, port: int, files: list[Path], logdir: Path) -> list[int]:
    """Send ``files`` over SENDERS parallel storescu processes; return their exit codes."""
    groups = [files[i::SENDERS] for i in range(SENDERS)]
    procs: list[subprocess.Popen[bytes]] = []
    for i, group in enumerate(groups):
        if not group:
            continue
        with open(logdir / f"storescu-{i}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [storescu, "-aec", ae_title, "127.0.0.1", str(port), *map(str, group)],
                    env=child_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return [proc.wait() for proc in procs]


def settled_count(receiver: Receiver, expected: int) -> int:
    """The receiver's instance count, polled briefly in case indexing lags the responses."""
    last = [0]

    def reached() -> bool:
        last[0] = receiver.count()
        return last[0] >= expected

    wait_until(reached, COUNT_TIMEOUT_S, 0.5)
    return last[0]


def run_round(
    receiver: Receiver, tools: dict[str, str], files: list[Path], index: int, base: Path
) -> RoundResult:
    workdir = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-{index}-", dir=base))
    n = len(files)
    try:
        receiver.start(workdir)
    except RuntimeError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        return RoundResult(receiver.name, index, 0.0, 0.0, 0.0, 0, False, str(exc))
    try:
        assert receiver.proc is not None
        cpu_before = cpu_times()
        receiver_before = tree_cpu_s(receiver.proc.pid)
        senders_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        codes = send_all(tools["storescu"], receiver.ae_title, receiver.port, files, workdir)
        seconds = time.perf_counter() - started
        cpu = busy_share(cpu_before, cpu_times())
        receiver_cpu = tree_cpu_s(receiver.proc.pid) - receiver_before
        senders_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        sender_cpu = (senders_after.ru_utime + senders_after.ru_stime) - (
            senders_before.ru_utime + senders_before.ru_stime
        )
        received = settled_count(receiver, n)
        problems = []
        if any(codes):
            logs = "\n".join(tail(p, 5) for p in sorted(workdir.glob("storescu-*.log")))
            problems.append(f"storescu exit codes {codes}:\n{logs}")
        if received != n:
            problems.append(f"receiver holds {received} instances, expected {n}")
        return RoundResult(
            receiver.name,
            index,
            seconds,
            n / seconds,
            cpu,
            received,
            not problems,
            "; ".join(problems),
            receiver_cpu * 1000 / n,
            sender_cpu * 1000 / n,
        )
    finally:
        receiver.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# --- report -----------------------------------------------------------------------------------


def summarise(results: list[RoundResult], names: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for name in names:
        good = [r for r in results if r.receiver == name and r.ok]
        rates = [r.images_per_s for r in good]
        summary[name] = {
            "rounds_ok": len(good),
            "rounds": sum(1 for r in results if r.receiver == name),
            "median": statistics.median(rates) if rates else None,
            "min": min(rates) if rates else None,
            "max": max(rates) if rates else None,
            "cpu_busy_median": statistics.median(r.cpu_busy for r in good) if good else None,
            "receiver_cpu_ms_median": (
                statistics.median(r.receiver_cpu_ms for r in good) if good else None
            ),
            "sender_cpu_ms_median": (
                statistics.median(r.sender_cpu_ms for r in good) if good else None
            ),
        }
    return summary


def ratio(summary: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    top, bottom = summary[a]["median"], summary[b]["median"]
    return top / bottom if top and bottom else None


def target_met(ratios: dict[str, float | None]) -> bool:
    value = ratios["pacs-ai/orthanc"]
    return value is not None and value >= TARGET_RATIO


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def print_report(
    results: list[RoundResult], summary: dict[str, dict[str, Any]], images: int, senders: int
) -> dict[str, float | None]:
    print()
    print(f"{images} CT images 512×512, {senders} parallel storescu associations, images/s:")
    header = (
        f"{'receiver':<10} {'median':>8} {'min':>8} {'max':>8} {'rounds':>7} {'cpu busy':>9}"
        f" {'rx ms/img':>10} {'tx ms/img':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, row in summary.items():
        rounds = f"{row['rounds_ok']}/{row['rounds']}"
        cpu = fmt(row["cpu_busy_median"] * 100, ".0f") + "%" if row["cpu_busy_median"] else "-"
        print(
            f"{name:<10} {fmt(row['median']):>8} {fmt(row['min']):>8} {fmt(row['max']):>8} "
            f"{rounds:>7} {cpu:>9} {fmt(row['receiver_cpu_ms_median'], '.2f'):>10}"
            f" {fmt(row['sender_cpu_ms_median'], '.2f'):>10}"
        )
    ratios = {
        "pacs-ai/orthanc": ratio(summary, "pacs-ai", "orthanc"),
        "pacs-ai/storescp": ratio(summary, "pacs-ai", "storescp"),
    }
    print()
    for label, value in ratios.items():
        print(f"ratio {label:<17} {fmt(value, '.2f')}x")
    m = machine()
    print(f"machine: {m['cores']} cores, Python {m['python']}, {m['platform']}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAILED {r.receiver} round {r.round}: {r.problem}")
    verdict = "MET" if target_met(ratios) else "NOT MET"
    print(f"target pacs-ai >= {TARGET_RATIO:.1f}x Orthanc (durability on): {verdict}")
    return ratios


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=500, help="CT slices to send (500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per receiver (3)")
    parser.add_argument(
        "--receivers", type=int, default=0, help="pacs-ai [node] receivers (0 = auto)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1 or args.receivers < 0:
        parser.error("--images and --rounds must be ≥ 1, --receivers ≥ 0")
    return args


def make_images(base: Path, count: int) -> list[Path]:
    out = base / "images"
    write_chest_ct(out, Geometry(slices=count), with_lung_series=False, with_scout=False)
    files = sorted(out.rglob("*.dcm"))
    if len(files) != count:
        raise SystemExit(f"bench: the phantom wrote {len(files)} files, expected {count}")
    return files


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = {name: find_tool(name) for name in ("storescu", "storescp", "echoscu", "Orthanc")}
    receivers: list[Receiver] = [
        PacsAi(tools, pacs_ai_command(), args.receivers),
        Orthanc(tools),
        StoreScp(tools),
    ]
    results: list[RoundResult] = []
    with tempfile.TemporaryDirectory(prefix="pacs-ai-bench-") as tmp:
        base = Path(tmp)
        print(f"generating {args.images} CT images 512×512 ...", flush=True)
        files = make_images(base, args.images)
        for index in range(1, args.rounds + 1):
            for receiver in receivers:
                result = run_round(receiver, tools, files, index, base)
                results.append(result)
                state = "ok" if result.ok else "FAILED"
                print(
                    f"round {index} {receiver.name:<9} {result.images_per_s:8.1f} images/s "
                    f"{result.seconds:6.2f} s  cpu {result.cpu_busy * 100:3.0f}%  "
                    f"rx {result.receiver_cpu_ms:.2f} tx {result.sender_cpu_ms:.2f} ms/img  "
                    f"received {result.received}  {state}",
                    flush=True,
                )
    names = [r.name for r in receivers]
    summary = summarise(results, names)
    ratios = print_report(results, summary, args.images, SENDERS)
    if args.json is not None:
        report = {
            "images": args.images,
            "senders": SENDERS,
            "rounds": args.rounds,
            "pacs_ai_receivers": args.receivers,
            "machine": machine(),
            "summary": summary,
            "ratios": ratios,
            "target_met": target_met(ratios),
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
