"""A private, throw-away PostgreSQL server, for a test session on a machine without one.

``initdb`` (trust auth, superuser ``postgres``) in a fresh temporary folder, then ``postgres``
listening on 127.0.0.1 only, on a free port, with its Unix socket in that folder and without
fsync: nothing in it has to survive the session. PostgreSQL refuses to run as root, so as
root both run as the ``postgres`` system user, which owns the folder.

The server's parent is a small watchdog holding a pipe from the test process. When that pipe
closes (``stop``, the interpreter exiting, or the test process killed outright) the watchdog
stops the server with a fast shutdown and deletes the folder: no cluster outlives its session.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psycopg

from tests.ports import free_port

DEBIAN_ROOT = Path("/usr/lib/postgresql")
FIX = (
    "install Debian's postgresql (`bash deploy/install-system-deps.sh` as root, which "
    "`make test` runs) or set PACS_AI_TEST_PG to a server's admin URL"
)

# Started with start_new_session, so that a Ctrl-C meant for pytest reaches neither the
# watchdog nor the server: the session still needs its databases while it winds down.
WATCHDOG = """
import shutil, signal, subprocess, sys, threading
folder, uid, gid, *command = sys.argv[1:]
ids = {"user": int(uid), "group": int(gid), "extra_groups": []} if uid else {}
server = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL, **ids)

def stop_on_eof():
    sys.stdin.buffer.read()
    server.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions still connected
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.send_signal(signal.SIGQUIT)  # immediate shutdown

threading.Thread(target=stop_on_eof, daemon=True).start()
code = server.wait()
shutil.rmtree(folder, ignore_errors=True)
sys.exit(code)
"""


class ServerUnavailable(RuntimeError):
    """No private server could be started; the message says what is missing and the fix."""


def _version(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in bindir.parent.name.split(".") if part.isdigit())


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``postgres``: Debian's newest version, else the one
    ``pg_config --bindir`` names, else the one on PATH."""
    candidates = sorted(DEBIAN_ROOT.glob("*/bin"), key=_version, reverse=True)
    if pg_config := shutil.which("pg_config"):
        try:
            done = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            candidates.append(Path(done.stdout.strip()))
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return bindir
    return None


def _run_as() -> tuple[int, int] | None:
    """The (uid, gid) to run the server as: the ``postgres`` user's as root, else none."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ServerUnavailable(
            "PostgreSQL refuses to run as root and there is no `postgres` user to run it as: " + FIX
        ) from None
    return user.pw_uid, user.pw_gid


class PostgresServer:
    """A running private server; ``start`` makes one, ``stop`` ends it and deletes its folder."""

    def __init__(
        self, folder: Path, port: int, watchdog: subprocess.Popen[bytes], log: IO[bytes]
    ) -> None:
        self.folder = folder
        self.port = port
        self._watchdog = watchdog
        self._log = log

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @classmethod
    def start(cls, timeout: float = 60, tries: int = 3) -> PostgresServer:
        """initdb and start a server; ``ServerUnavailable`` with the reason if that fails.

        The free port is found before the server binds it, and another process may take it
        in between: that one failure is worth another port, not a session without PostgreSQL.
        """
        for attempt in range(1, tries + 1):
            try:
                return cls._start(timeout)
            except ServerUnavailable as exc:
                if attempt == tries or "could not bind" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start(cls, timeout: float) -> PostgresServer:
        bindir = find_bindir()
        if bindir is None:
            raise ServerUnavailable(
                f"no PostgreSQL server binaries (initdb, postgres) under {DEBIAN_ROOT}/*/bin, "
                "at `pg_config --bindir` or on PATH: " + FIX
            )
        ids = _run_as()
        as_user: dict[str, Any] = {}
        folder = Path(tempfile.mkdtemp(prefix="pacs-ai-test-pg-"))
        if ids is not None:
            os.chown(folder, *ids)
            as_user = {"user": ids[0], "group": ids[1], "extra_groups": []}
        try:
            initdb = subprocess.run(
                [bindir / "initdb", "-D", folder / "data", "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
                cwd=folder, capture_output=True, text=True, timeout=120, check=False, **as_user,
            )  # fmt: skip
            if initdb.returncode != 0:
                raise ServerUnavailable(
                    f"{bindir / 'initdb'} failed ({initdb.returncode}): "
                    f"{initdb.stderr.strip()[-2000:]}"
                )
            port = free_port()
            command = [
                str(bindir / "postgres"), "-D", str(folder / "data"), "-p", str(port),
                "-k", str(folder), "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ]  # fmt: skip
            uid, gid = (str(ids[0]), str(ids[1])) if ids is not None else ("", "")
            # Kept open here: the server's last words can still be read once the watchdog
            # has deleted the folder.
            log = (folder / "server.log").open("w+b")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        try:
            watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(folder), uid, gid, *command],
                stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        except BaseException:
            log.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        server = cls(folder, port, watchdog, log)
        server._wait_ready(timeout)
        return server

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self._watchdog.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                tail = self._log.read().decode(errors="replace").strip()[-2000:]
                self.stop()
                raise ServerUnavailable(f"the private PostgreSQL did not start: {tail}")
            time.sleep(0.05)

    def answers(self) -> bool:
        try:
            with psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                connect_timeout=2,
            ):  # fmt: skip
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, timeout: float = 60) -> None:
        """Stop the server and delete its folder; waits for both. Idempotent."""
        if self._watchdog.stdin is not None:
            self._watchdog.stdin.close()
        try:
            self._watchdog.wait(timeout)
        except subprocess.TimeoutExpired:
            # The server is in the watchdog's process group (start_new_session): kill both,
            # or a postmaster would outlive its session, listening with trust auth.
            os.killpg(self._watchdog.pid, signal.SIGKILL)
            self._watchdog.wait()
        if not self._log.closed:
            self._log.close()
