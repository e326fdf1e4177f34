"""Database engine and migrations: SQLite (WAL) by default, PostgreSQL by URL."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
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
    # only a crash. Group commit (storage/index.py) shares that sync between associations;
    # it cost about 10 % of ingest throughput against NORMAL in bench/ingest.py.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class WriterTurn:
    """Takes turns at writing to one SQLite index across processes, waking the next at once.

    SQLite makes a writer that finds the database locked retry on a timer: its busy handler
    sleeps 1, 2, 5, 10 ms and more between tries. Receivers in several processes commit
    hundreds of times a second, so they collided often and each collision cost at least a
    millisecond of an association's time. A process waiting on ``flock`` is woken by the
    kernel the moment the lock is released. Only the receivers' index writes take turns
    here; anything else that writes still goes through SQLite's own lock, as before.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._opening = threading.Lock()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

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
