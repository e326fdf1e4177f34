"""Database engine and migrations: SQLite (WAL) by default, PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.errors import StorageError

logger = logging.getLogger(__name__)

_ALEMBIC_INI = Path(__file__).with_name("alembic.ini")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, pool_size=8, max_overflow=8)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets receivers in several processes write while readers read. synchronous=FULL
    # syncs the WAL at every commit: an acknowledged instance's row survives a power cut, not
    # only a crash. Group commit (storage/recorder.py) shares that sync between associations;
    # it cost about 10 % of ingest throughput against NORMAL in bench/ingest.py.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class WriterTurn:
    """Takes turns at writing to one SQLite index across processes, without SQLite's naps.

    SQLite makes a writer that finds the database locked retry on a timer: its busy handler
    sleeps 1, 2, 5, 10 ms and more between tries. Receivers in several processes commit
    hundreds of times a second, so they collided often and each collision cost at least a
    millisecond of an association's time. Here a receiver that finds the turn taken tries
    again after 0.1 ms, doubling to at most 1 ms. The turn only saves time: SQLite still
    keeps writers apart, so a turn not had within ``wait_s`` (a receiver stuck holding it),
    or a file system without ``flock``, means writing without one, as before.
    """

    def __init__(self, path: Path, wait_s: float = 5.0) -> None:
        self.path = path
        self.wait_s = wait_s
        self.enabled = True
        self._fd: int | None = None
        self._opening = threading.Lock()
        _TURNS.add(self)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        fd = self._take() if self.enabled else None
        try:
            yield
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _take(self) -> int | None:
        """The descriptor holding the turn; None to write without one."""
        try:
            fd = self._open()
            deadline: float | None = None  # set only once the turn was found taken
            pause = 0.0001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if deadline is None:
                        deadline = time.monotonic() + self.wait_s
                    elif time.monotonic() >= deadline:
                        logger.warning(
                            "no turn at the index within %.0f s (%s held); writing without",
                            self.wait_s,
                            self.path,
                        )
                        return None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.001)
        except OSError as exc:
            logger.warning("receivers cannot take turns at the index (%s): %s", self.path, exc)
            self.enabled = False
            return None

    def _open(self) -> int:
        with self._opening:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
            return self._fd

    def close(self) -> None:
        with self._opening:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _after_fork(self) -> None:
        # A forked child shares the open file, and with it the parent's turn: its unlock
        # would end the parent's. Closing the child's copy leaves the parent's alone.
        self._opening = threading.Lock()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


_TURNS: weakref.WeakSet[WriterTurn] = weakref.WeakSet()


def _forget_turns_in_child() -> None:
    for turn in list(_TURNS):
        turn._after_fork()


os.register_at_fork(after_in_child=_forget_turns_in_child)


def writer_turn(engine: Engine) -> WriterTurn | None:
    """A :class:`WriterTurn` for an SQLite file database; None where the server arbitrates."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    return WriterTurn(Path(f"{database}-writer.lock"))


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic ``upgrade head``)."""
    config = Config(str(_ALEMBIC_INI))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot migrate the database at {engine.url!r}: {exc}") from exc


def open_database(url: str, run_migrations: bool = True) -> Engine:
    engine = make_engine(url)
    if run_migrations:
        migrate(engine)
    return engine
