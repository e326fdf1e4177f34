"""``pacs-ai serve``: the receivers, the assembler, and a clean stop, as one service.

One process owns the data dir: it migrates the database, clears unacknowledged temp files,
runs the assembler and supervises the receivers. With ``node.receivers > 1`` each receiver
is a spawned process accepting on the listening socket this process opened, because one
pynetdicom process is bound by the GIL well below what a PACS can push.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import multiprocessing
import multiprocessing.queues
import os
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import pydicom.config

from pacs_ai.audit.events import AuditEvent, Kind
from pacs_ai.audit.trail import Auditor, record_start
from pacs_ai.config import Settings
from pacs_ai.dicom.scp import ListeningSockets, Receiver, bind_port, open_listening_sockets
from pacs_ai.errors import NetworkError
from pacs_ai.pipeline.assemble import Assembler, CompletionListener
from pacs_ai.pipeline.queues import broker_reachable
from pacs_ai.pipeline.runtime import AIRuntime
from pacs_ai.storage import retention
from pacs_ai.storage.db import open_database
from pacs_ai.storage.ingest import Ingest
from pacs_ai.storage.spool import Spool
from pacs_ai.web.context import WebContext
from pacs_ai.web.server import HttpServer

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def configure_process(settings: Settings) -> None:
    """Per-process setup shared by the node and its receiver processes."""
    logging.basicConfig(level=settings.node.log_level, format=LOG_FORMAT, force=True)
    # We keep bytes as received and read only a few attributes: a sender's odd value
    # must not turn into a warning per instance (or an error under strict settings).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    quiet = max(logging.WARNING, logging.getLogger().level)
    for noisy in ("pynetdicom", "alembic", "highdicom"):
        logging.getLogger(noisy).setLevel(quiet)


def settle_heap() -> None:
    """Keep what start-up built out of every later garbage collection.

    A receiver holds ~170,000 objects from its imports (pydicom's dictionary, SQLAlchemy,
    Celery); each full collection walked them all, ~0.1-0.3 s with the GIL held, and
    pynetdicom forces one every 60 turns of its accept loop. Measured during ingest, that
    was a tenth of a 3 s send. Frozen, a full collection takes microseconds.
    """
    gc.collect()
    gc.freeze()


def make_ingest(settings: Settings, run_migrations: bool) -> Ingest:
    spool = Spool(settings.node.data_dir, int(settings.storage.reserve_mb * 2**20))
    spool.prepare(clean_tmp=run_migrations)
    engine = open_database(settings.database_url, run_migrations=run_migrations)
    return Ingest(spool, engine)


def _check_port_free(settings: Settings) -> None:
    # Say which port is taken, and by which key it is set, before anything else starts.
    node = settings.node
    ports = [("DICOM", node.dicom_port, "node.dicom_port")]
    if settings.tls.port:
        ports.append(("DICOM TLS", settings.tls.port, "tls.port"))
    for what, port, key in ports:
        try:
            bind_port(node.bind, port).close()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(
                    f"{what} port {port} on {node.bind} is already in use (another node "
                    f"or PACS?); stop it or set {key}"
                ) from None
            raise NetworkError(f"cannot listen on {node.bind}:{port}: {exc.strerror}") from None


def _check_models(settings: Settings, with_preload: bool, source: str) -> None:
    """Refuse to start when a rule, or the embedded worker's preload, names a model that is not
    installed, or a preload needs CUDA on a CPU: the embedded worker would refuse its preload
    too, and the node would run on without inference."""
    from pacs_ai.models.registry import check_installed, check_preload_device, preload_wanted

    wanted = [(f"rules.{rule.name}", model) for rule in settings.rules for model in rule.models]
    if with_preload:
        wanted += preload_wanted(settings)
    check_installed(settings.models.paths, wanted, source)
    if with_preload:
        check_preload_device(settings, source)


# How often a receiver looks at the stop flag: the most a stop waits before draining begins.
STOP_POLL_S = 0.2


def _receiver_process(
    settings: Settings,
    sockets: ListeningSockets,
    slot: int,
    node: int,
    stop: ctypes.c_bool,
    started: multiprocessing.queues.SimpleQueue[str],
) -> None:
    configure_process(settings)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    terminated: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))
    try:
        ingest = make_ingest(settings, run_migrations=False)
        receiver = Receiver(settings, ingest, sockets, slot=slot)
        receiver.start()
    except Exception as exc:
        started.put(f"{type(exc).__name__}: {exc}")
        raise
    # Before saying so: a collection holds the GIL, and the listener must answer at once.
    settle_heap()
    started.put("")
    while not stop.value and not terminated:
        time.sleep(STOP_POLL_S)
        # A node killed outright (OOM killer, SIGKILL) runs no handler. Left running, its
        # receivers would hold the port, so the node could not be restarted on it.
        if os.getppid() != node:
            logger.error("the node (pid %d) is gone; this receiver stops", node)
            break
    receiver.stop(settings.node.drain_timeout_s)
    receiver.auditor.close()
    ingest.close()


LOAD_OF_A_GONE_RECEIVER = 1 << 20


class ReceiverPool:
    """Receiver processes accepting on one listening socket; one that dies is replaced.

    The socket stays open here while receivers come and go, so a connection that arrives
    while one restarts waits in the backlog for another.
    """

    START_TIMEOUT_S = 60.0

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.sockets = open_listening_sockets(settings, self.ctx.Array("i", count, lock=False))
        # A flag in shared memory, with no lock: a multiprocessing Event would hang the node's
        # stop for ever once a receiver had been killed while waiting on it (its Condition
        # waits in notify for every waiter it counted to wake, the dead one included).
        self.stop_flag: ctypes.c_bool = self.ctx.RawValue(ctypes.c_bool, False)
        self.started: multiprocessing.queues.SimpleQueue[str] = self.ctx.SimpleQueue()
        self.processes = [self._spawn(i) for i in range(count)]
        self._wait_started(count)

    def _spawn(self, i: int) -> multiprocessing.process.BaseProcess:
        process = self.ctx.Process(
            target=_receiver_process,
            args=(self.settings, self.sockets, i, os.getpid(), self.stop_flag, self.started),
            name=f"receiver-{i}",
            daemon=True,
        )
        process.start()
        return process

    def _wait_started(self, count: int) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT_S
        for _ in range(count):
            while self.started.empty():
                if time.monotonic() > deadline:
                    self.stop()
                    raise NetworkError("receiver processes did not start in time")
                time.sleep(0.02)
            error = self.started.get()
            if error:
                self.stop()
                raise NetworkError(f"a receiver process failed to start: {error}")

    def replace_dead(self) -> None:
        for i, process in enumerate(self.processes):
            if not process.is_alive():
                logger.error(
                    "receiver %s died (exit %s); restarting", process.name, process.exitcode
                )
                # Until its successor publishes, the slot must not look idle: the others
                # would leave every new connection to it.
                self.sockets.loads[i] = LOAD_OF_A_GONE_RECEIVER
                self.processes[i] = self._spawn(i)
                self._wait_started(1)

    def stop(self) -> None:
        self.stop_flag.value = True
        # The port closes once the last receiver stops accepting.
        self.sockets.close()
        for process in self.processes:
            process.join(self.settings.node.drain_timeout_s + 5)
            if process.is_alive():
                process.kill()


class Node:
    """The running node. ``listeners`` hear of each study completion (the AI path hangs here)."""

    def __init__(
        self,
        settings: Settings,
        listeners: Sequence[CompletionListener] = (),
        config_path: Path | None = None,
        ai_path: bool = True,
    ) -> None:
        self.settings = settings
        self.listeners = list(listeners)
        self.config_path = config_path
        self.ai_path = ai_path
        self.stop_event = threading.Event()

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if signum is not None:
            logger.info("received %s, stopping", signal.Signals(signum).name)
        self.stop_event.set()

    def _start_http(
        self,
        ingest: Ingest,
        runtime: AIRuntime | None,
        pool: ReceiverPool | None,
        local: Receiver | None,
        auditor: Auditor,
    ) -> HttpServer | None:
        if not self.settings.http.enabled:
            return None

        def readiness() -> dict[str, bool]:
            checks = {
                "receivers": all(p.is_alive() for p in pool.processes)
                if pool is not None
                else local is not None,
            }
            if runtime is not None:
                checks["broker"] = broker_reachable(runtime.broker_url)
            return checks

        ctx = WebContext(
            self.settings,
            ingest.engine,
            ingest,
            readiness=readiness,
            broker_url=runtime.broker_url if runtime is not None else "",
            send_task=runtime.send_task if runtime is not None else None,
            auditor=auditor,
        )
        http = HttpServer(ctx)
        http.start()
        return http

    def run(self) -> None:
        settings = self.settings
        configure_process(settings)
        _check_models(
            settings, self.ai_path and settings.worker.embedded, str(self.config_path or "defaults")
        )
        _check_port_free(settings)
        ingest = make_ingest(settings, run_migrations=True)
        auditor = Auditor(ingest.engine, settings)
        record_start(auditor, settings, str(self.config_path or "defaults"))
        runtime = AIRuntime(settings, ingest.engine, self.config_path) if self.ai_path else None
        listeners = list(self.listeners)
        if runtime is not None:
            listeners.append(runtime.start())
        assembler = Assembler(ingest.engine, settings.node.quiet_period_s, listeners)
        if runtime is not None and settings.worker.prepare_mb:
            assembler.add_lull_listener(runtime.dispatcher.on_study_lull)
        assembly_stop = threading.Event()
        assembly = threading.Thread(target=assembler.run, args=(assembly_stop,), name="assembler")

        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

        count = settings.node.receiver_count
        local: Receiver | None = None
        pool: ReceiverPool | None = None
        if count == 1:
            local = Receiver(settings, ingest, auditor=auditor)
            local.start()
        else:
            pool = ReceiverPool(settings, count)
            logger.info(
                "%d receiver processes share DICOM port %d", count, settings.node.dicom_port
            )
        assembly.start()
        purger: threading.Thread | None = None
        if settings.retention.automatic:
            purger = threading.Thread(
                target=retention.run_periodically,
                args=(ingest.engine, settings, ingest.spool, auditor, assembly_stop),
                name="retention",
            )
            purger.start()
        http = self._start_http(ingest, runtime, pool, local, auditor)
        settle_heap()
        logger.info(
            "pacs-ai ready: AE %s, DICOM port %d, data dir %s, quiet period %.1f s",
            settings.node.ae_title,
            settings.node.dicom_port,
            settings.node.data_dir,
            settings.node.quiet_period_s,
        )
        try:
            while not self.stop_event.wait(0.5):
                if pool is not None:
                    pool.replace_dead()
                if runtime is not None:
                    runtime.supervise()
        finally:
            logger.info(
                "stopping: draining associations (up to %.0f s)", settings.node.drain_timeout_s
            )
            if http is not None:
                http.stop()
            if local is not None:
                local.stop(settings.node.drain_timeout_s)
            if pool is not None:
                pool.stop()
            assembly_stop.set()
            assembly.join()
            if purger is not None:
                purger.join()  # a purge under way finishes before the engine goes
            if runtime is not None:
                runtime.stop(settings.node.drain_timeout_s + 20)
            auditor.record(AuditEvent(Kind.APPLICATION_STOP, actor=auditor.source_id))
            auditor.close()
            ingest.close()
            logger.info("pacs-ai stopped")
