"""The suite's own PostgreSQL: a private throw-away server where the machine offers none.

These start the private server directly, even on a machine with a server on 5432, so that a
broken start fails here rather than only on a fresh machine.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import shutil
import socket
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from tests import postgres_server
from tests.databases import ThrowawayDatabases, read_rows
from tests.peers import free_port
from tests.postgres_server import PostgresServer


@pytest.fixture
def binaries() -> None:
    """Skips where PostgreSQL is not installed at all, outside CI; not where it is only missed."""
    installed = glob.glob("/usr/lib/postgresql/*/bin/postgres") or shutil.which("postgres")
    if not installed and not os.environ.get("CI"):
        pytest.skip("no PostgreSQL server binaries (deploy/install-system-deps.sh installs them)")


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port``, IPv4 and IPv6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(raw)))
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.postgres
@pytest.mark.usefixtures("binaries")
def test_private_server_serves_on_loopback_only_and_is_gone_after_stop() -> None:
    server = PostgresServer.start()
    try:
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
        registry = ThrowawayDatabases(server.admin_url)
        url = registry.create()
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(text("CREATE TABLE finding (id integer PRIMARY KEY, label text)"))
                conn.execute(text("INSERT INTO finding VALUES (1, 'nodule')"))
            with engine.connect() as conn:
                assert conn.execute(text("SELECT id, label FROM finding")).all() == [(1, "nodule")]
                assert conn.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
                sockets = conn.execute(text("SHOW unix_socket_directories")).scalar()
                assert sockets == str(server.folder)
        finally:
            engine.dispose()
        assert listening_addresses(server.port) == {"127.0.0.1"}
        registry.close()
    finally:
        server.stop()
    assert gone(postmaster)
    assert not server.folder.exists()
    assert listening_addresses(server.port) == set()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


@pytest.mark.postgres
@pytest.mark.usefixtures("binaries")
def test_a_private_server_is_started_when_nothing_answers_on_the_default() -> None:
    closed = free_port()
    registry = ThrowawayDatabases(
        None, f"postgresql+psycopg://postgres@127.0.0.1:{closed}/postgres"
    )
    try:
        assert registry.reachable() == ""
        server = registry.private_server
        assert server is not None
        url = registry.create()
        assert make_url(url).port == server.port != closed
        assert read_rows(url, "SELECT current_database()") == [(make_url(url).database,)]
    finally:
        registry.close()
    assert not server.folder.exists()
    assert not server.answers()


def test_without_binaries_the_message_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_server, "DEBIAN_ROOT", tmp_path)
    monkeypatch.setenv("PATH", "")  # as on a machine without Debian's postgresql
    monkeypatch.delenv("CI", raising=False)
    registry = ThrowawayDatabases(None, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x")
    with pytest.raises(pytest.skip.Exception, match="install Debian's postgresql"):
        registry.create()
    assert "install Debian's postgresql" in registry.reachable()
    monkeypatch.setenv("CI", "1")
    with pytest.raises(AssertionError, match=r"required in CI.*PACS_AI_TEST_PG"):
        registry.create()
    assert registry.private_server is None
