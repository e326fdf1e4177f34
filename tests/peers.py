"""Real processes for the tests: the node itself, Orthanc, and dcmtk's tools.

Everything listens on 127.0.0.1 on ports picked free at start; readiness is waited for
by asking the process (C-ECHO, HTTP), never by sleeping a fixed time.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_ai.processes import stop_process
from tests.databases import THROWAWAY, on_postgresql, read_rows
from tests.ports import free_port

DCMTK = Path("/usr/bin")
ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")

# dcmtk's tools (and Orthanc, built on dcmtk) only disable Nagle when asked.
TOOL_ENV = {**os.environ, "TCP_NODELAY": "1"}


def without_node_settings(**overrides: str) -> dict[str, str]:
    """This process's environment without its PACS_AI_ settings, plus ``overrides``: what a
    node or worker started here sees of the test run's own configuration is nothing."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_") or k == "PACS_AI_TEST"
    }
    return env | overrides


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool by full path (pynetdicom installs scripts with the same names)."""
    return subprocess.run(
        [str(DCMTK / tool), *args], env=TOOL_ENV, capture_output=True, text=True, timeout=timeout
    )


def echoscu_ok(ae: str, port: int, calling_ae: str = "ECHOSCU") -> bool:
    result = dcmtk("echoscu", "-aet", calling_ae, "-aec", ae, "127.0.0.1", str(port), timeout=10)
    return result.returncode == 0


@dataclass
class NodeProcess:
    """``pacs-ai serve`` in its own process, with a throw-away data dir and config."""

    workdir: Path
    ae_title: str = "PACSAI"
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    quiet_period_s: float = 1.0
    receivers: int = 1
    reserve_mb: float = 16
    peers: list[dict[str, Any]] = field(default_factory=list)
    extra_node: dict[str, Any] = field(default_factory=dict)
    # Calling AE of the readiness C-ECHO; with an allow-list it must be a configured peer's.
    probe_ae: str = "ECHOSCU"
    # Empty: the node's SQLite in its data dir, or under PACS_AI_TEST_DATABASE=postgresql a
    # fresh PostgreSQL database, kept across restarts and dropped when the test ends.
    database_url: str = ""
    extra_worker: dict[str, Any] = field(default_factory=dict)
    ai_worker: bool = False
    extra_toml: str = ""  # appended verbatim, e.g. [[rules]] tables
    data_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data_dir is None:
            self.data_dir = self.workdir / "data"
        if not self.database_url and on_postgresql():
            self.database_url = THROWAWAY.create()
        self.config = self.workdir / "pacs-ai.toml"
        self.log = self.workdir / "node.log"
        self.write_config()

    def write_config(self) -> None:
        node = {
            "ae_title": self.ae_title,
            "bind": "127.0.0.1",
            "dicom_port": self.port,
            "http_port": self.http_port,
            "data_dir": str(self.data_dir),
            "quiet_period_s": self.quiet_period_s,
            "receivers": self.receivers,
            "drain_timeout_s": 5,
            **self.extra_node,
        }
        lines = ["[node]"] + [f"{k} = {json.dumps(v)}" for k, v in node.items()]
        lines += ["[storage]", f"reserve_mb = {self.reserve_mb}"]
        lines += ["[database]", f"url = {json.dumps(self.database_url)}"]
        # Tests that need no AI path keep the node lean: no embedded worker unless asked.
        worker = {"embedded": self.ai_worker, "reconcile_interval_s": 1, **self.extra_worker}
        lines += ["[worker]"] + [f"{k} = {json.dumps(v)}" for k, v in worker.items()]
        for peer in self.peers:
            lines.append("[[peers]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in peer.items()]
        self.config.write_text("\n".join(lines) + "\n" + self.extra_toml)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacs_ai", *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "COLUMNS": "250"},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def index_url(self) -> str:
        """The node's index database, as its settings resolve an empty ``[database] url``."""
        assert self.data_dir is not None
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'index.sqlite3'}"

    def token(self, role: str, name: str = "", peer: str = "") -> str:
        """A new API token for ``role`` (``pacs-ai tokens create``: the token is the last line)."""
        args = ["tokens", "create", "--role", role, "--name", name or f"test-{role}"]
        if peer:
            args += ["--peer", peer]
        result = self.cli(*args)
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout.strip().splitlines()[-1]

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    def start(self) -> NodeProcess:
        self.log_file = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pacs_ai", "serve", "--config", str(self.config)],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self._ready, 60, f"pacs-ai on port {self.port}")
        except TimeoutError:
            self.stop()
            raise AssertionError(f"node did not start:\n{self.log.read_text()}") from None
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"node exited with {self.process.returncode}:\n{self.log.read_text()}"
            )
        return echoscu_ok(self.ae_title, self.port, self.probe_ae)

    def children(self) -> list[int]:
        """The running node's child processes, from /proc."""
        assert self.process is not None
        return children(self.process.pid)

    def receiver_pids(self) -> list[int]:
        """Its spawned receiver processes (multiprocessing's resource tracker is not one)."""
        found = []
        for kid in self.children():
            with contextlib.suppress(FileNotFoundError):  # gone since the listing
                if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                    found.append(kid)
        return found

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        if self.process is None:
            return 0
        code = stop_process(self.process, timeout)
        self.process = None
        self.log_file.close()
        return code

    def stored_path(self, source: Path) -> Path:
        """Where the node keeps the instance that ``source`` holds (the documented layout)."""
        from pydicom import dcmread

        ds = dcmread(source, stop_before_pixels=True)
        assert self.data_dir is not None
        return (
            self.data_dir
            / "studies"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm"
        )

    def studies(self) -> list[dict[str, Any]]:
        return list(self.cli_json("studies", "list"))


