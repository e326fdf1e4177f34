from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom.config
import pytest
from sqlalchemy import Engine

from pacs_ai.phantoms.chest_ct import ChestTruth, Geometry, write_chest_ct
from pacs_ai.storage.db import open_database
from tests.databases import postgres_database
from tests.peers import DCMTK, ORTHANC, NodeProcess, OrthancProcess

REQUIRED_TOOLS = [DCMTK / "storescu", DCMTK / "echoscu", ORTHANC, DCMTK / "dciodvfy"]


def pytest_configure(config: pytest.Config) -> None:
    # Real files carry odd values; reading them must not turn into test errors.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [str(t) for t in REQUIRED_TOOLS if not t.exists()]
    if missing:
        raise pytest.UsageError(
            f"missing real peers {missing}: run `make test` (it installs them) or "
            "`bash deploy/install-system-deps.sh` as root"
        )


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


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated index database: SQLite, and PostgreSQL where one is reachable."""
    if request.param == "sqlite":
        eng = open_database(f"sqlite:///{tmp_path / 'index.sqlite3'}")
        yield eng
        eng.dispose()
        return
    with postgres_database() as url:
        eng = open_database(url)
        yield eng
        eng.dispose()
