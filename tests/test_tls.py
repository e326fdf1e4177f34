"""DICOM TLS (PS3.15 BCP 195) with real dcmtk tools: receiving on the TLS port with client
certificates, refusing what BCP 195 excludes, and calling a TLS peer.

Certificates come from a throw-away CA made with the openssl command line.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from pacs_ai.config import PeerSettings, TlsSettings
from pacs_ai.dicom import scu
from pacs_ai.dicom.tls import client_context, for_peer
from pacs_ai.errors import NetworkError
from tests.peers import DCMTK, TOOL_ENV, NodeProcess, dcmtk, free_port, wait_for
from tests.realdata import real_file

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _issue(folder: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
        "-out", str(ca), "-days", "2", "-subj", "/CN=pacs-ai test CA",
    )  # fmt: skip
    server_cert, server_key = _issue(
        folder, "server", ca, ca_key, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    client_cert, client_key = _issue(folder, "client", ca, ca_key, "extendedKeyUsage=clientAuth\n")
    return Pki(ca, server_cert, server_key, client_cert, client_key)


def _tls_toml(pki: Pki, port: int, verify_clients: bool = True) -> str:
    return (
        "[tls]\n"
        f"port = {port}\n"
        f'certificate = "{pki.server_cert}"\n'
        f'private_key = "{pki.server_key}"\n'
        f'ca_certificates = "{pki.ca}"\n'
        f"verify_clients = {'true' if verify_clients else 'false'}\n"
        "handshake_timeout_s = 6\n"
    )


@pytest.fixture
def tls_node(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> NodeProcess:
    tls_port = free_port()
    # Two receiver processes by default: the TLS port is then a socket the node opens and
    # shares, the path a hospital's multi-core node takes. One receiver binds the port itself
    # (a one-core host); tests ask for that with indirect parametrization.
    receivers = getattr(request, "param", 2)
    node = NodeProcess(tmp_path / "node", receivers=receivers, extra_toml=_tls_toml(pki, tls_port))
    node.tls_port = tls_port  # type: ignore[attr-defined]
    node.start()
    yield node  # type: ignore[misc]
    node.stop()


def _tls_args(pki: Pki) -> list[str]:
    return ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]


@pytest.mark.parametrize("tls_node", [1, 2], indirect=True, ids=["own-port", "shared-port"])
def test_echoscu_and_storescu_over_tls(tls_node: NodeProcess, pki: Pki) -> None:
    port = str(tls_node.tls_port)  # type: ignore[attr-defined]
    echo = dcmtk("echoscu", *_tls_args(pki), "-aec", "PACSAI", "127.0.0.1", port)
    assert echo.returncode == 0, echo.stderr
    files = [real_file("CT_small.dcm"), real_file("MR_small.dcm")]
    store = dcmtk(
        "storescu", *_tls_args(pki), "-aec", "PACSAI", "127.0.0.1", port, *map(str, files)
    )
    assert store.returncode == 0, store.stderr
    # The node's own CLI calls over TLS with the node's certificate (mutual TLS).
    cli = tls_node.cli("echo", f"PACSAI@127.0.0.1:{port}", "--tls")
    assert cli.returncode == 0, cli.stderr
    assert tls_node.cli("echo", f"PACSAI@127.0.0.1:{port}", "--timeout", "5").returncode == 1
    for source in files:
        kept = tls_node.stored_path(source)
        assert kept.exists()
        assert dcmread(kept).SOPInstanceUID == dcmread(source).SOPInstanceUID


def test_tls_port_refuses_what_bcp195_excludes(tls_node: NodeProcess, pki: Pki) -> None:
    port = tls_node.tls_port  # type: ignore[attr-defined]
    peer = PeerSettings(name="node", ae_title="PACSAI", host="127.0.0.1", port=port, tls=True)
    # 1. No client certificate while the node requires one: no association.
    anonymous = client_context(TlsSettings(ca_certificates=pki.ca))
    with pytest.raises(NetworkError):
        scu.echo(peer, "ANON", timeout_s=5, tls=anonymous)
    wait_for(lambda: _refusals(tls_node) == 1, 10, "the node to refuse the anonymous client")
    # 2. TLS 1.1 is refused at the handshake, even by a client that would accept it.
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():  # Python rightly frowns on TLS 1.1; we want the attempt
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        old.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5),
            do_handshake_on_connect=False,
        ) as wrapped,
        pytest.raises(ssl.SSLError),
    ):
        wrapped.do_handshake()
    # The node saw the attempt and refused it (not only our client giving up by itself).
    wait_for(lambda: _refusals(tls_node) == 2, 10, "the node to refuse TLS 1.1")
    assert "UNSUPPORTED_PROTOCOL" in tls_node.log.read_text().upper()
    # 3. Plain DICOM on the TLS port gets no association.
    plain = PeerSettings(name="node", ae_title="PACSAI", host="127.0.0.1", port=port)
    with pytest.raises(NetworkError):
        scu.echo(plain, "PLAIN", timeout_s=5)
    # The plain port still answers plain DICOM.
    plain_port = PeerSettings(name="n", ae_title="PACSAI", host="127.0.0.1", port=tls_node.port)
    assert scu.echo(plain_port, "PLAIN", timeout_s=5) == 0
    wait_for(lambda: _refusals(tls_node) == 3, 10, "the node to refuse plain DICOM on TLS")


def _refusals(node: NodeProcess) -> int:
    return node.log.read_text().count("TLS handshake with 127.0.0.1 failed")


def test_a_peer_stalling_the_handshake_does_not_block_others(
    tls_node: NodeProcess, pki: Pki
) -> None:
    port = tls_node.tls_port  # type: ignore[attr-defined]
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        started = time.monotonic()
        echo = dcmtk("echoscu", *_tls_args(pki), "-aec", "PACSAI", "127.0.0.1", str(port))
        assert echo.returncode == 0, echo.stderr
        # Served while the stalled ones still wait out their 6 s handshake timeout.
        assert time.monotonic() - started < 4
        # And the stalled connections are dropped once the timeout has passed.
        for sock in stalled:
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in stalled:
            sock.close()


def test_node_calls_a_tls_peer_with_its_certificate(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    # -rc: storescp requires and verifies the node's client certificate.
    tls_server = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), "-rc"]
    storescp = subprocess.Popen(
        [str(DCMTK / "storescp"), *tls_server, "-aet", "TLSPACS", "-od", str(received), str(port)],
        env=TOOL_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tls = TlsSettings(
            certificate=pki.client_cert, private_key=pki.client_key, ca_certificates=pki.ca
        )
        peer = PeerSettings(name="p", ae_title="TLSPACS", host="127.0.0.1", port=port, tls=True)
        wait_for(lambda: _echo_ok(peer, tls), 20, "storescp +tls")
        report = scu.SendReport()
        files = scu.scan([real_file("CT_small.dcm")], report)
        scu.send(files, peer, "PACSAI", report=report, tls=for_peer(tls, peer))
        assert report.ok, report.failures
        assert len(list(received.iterdir())) == 1
        # Without the node's certificate the peer refuses it.
        anonymous = TlsSettings(ca_certificates=pki.ca)
        with pytest.raises(NetworkError):
            scu.echo(peer, "PACSAI", timeout_s=5, tls=for_peer(anonymous, peer))
    finally:
        storescp.terminate()
        storescp.wait(10)


def _echo_ok(peer: PeerSettings, tls: TlsSettings) -> bool:
    try:
        return scu.echo(peer, "PACSAI", timeout_s=5, tls=for_peer(tls, peer)) == 0
    except NetworkError:
        return False


def test_tls_settings_name_what_is_missing(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs certificate and private_key"):
        TlsSettings(port=2762)
    with pytest.raises(ValidationError, match="is not a readable file"):
        TlsSettings(port=2762, certificate=tmp_path / "missing.pem", private_key=tmp_path / "k.pem")
    with pytest.raises(ValidationError, match="needs ca_certificates"):
        TlsSettings(verify_clients=True)