@dataclass
class OrthancProcess:
    """A real PACS: Orthanc from Debian, on loopback, with a throw-away config and storage."""

    workdir: Path
    modalities: dict[str, list[Any]] = field(default_factory=dict)
    ae_title: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    dicomweb: bool = False
    # Merged into the configuration last, e.g. {"DicomWeb": {"Servers": {...}}}.
    extra_config: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> OrthancProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacs-ai-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            # Loopback only: no remote HTTP, and only 127.0.0.1 modalities may talk DICOM.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities,
            "StorageCompression": False,
            "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")] if self.dicomweb else [],
            "HttpTimeout": 60,
            **self.extra_config,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        self.log = (self.workdir / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [str(ORTHANC), str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=TOOL_ENV
        )
        wait_for(self._ready, 60, "Orthanc HTTP")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.process.returncode}")
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return bytes(response.read())

    def post(
        self, path: str, body: bytes | dict[str, Any] | list[Any] | str, timeout: float = 300
    ) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def upload(self, files: list[Path]) -> list[str]:
        """POST each file to /instances; return Orthanc's instance ids."""
        return [self.post("/instances", f.read_bytes())["ID"] for f in files]

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, 30)
        self.process = None
        self.log.close()


class RedisServer:
    """A throw-away redis-server on a loopback TCP port that keeps nothing: a restart comes
    back empty, as a Redis does that lost its data."""

    def __init__(self, port: int | None = None, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        from pacs_ai.broker import redis_server_binary

        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no"]  # fmt: skip
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            command += ["--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        wait_for(self.pings, 20, f"redis-server on port {self.port}")
        return self

    def queued(self) -> list[tuple[str, int, str, int]]:
        """(task, id, queue, priority) of every message waiting on the node's queues."""
        import redis

        from pacs_ai.pipeline.queues import QUEUES, queue_keys

        found = []
        with closing(redis.Redis.from_url(self.url)) as client:
            for queue in QUEUES:
                for key in queue_keys(queue):
                    for raw in client.lrange(key, 0, -1):
                        message = json.loads(raw)
                        (item_id,) = json.loads(base64.b64decode(message["body"]))[0]
                        priority = message["properties"]["priority"]
                        found.append((message["headers"]["task"], item_id, queue, priority))
        return found

    def pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, 15)
        self.process = None


def orthanc_as_peer(orthanc: OrthancProcess) -> dict[str, Any]:
    """The [[peers]] entry by which a node knows this Orthanc (sends to it, takes from it)."""
    return {
        "name": "orthanc",
        "ae_title": orthanc.ae_title,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "send": True,
        "receive": True,
    }


def pacs_and_node(orthanc: OrthancProcess, node: NodeProcess) -> tuple[OrthancProcess, NodeProcess]:
    """Start an Orthanc that knows the node as modality "pacsai", then the node."""
    orthanc.modalities["pacsai"] = [node.ae_title, "127.0.0.1", node.port]
    orthanc.start()
    node.start()
    return orthanc, node


def children(pid: int) -> list[int]:
    """A process's children, from /proc; none once it is gone."""
    listing = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(kid) for kid in listing.read_text().split()]
    except FileNotFoundError:
        return []


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, children first seen from /proc."""
    kids = children(pid)
    os.kill(pid, signal.SIGKILL)
    for kid in kids:
        if Path(f"/proc/{kid}").exists():
            kill_tree(kid)


def send_as(node: NodeProcess, calling_ae: str, files: list[Path]) -> None:
    result = dcmtk(
        "storescu", "-aet", calling_ae, "-aec", node.ae_title, "127.0.0.1", str(node.port),
        *map(str, files),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def results_in(orthanc: OrthancProcess, study_uid: str) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {"SEG": [], "SR": []}
    for study in orthanc.get("/studies?expand"):
        if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
            continue
        for series_id in study["Series"]:
            series = orthanc.get(f"/series/{series_id}")
            modality = series["MainDicomTags"].get("Modality")
            if modality in found:
                found[modality] += [
                    orthanc.get_bytes(f"/instances/{i}/file") for i in series["Instances"]
                ]
    return found


def running_job_worker(node: NodeProcess) -> tuple[int, int] | None:
    """(job id, worker pid) of a RUNNING job, read straight from the node's index."""
    rows = read_rows(node.index_url, "SELECT id, worker FROM jobs WHERE state = 'RUNNING'")
    return None if not rows else (int(rows[0][0]), int(rows[0][1].rsplit(":", 1)[1]))
