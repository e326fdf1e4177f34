"""The database under test: SQLite by default, a throw-away PostgreSQL one on request.

``PACS_AI_TEST_DATABASE=postgresql`` (``make test-pg``) runs every test that needs a database
on its own fresh PostgreSQL database; ``sqlite`` (the default) keeps each on SQLite in the
test's temporary folder, while the tests marked ``postgres`` still cover PostgreSQL.

The project machine runs PostgreSQL on 127.0.0.1:5432 with trust auth (``PACS_AI_TEST_PG``
points elsewhere). Where none answers, the ``postgres`` tests skip with a message saying so;
in CI (``CI`` set) they fail, and in PostgreSQL mode the session refuses to start.
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

MODE_ENV = "PACS_AI_TEST_DATABASE"
MODES = ("sqlite", "postgresql")
TEST_DATABASE = os.environ.get(MODE_ENV, "sqlite")
PG_ADMIN_URL = os.environ.get(
    "PACS_AI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
NAME_PREFIX = "pacs_ai_test_"


def on_postgresql() -> bool:
    """Whether this run puts every test's database on PostgreSQL."""
    return TEST_DATABASE == "postgresql"


class ThrowawayDatabases:
    """PostgreSQL databases made for tests, each dropped when its owner is done with it.

    A test's own databases are dropped when the test ends (``drop_since``, from an autouse
    fixture in conftest); whatever outlives that, a module-scoped node's for one, goes at the
    end of the session, or at interpreter exit outside pytest. ``WITH (FORCE)`` ends the
    connections a SIGKILLed node's children may still hold.
    """

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self._admin: Engine | None = None
        self._made: dict[str, int] = {}  # live database name -> serial, for drop_since
        self._serial = 0
        atexit.register(self.drop_all)

    def _connect_admin(self) -> Connection:
        if self._admin is None:
            self._admin = create_engine(
                self.admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool
            )
        return self._admin.connect()

    def reachable(self) -> str:
        """An empty string when the server answers, else why not."""
        try:
            with self._connect_admin() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            return f"no PostgreSQL at {self.admin_url!r} ({type(exc.orig).__name__}: {exc.orig})"
        return ""

    def create(self) -> str:
        """A fresh, empty database; its URL. Skips the test without a server, outside CI."""
        name = f"{NAME_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            with self._connect_admin() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except DBAPIError as exc:
            if os.environ.get("CI"):
                raise AssertionError(
                    f"PostgreSQL is required in CI and unreachable: {exc}"
                ) from exc
            pytest.skip(
                f"no PostgreSQL at {self.admin_url!r} ({type(exc.orig).__name__}); "
                "set PACS_AI_TEST_PG"
            )
        self._made[name] = self._serial
        self._serial += 1
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        """Drop the database at ``url`` if this registry made it and it is still there."""
        name = make_url(url).database
        if name in self._made:
            self._drop([name])

    def mark(self) -> int:
        """A point to ``drop_since``: the databases made from now on."""
        return self._serial

    def drop_since(self, mark: int) -> None:
        self._drop([name for name, serial in self._made.items() if serial >= mark])

    def drop_all(self) -> None:
        self._drop(list(self._made))

    def _drop(self, names: list[str]) -> None:
        if not names:
            return
        with self._connect_admin() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                del self._made[name]


THROWAWAY = ThrowawayDatabases(PG_ADMIN_URL)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    url = THROWAWAY.create()
    try:
        yield url
    finally:
        THROWAWAY.drop(url)


@contextmanager
def index_database(sqlite_path: Path) -> Iterator[str]:
    """The URL of an index for the code under test: ``sqlite_path``, or a fresh PostgreSQL."""
    if on_postgresql():
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{sqlite_path}"


@contextmanager
def node_database() -> Iterator[str]:
    """A node's ``[database] url``: empty (its SQLite in its data dir), or a fresh PostgreSQL."""
    if on_postgresql():
        with postgres_database() as url:
            yield url
    else:
        yield ""


def database_params() -> list[Any]:
    """Parameters of a fixture that runs its tests on each database of this run, once."""
    postgres = pytest.param("postgresql", marks=pytest.mark.postgres)
    return [postgres] if on_postgresql() else ["sqlite", postgres]


def read_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read from a node's index while it runs; none if it has no index yet.

    SQLite is opened read-only, so that looking never creates the file or holds a write lock.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.exists():
            return []
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
            return list(conn.execute(sql).fetchall())
    engine = create_engine(parsed, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()
