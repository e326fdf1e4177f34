"""Settings: one typed object built once per process from a TOML file and ``PACS_AI_*``.

Precedence, highest first: environment variables, the TOML file, the defaults below.
Nested keys use a double underscore in the environment: ``PACS_AI_NODE__DICOM_PORT=11113``
overrides ``[node] dicom_port``; ``PACS_AI_PEERS`` takes the whole peer list as JSON.

The file is found by ``--config``, else ``$PACS_AI_CONFIG``, else ``./pacs-ai.toml`` if it
exists; with none of them the defaults describe a working node.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pacs_ai.errors import ConfigError
from pacs_ai.pipeline.route import DEFAULT_RULES, RuleSettings

CONFIG_ENV = "PACS_AI_CONFIG"
DEFAULT_CONFIG_FILE = "pacs-ai.toml"


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE is 16 characters of the default repertoire without backslash or
    # control characters; leading and trailing spaces are not significant.
    title = value.strip()
    if not title:
        raise ValueError("an AE title must not be empty or only spaces")
    if len(title) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    if "\\" in title or any(ord(c) < 0x20 or ord(c) > 0x7E for c in title):
        raise ValueError(f"AE title {title!r} may hold only printable ASCII without backslash")
    return title


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSettings(_Section):
    """``[node]``: who the node is on the network and how it receives."""

    ae_title: AETitle = "PACSAI"
    dicom_port: Port = 11112
    http_port: Port = 8080
    data_dir: Path = Path("./pacs-ai-data")
    quiet_period_s: float = Field(30.0, gt=0, le=86400)
    # Address the DICOM listener binds to; hospitals need every interface, tests use loopback.
    bind: str = "0.0.0.0"
    # Receiver processes sharing the DICOM port's socket; 0 means one per CPU, at most 4.
    receivers: int = Field(0, ge=0, le=64)
    max_associations: int = Field(32, ge=1, le=1024)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    # With false, any calling AE may store; with true only peers with send = true, from their host.
    require_known_peers: bool = False
    # Reject associations whose Called AE Title is not ours.
    check_called_ae: bool = True
    # Seconds a stopping node waits for open associations to finish before aborting them.
    drain_timeout_s: float = Field(10.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def receiver_count(self) -> int:
        if self.receivers:
            return self.receivers
        return max(1, min(4, os.cpu_count() or 1))


class StorageSettings(_Section):
    """``[storage]``: the spool on disk."""

    # Below this much free space the node answers 0xA700 and refuses new associations.
    reserve_mb: float = Field(1024.0, ge=0)


class TlsSettings(_Section):
    """``[tls]``: DICOM TLS (PS3.15 BCP 195, TLS 1.2+), for receiving and for calling peers."""

    # A TLS listener on this port beside the plain one; 0 means none (2762 is DICOM-TLS's).
    port: int = Field(0, ge=0, le=65535)
    certificate: Path | None = None
    private_key: Path | None = None
    # PEM file of the CAs whose certificates we trust: clients' (verify_clients) and peers'.
    ca_certificates: Path | None = None
    # Require and verify a client certificate on the TLS listener.
    verify_clients: bool = False
    # A peer that connects but does not finish the TLS handshake is dropped after this long.
    handshake_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.port and (self.certificate is None or self.private_key is None):
            raise ValueError("a TLS port needs certificate and private_key (PEM files)")
        if self.verify_clients and self.ca_certificates is None:
            raise ValueError("verify_clients = true needs ca_certificates (a PEM file of CAs)")
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together; set both or neither")
        for name in ("certificate", "private_key", "ca_certificates"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a readable file")
        return self


class AuditSettings(_Section):
    """``[audit]``: the audit trail (always in the database) and its optional syslog copy."""

    enabled: bool = True
    # IHE ATNA audit repository: "udp://host:514" (RFC 5424 messages over RFC 5426 UDP).
    syslog: str = Field("", pattern=r"^(udp://(\[[0-9A-Fa-f:]+\]|[^:/\s]+):\d{1,5})?$")
    # AuditSourceID in the messages; empty means node.ae_title.
    source_id: str = ""


class RetentionSettings(_Section):
    """``[retention]``: when source images may leave the spool (``pacs-ai purge``).

    A study's sources are removed only when every job on it has ended (DELIVERED, SKIPPED or
    CANCELED; FAILED only with ``purge_failed``), every delivery and forward is DONE, and
    nothing arrived for ``keep_days``. With ``require_commitment``, every delivery made to a
    peer with ``storage_commitment = true`` must also be COMMITTED by that peer. Index rows,
    results (SEG/SR), reviews and the audit trail stay.
    """

    # pacs-ai serve purges by itself every interval_h hours; otherwise only `pacs-ai purge`.
    automatic: bool = False
    keep_days: float = Field(30.0, ge=0)
    interval_h: float = Field(1.0, gt=0)
    # Purge studies whose jobs FAILED too (their results will never be delivered), and those
    # whose storage commitment FAILED or went UNANSWERED.
    purge_failed: bool = False
    # Keep the sources until each storage commitment requested for the study's deliveries
    # (results and forwards) is answered COMMITTED (DICOM Storage Commitment, PS3.4 Annex J).
    require_commitment: bool = False


class DatabaseSettings(_Section):
    """``[database]``: the index. Empty url means SQLite in the data dir."""

    url: str = ""


class HttpSettings(_Section):
    """``[http]``: the HTTP service (worklist page, DICOMweb, admin API, metrics).

    It listens on ``node.bind`` and ``node.http_port``. Put it behind a TLS-terminating
    reverse proxy in production (README, "HTTP and TLS").
    """

    enabled: bool = True
    # Origins a browser viewer may call the API from (CORS); empty allows none.
    cors_origins: tuple[str, ...] = ()
    # Largest STOW-RS request body accepted, in MiB.
    max_upload_mb: float = Field(2048.0, gt=0)
    # Failed authentications one client address may make per minute before it gets 429.
    auth_failures_per_minute: int = Field(20, ge=1)
    # Seconds between refreshes of the worklist page.
    worklist_refresh_s: float = Field(10.0, gt=0)
    # Mark the session cookie Secure (set true when users reach the node over HTTPS).
    secure_cookies: bool = False


class BrokerSettings(_Section):
    """``[broker]``: the Celery broker. Empty url: ``pacs-ai serve`` runs its own Redis."""

    url: str = ""


class WorkerSettings(_Section):
    """``[worker]``: inference workers (Celery), in the node or on other machines."""

    # pacs-ai serve starts worker processes of its own (the embedded default): one for the
    # infer queue and one for the send queue, when both are listed.
    embedded: bool = True
    queues: tuple[str, ...] = ("infer", "send")
    concurrency: int = Field(1, ge=1, le=64)
    # A worker of the send queue alone (the node's own, beside its inference worker) runs its
    # deliveries in threads: this many at once, so a PACS that stalls until its timeout holds
    # one of them, not the results for every other destination.
    send_concurrency: int = Field(4, ge=1, le=64)
    # "auto": cuda:0 when a GPU is present, else cpu.
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    max_attempts: int = Field(3, ge=1, le=20)
    # A job running longer is killed (Celery hard time limit).
    task_time_limit_s: float = Field(1800.0, gt=0)
    # A running job renews its lease every lease_s / 3; one whose worker died is taken back
    # by the reconciler once its lease has run out.
    lease_s: float = Field(60.0, gt=0)
    # How long a QUEUED job may wait after enqueueing before the reconciler sends it again.
    requeue_after_s: float = Field(600.0, gt=0)
    reconcile_interval_s: float = Field(10.0, gt=0)
    # A worker on a machine that shares no disk with the node: the node's HTTP URL and a
    # token of role "worker" (`pacs-ai tokens create --role worker NAME`). It fetches series
    # over WADO-RS and hands results back over the node's worker API. Empty: this machine's
    # database and spool.
    node_url: str = Field("", pattern=r"^(|https?://[^\s/@]+(/\S*)?)$")
    token: str = Field("", repr=False)
    # The models a worker loads when it starts, before its first job. Empty: those the
    # enabled rules name. A worker on another machine usually has no rules of its own (they
    # live on the node): name its models here, or its first job pays for the load. The names
    # are checked when `pacs-ai worker` starts (pacs_ai.models.registry.check_preload).
    preload: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    # Freed memory an inference worker keeps for its next job instead of giving it back to
    # the kernel (pacs_ai.pipeline.memory): a later job skips the page faults of its large
    # arrays (about 1 s of a 300-slice CT on a small machine). 0: give everything back.
    retain_memory_mb: int = Field(2048, ge=0, le=1 << 20)
    # While a study's quiet period runs, the node asks a worker to read each series a rule
    # will run a model on, and build its volume (pacs_ai.pipeline.prepare): the job that comes
    # with the completion finds it ready, if no file of the series changed since. The most
    # memory a worker process holds for such series (about 6 bytes per voxel of 16-bit CT:
    # 470 MB for 300 slices of 512x512). 0: no preparation; each job reads its series itself.
    prepare_mb: int = Field(2048, ge=0, le=1 << 20)

    @model_validator(mode="before")
    @classmethod
    def _remote_queues(cls, data: Any) -> Any:
        # A remote worker can only run inference: deliveries read the node's files.
        if isinstance(data, dict) and data.get("node_url") and "queues" not in data:
            return {**data, "queues": ("infer",)}
        return data

    @model_validator(mode="after")
    def _remote_needs(self) -> WorkerSettings:
        if self.node_url and "send" in self.queues:
            raise ValueError(
                "a worker with node_url set cannot consume the 'send' queue (deliveries read "
                "the node's own files); give it queues = [\"infer\"] and let the node's "
                "embedded worker, or a worker on the node's machine, consume 'send'"
            )
        if self.node_url and not self.token:
            raise ValueError(
                "node_url needs a token of role worker: `pacs-ai tokens create --role worker "
                "NAME` on the node, then set worker.token or PACS_AI_WORKER__TOKEN"
            )
        return self


class DeliverySettings(_Section):
    """``[delivery]``: sending results and forwards to peers."""

    max_attempts: int = Field(6, ge=1, le=50)
    # First retry after this long, doubling each time (5, 10, 20, 40 ... seconds), and never
    # more than backoff_max_s apart.
    backoff_s: float = Field(5.0, gt=0)
    backoff_max_s: float = Field(3600.0, gt=0)
    # Deliveries in flight to one peer at once, across all workers. A peer that accepts the
    # connection and never answers holds this many senders until timeout_s, and the rest
    # serve the other destinations; many PACS also limit associations per calling AE.
    max_per_peer: int = Field(2, ge=1, le=64)
    timeout_s: float = Field(60.0, gt=0)


class ModelsSettings(_Section):
    """``[models]``: folders of models an administrator installed (trusted code, see README)."""

    paths: tuple[Path, ...] = ()


class PeerSettings(_Section):
    """``[[peers]]``: a PACS or modality the node talks to."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    ae_title: AETitle
    host: Annotated[str, Field(min_length=1)]
    port: Port = 104
    send: bool = True
    receive: bool = True
    # How the node sends to this peer: C-STORE, or STOW-RS at dicomweb_url.
    protocol: Literal["dimse", "dicomweb"] = "dimse"
    dicomweb_url: str = ""
    # Call this peer over DICOM TLS (its certificate checked against tls.ca_certificates).
    tls: bool = False
    # After each delivery, ask the peer to commit to keeping what it received (Storage
    # Commitment Push Model, PS3.4 Annex J). Its report may come on the request's association
    # or on a new one to the node's listener: the peer must know the node's AE, host and port.
    storage_commitment: bool = False
    # A request left unanswered this long is made again (new Transaction UID), at most
    # commitment_max_requests times in all; then the commitment is UNANSWERED.
    commitment_timeout_s: float = Field(600.0, gt=0)
    commitment_max_requests: int = Field(3, ge=1, le=20)
    # How long the request's association stays open for a report on it. Orthanc always
    # reports on a new association, so waiting there only holds the sender.
    commitment_wait_s: float = Field(0.0, ge=0, le=60)

    @model_validator(mode="after")
    def _dicomweb_needs_url(self) -> PeerSettings:
        if self.protocol == "dicomweb" and not self.dicomweb_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError('protocol = "dicomweb" needs dicomweb_url = "http(s)://host/root"')
        if self.protocol == "dicomweb" and self.storage_commitment:
            raise ValueError('storage_commitment is a DIMSE service: it needs protocol = "dimse"')
        return self


