"""The database under test: SQLite by default, a throw-away PostgreSQL one on request.

``PACS_AI_TEST_DATABASE=postgresql`` (``make test-pg``) runs every test that needs a database
on its own fresh PostgreSQL database; ``sqlite`` (the default) keeps each on SQLite in the
test's temporary folder, while the tests marked ``postgres`` still cover PostgreSQL.

The server: ``PACS_AI_TEST_PG``'s admin URL when set, used as is; else the one on
127.0.0.1:5432 with trust auth when it lets us in; else a private throw-away server
(tests/postgres_server.py) started on first use and gone with the session. Where none can be
had, the ``postgres`` tests skip with a message saying what is missing; in CI (``CI`` set) they
fail, and in PostgreSQL mode the session refuses to start.
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
from sqlalchemy import URL, Connection, Engine, create_engine, make_url, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from tests.postgres_server import PostgresServer, ServerUnavailable

MODE_ENV = "PACS_AI_TEST_DATABASE"
MODES = ("sqlite", "postgresql")
TEST_DATABASE = os.environ.get(MODE_ENV, "sqlite")
PG_ENV = "PACS_AI_TEST_PG"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
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

    Without ``admin_url``, the server is found on first use: the one at ``default_url`` if it
    lets us in, else a private one, stopped by ``close`` (at interpreter exit at the latest).
    A default server that answers but refuses us (Debian's own cluster asks for a password)
    counts as none.
    """

    def __init__(self, admin_url: str | None, default_url: str = DEFAULT_ADMIN_URL) -> None:
        self._url: URL | None = make_url(admin_url) if admin_url else None
        self._default_url = make_url(default_url)
        self._server: PostgresServer | None = None
        self._unavailable = ""  # why no server could be had, once known: tried only once
        self._admin: Engine | None = None
        self._made: dict[str, int] = {}  # live database name -> serial, for drop_since
        self._serial = 0
        atexit.register(self.close)

    @property
    def private_server(self) -> PostgresServer | None:
        """The private server started for this registry, if it had to start one."""
        return self._server

    def admin_url(self) -> URL:
        """The server's admin URL, starting a private server if need be.

        Raises ``ServerUnavailable`` when there is none and none could be started.
        """
        if self._url is not None:
            return self._url
        if self._unavailable:
            raise ServerUnavailable(self._unavailable)
        if _lets_in(self._default_url):
            self._url = self._default_url
            return self._url
        try:
            self._server = PostgresServer.start()
        except ServerUnavailable as exc:
            self._unavailable = f"no PostgreSQL at {self._default_url!r}, and {exc}"
            raise ServerUnavailable(self._unavailable) from exc
        self._url = make_url(self._server.admin_url)
        return self._url

    def _connect_admin(self) -> Connection:
        if self._admin is None:
            self._admin = create_engine(
                self.admin_url(), isolation_level="AUTOCOMMIT", poolclass=NullPool
            )
        return self._admin.connect()

    def reachable(self) -> str:
        """An empty string when the server answers, else why not."""
        try:
            with self._connect_admin() as conn:
                conn.execute(text("SELECT 1"))
        except ServerUnavailable as exc:
            return str(exc)
        except DBAPIError as exc:
            return f"no PostgreSQL at {self._url!r} ({type(exc.orig).__name__}: {exc.orig})"
        return ""

    def create(self) -> str:
        """A fresh, empty database; its URL. Skips the test without a server, outside CI."""
        name = f"{NAME_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            with self._connect_admin() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except (ServerUnavailable, DBAPIError) as exc:
            if isinstance(exc, ServerUnavailable):
                why = str(exc)
            else:
                why = f"no PostgreSQL at {self._url!r} ({type(exc.orig).__name__}); set {PG_ENV}"
            if os.environ.get("CI"):
                raise AssertionError(
                    f"PostgreSQL is required in CI and unreachable: {why}"
                ) from exc
            pytest.skip(why)
        self._made[name] = self._serial
        self._serial += 1
        return self.admin_url().set(database=name).render_as_string(hide_password=False)

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

    def close(self) -> None:
        """Drop what is left, or stop the private server (which takes everything with it)."""
        try:
            if self._server is None:
                self.drop_all()
        finally:
            if self._admin is not None:
                self._admin.dispose()
                self._admin = None
            if self._server is not None:
                self._server.stop()

    def _drop(self, names: list[str]) -> None:
        if not names:
            return
        with self._connect_admin() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                del self._made[name]


def _lets_in(url: URL) -> bool:
    """Whether the server at ``url`` answers and lets us in as its admin."""
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError:
        return False
    finally:
        engine.dispose()
    return True


THROWAWAY = ThrowawayDatabases(os.environ.get(PG_ENV) or None)


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


@contextmanager
def empty_database(param: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of the kind one of :func:`database_params` names."""
    if param == "sqlite":
        yield f"sqlite:///{tmp_path / 'index.sqlite3'}"
    else:
        with postgres_database() as url:
            yield url


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


def alembic(engine: Engine, action: Any, revision: str) -> None:
    """Run an Alembic command (``command.upgrade`` or ``command.downgrade``) to ``revision``
    on ``engine``: the migration tests' way to put a database at an older revision."""
    from alembic.config import Config

    from pacs_ai.storage import db

    config = Config(str(db._ALEMBIC_INI))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        action(config, revision)
