from __future__ import annotations

import gc
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom.config
import pytest
from sqlalchemy import Engine

from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from pacs_ai.storage.db import make_engine, open_database
from tests.databases import (
    MODE_ENV,
    MODES,
    TEST_DATABASE,
    THROWAWAY,
    database_params,
    empty_database,
    node_database,
    on_postgresql,
    postgres_database,
)
from tests.peers import DCMTK, ORTHANC, NodeProcess, OrthancProcess
from tests.web import Remote, remote_node

# pytest-xdist's workers start with COLUMNS=80 and LINES=24 from execnet; the CLI's consoles
# take their width from COLUMNS when first imported, and every node and CLI a test starts
# inherits them. Without xdist neither is set: remove both so a test sees the same either way.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("COLUMNS", "LINES"):
        os.environ.pop(_name, None)

REQUIRED_TOOLS = [DCMTK / "storescu", DCMTK / "echoscu", ORTHANC, DCMTK / "dciodvfy"]


def pytest_configure(config: pytest.Config) -> None:
    # Real files carry odd values; reading them must not turn into test errors.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    if TEST_DATABASE not in MODES:
        raise pytest.UsageError(f"{MODE_ENV}={TEST_DATABASE!r}: expected one of {MODES}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the files with the most slow tests first.

    ``make test`` hands whole files (``--dist loadfile``), in this order, to whichever of its
    two workers is free (``--no-loadscope-reorder``; xdist's own order puts the files with
    the most tests first, which left a long file of node and Orthanc tests for the end while
    the other worker had nothing to do). The many quick files then fill in at the end. A run
    without xdist keeps the files' usual order.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    collected = {path: n for n, path in enumerate(dict.fromkeys(item.path for item in items))}
    # Stable: a file's tests stay together and in their order.
    items.sort(key=lambda item: (-slow[item.path], collected[item.path]))


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [str(t) for t in REQUIRED_TOOLS if not t.exists()]
    if missing:
        raise pytest.UsageError(
            f"missing real peers {missing}: run `make test` (it installs them) or "
            "`bash deploy/install-system-deps.sh` as root"
        )
    # Asked for PostgreSQL everywhere, a missing server is an error, not hundreds of skips.
    if on_postgresql() and (why := THROWAWAY.reachable()):
        raise pytest.UsageError(f"{MODE_ENV}=postgresql, but {why}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    THROWAWAY.drop_all()


@pytest.fixture(autouse=True)
def _drop_test_databases() -> Iterator[None]:
    """Drop the PostgreSQL databases made during this test once its fixtures are torn down.

    Autouse, so set up before the test's other function-scoped fixtures and torn down after
    them: its nodes are stopped (or were killed) by then. A node's database outlives its
    restarts within the test; module-scoped fixtures' databases go at the end of the session.
    """
    mark = THROWAWAY.mark()
    yield
    if on_postgresql() and THROWAWAY.mark() > mark:
        # An engine the test did not dispose holds connections in a reference cycle; collected
        # here, psycopg's "deleted while still open" fails this test, not whichever test the
        # collector happens to run in next.
        gc.collect()
    THROWAWAY.drop_since(mark)


@pytest.fixture(scope="session")
def chest_ct(tmp_path_factory: pytest.TempPathFactory) -> ChestTruth:
    """A three-series chest CT study: scout, 300 axial 512x512 slices, 150 lung-kernel slices."""
    return write_chest_ct(tmp_path_factory.mktemp("chest_ct"), Geometry(slices=300), seed=1)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[type[NodeProcess]]:
    started: list[NodeProcess] = []

    class _Node(NodeProcess):
        def start(self) -> NodeProcess:
            started.append(self)
            return super().start()

    yield _Node
    for node in started:
        node.stop()


@pytest.fixture
def node(node_factory: type[NodeProcess], tmp_path: Path) -> NodeProcess:
    return node_factory(tmp_path / "node").start()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[type[OrthancProcess]]:
    started: list[OrthancProcess] = []

    class _Orthanc(OrthancProcess):
        def start(self) -> OrthancProcess:
            started.append(self)
            return super().start()

    yield _Orthanc
    for orthanc in started:
        orthanc.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    with postgres_database() as url:
        yield url


@pytest.fixture
def database_url() -> Iterator[str]:
    """A node's ``[database] url`` for this run: empty (SQLite in its data dir) or PostgreSQL."""
    with node_database() as url:
        yield url


@pytest.fixture(params=database_params())
def bare_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty, unmigrated index database: SQLite and PostgreSQL (the migration tests)."""
    with empty_database(request.param, tmp_path) as url:
        eng = make_engine(url)
        yield eng
        eng.dispose()


@pytest.fixture(params=database_params())
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated index database: SQLite and PostgreSQL, or only PostgreSQL in that mode."""
    with empty_database(request.param, tmp_path) as url:
        eng = open_database(url)
        yield eng
        if request.param != "sqlite":
            # A recorder keeps a connection between batches and gives it back when closed
            # or collected; one caught in a reference cycle (an exception it raised holds
            # its frame) is collected only by the cycle collector, and a PostgreSQL
            # connection collected after its pool was disposed warns that it was left open.
            gc.collect()
        eng.dispose()


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    """A node reachable only over HTTP and its broker, as a worker elsewhere sees it."""
    with remote_node(tmp_path) as node:
        yield node