class Settings(BaseSettings):
    """The whole configuration of one node. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="PACS_AI_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    tls: TlsSettings = TlsSettings()
    audit: AuditSettings = AuditSettings()
    retention: RetentionSettings = RetentionSettings()
    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    broker: BrokerSettings = BrokerSettings()
    worker: WorkerSettings = WorkerSettings()
    delivery: DeliverySettings = DeliverySettings()
    models: ModelsSettings = ModelsSettings()
    peers: tuple[PeerSettings, ...] = ()
    # With no [[rules]] in the file the node runs DEFAULT_RULES (CT -> ct-organs-threshold).
    rules: tuple[RuleSettings, ...] = DEFAULT_RULES

    @model_validator(mode="after")
    def _unique_peer_names(self) -> Settings:
        seen: set[str] = set()
        for peer in self.peers:
            if peer.name in seen:
                raise ValueError(f"peer name {peer.name!r} is used twice; names must be unique")
            seen.add(peer.name)
        return self

    @model_validator(mode="after")
    def _rules_name_real_peers(self) -> Settings:
        names = [rule.name for rule in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("rule names must be unique")
        receivers = {p.name for p in self.peers if p.receive}
        for rule in self.rules:
            for peer in (*rule.forward, *rule.results_to):
                if peer not in receivers:
                    raise ValueError(
                        f"rule {rule.name!r} sends to {peer!r}, which is not a [[peers]] "
                        "entry with receive = true"
                    )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    # Paths derived from the data dir, in one place so every process agrees on the layout.
    @property
    def spool_dir(self) -> Path:
        return self.node.data_dir / "studies"

    @property
    def tmp_dir(self) -> Path:
        return self.node.data_dir / "tmp"

    @property
    def quarantine_dir(self) -> Path:
        return self.node.data_dir / "quarantine"

    @property
    def results_dir(self) -> Path:
        return self.node.data_dir / "results"

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.node.data_dir / 'index.sqlite3').resolve()}"

    def peer(self, name: str) -> PeerSettings | None:
        return next((p for p in self.peers if p.name == name), None)

    def peers_with_ae(self, ae_title: str) -> list[PeerSettings]:
        return [p for p in self.peers if p.ae_title == ae_title.strip()]


def config_path(explicit: str | Path | None) -> Path | None:
    """The file to read: ``--config``, else ``$PACS_AI_CONFIG``, else ``./pacs-ai.toml``."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.exists() else None


