"""DICOM TLS contexts after PS3.15 Annex B BCP 195: TLS 1.2 or newer, AEAD ciphers with
forward secrecy, certificates verified against the configured CA file.

The node answers TLS on ``[tls] port`` beside (not instead of) its plain DICOM port, and
calls a peer over TLS when the peer has ``tls = true``; with a certificate configured it
presents it to such peers (mutual TLS).
"""

from __future__ import annotations

import functools
import ssl

from pacs_ai.config import PeerSettings, TlsSettings
from pacs_ai.errors import ConfigError

# BCP 195 (RFC 9325) recommended suites for TLS 1.2; TLS 1.3 suites are always allowed.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def _base(purpose: ssl.Purpose, tls: TlsSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    try:
        if tls.ca_certificates is not None:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
        if tls.certificate is not None and tls.private_key is not None:
            context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([("tls", f"cannot load the TLS certificates or key: {exc}")]) from None
    return context


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """For the TLS listener: our certificate; client certificates required when configured."""
    context = _base(ssl.Purpose.CLIENT_AUTH, tls)
    context.verify_mode = ssl.CERT_REQUIRED if tls.verify_clients else ssl.CERT_NONE
    return context


@functools.cache
def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """For calling a TLS peer: its certificate is verified (CA file, else the system's).

    Built once per settings and process (reading the key and certificates each delivery
    would cost more than the handshake); a renewed certificate needs a restart.
    """
    return _base(ssl.Purpose.SERVER_AUTH, tls)


def for_peer(tls: TlsSettings, peer: PeerSettings) -> ssl.SSLContext | None:
    """The client context to call ``peer`` with, or None when it takes plain DICOM."""
    return client_context(tls) if peer.tls else None