def load_settings(path: str | Path | None = None) -> Settings:
    """Read, merge and validate the configuration.

    Raises :class:`ConfigError` listing every problem, each with its key.
    """
    source = config_path(path)
    data: dict[str, Any] = {}
    if source is not None:
        data = _read_toml(source)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_problems(exc, data), str(source or "defaults")) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [("", f"file not found; create it or point --config / {CONFIG_ENV} at one")],
            str(path),
        ) from None
    except OSError as exc:
        raise ConfigError([("", f"cannot read the file: {exc.strerror}")], str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"not valid TOML: {exc}")], str(path)) from None


def _problems(exc: ValidationError, data: dict[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = [part for part in err["loc"] if not _is_validator_name(part)]
        key = _format_key(loc)
        if err["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the configuration reference"
        elif err["type"] == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], (dict, list)):
                message += f" (got {err['input']!r})"
        problems.append((key, message))
    return problems


def _is_validator_name(part: Any) -> bool:
    # pydantic puts the validator's name into the location of AfterValidator errors.
    return isinstance(part, str) and part.startswith("function-")


def _format_key(loc: list[Any]) -> str:
    key = ""
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        else:
            key += f".{part}" if key else str(part)
    return key


_AE_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@\[\]]+):(?P<port>\d{1,5})$")


def parse_peer(spec: str, settings: Settings) -> PeerSettings:
    """Turn ``AE@host:port`` or the name of a configured peer into a :class:`PeerSettings`."""
    from pacs_ai.errors import PeerAddressError

    configured = settings.peer(spec)
    if configured is not None:
        return configured
    match = _AE_ADDRESS.match(spec)
    if not match:
        names = ", ".join(p.name for p in settings.peers) or "none configured"
        raise PeerAddressError(
            f"{spec!r} is neither AE@host:port (e.g. ORTHANC@127.0.0.1:4242) "
            f"nor the name of a configured peer ({names})"
        )
    try:
        return PeerSettings(
            name="command-line",
            ae_title=match["ae"],
            host=match["host"].strip("[]"),
            port=int(match["port"]),
        )
    except ValidationError as exc:
        detail = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise PeerAddressError(f"{spec!r}: {detail}") from None
