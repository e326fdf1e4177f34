"""``pacs-ai``: run and inspect the node.

Each command reads the configuration once (``--config`` / ``PACS_AI_CONFIG`` /
``./pacs-ai.toml``) and passes it down. Listings take ``--json`` for scripts.
Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration.

The commands that inspect and act on a node's records (studies, jobs, deliveries, rules,
status, worklist, reviews) live in :mod:`pacs_ai.commands`; with ``--url`` and ``--token``
(or ``PACS_AI_URL``, ``PACS_AI_TOKEN``) they ask a node over HTTP instead of the local
database, and print the same.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pacs_ai import __version__
from pacs_ai.commands import records, rules, status, worklist
from pacs_ai.commands.common import (
    ConfigOption,
    JsonOption,
    TokenOption,
    UrlOption,
    err,
    open_admin,
    out,
    refused_as_exit,
)
from pacs_ai.commands.common import dump as _dump
from pacs_ai.commands.common import fail as _fail
from pacs_ai.commands.common import open_engine as _engine
from pacs_ai.commands.common import print_config_error as _print_config_error
from pacs_ai.commands.common import settings_from as _settings
from pacs_ai.commands.common import when as _when
from pacs_ai.config import PeerSettings, Settings, config_path, load_settings, parse_peer
from pacs_ai.errors import ConfigError, PacsAiError

app = typer.Typer(
    help="pacs-ai: a DICOM node that receives studies, runs AI models and returns the results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check the configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        out.print(f"pacs-ai {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """pacs-ai admin command."""


# --- serve ---------------------------------------------------------------------------------


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node in the foreground: DICOM listener and study assembly.

    Stop it with Ctrl-C or SIGTERM: open associations are drained first.
    """
    from pacs_ai.node import Node

    settings = _settings(config)
    with refused_as_exit():
        Node(settings, config_path=config_path(config)).run()


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[str | None, typer.Option(help="Comma-separated: infer, send.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Processes (one per GPU); threads for --queues send alone."),
    ] = None,
    node_url: Annotated[
        str | None,
        typer.Option(help="The node's HTTP URL, for a worker that shares no disk with it."),
    ] = None,
    preload: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="A model to load at start, before the first job; repeatable. "
            "Default: the models the enabled rules name.",
        ),
    ] = None,
) -> None:
    """Run a Celery worker against the configured broker: inference and/or delivery.

    On a machine that shares no disk with the node, give --node-url and a token of role
    worker in PACS_AI_WORKER__TOKEN: the worker then fetches series over WADO-RS and hands
    its results back over HTTP, and consumes only the infer queue. Such a worker has no
    rules of its own: --preload names the models to load before its first job.
    """
    import os
    import socket

    # The worker's processes read their settings themselves (spawned, not forked), so the
    # command-line choices travel as the environment overrides they are.
    path = config_path(config)
    if path is not None:
        os.environ["PACS_AI_CONFIG"] = str(path.resolve())
    if queues:
        os.environ["PACS_AI_WORKER__QUEUES"] = json.dumps([q.strip() for q in queues.split(",")])
    if device:
        os.environ["PACS_AI_WORKER__DEVICE"] = device
    if node_url:
        os.environ["PACS_AI_WORKER__NODE_URL"] = node_url
    if preload:
        os.environ["PACS_AI_WORKER__PRELOAD"] = json.dumps(preload)
    settings = _settings(None)
    unknown = set(settings.worker.queues) - {"infer", "send"}
    if unknown:
        _fail(f"unknown queue(s) {sorted(unknown)}; use infer and/or send", 2)
    # Deliveries wait on the network, not the CPU: a send-only worker runs them in threads of
    # one process. Anything that infers gets spawned pool processes (CUDA, time limits).
    send_only = settings.worker.queues == ("send",)
    key = "SEND_CONCURRENCY" if send_only else "CONCURRENCY"
    if concurrency:
        os.environ[f"PACS_AI_WORKER__{key}"] = str(concurrency)
        settings = _settings(None)
    if preload and "infer" not in settings.worker.queues:
        # A preload in the file is shared by every worker that reads it; on the command line
        # it is asked of this one, which would load nothing.
        _fail("--preload loads models for inference: add infer to --queues, or drop --preload", 2)
    if not settings.broker.url:
        _fail("no broker: set [broker] url (or PACS_AI_BROKER__URL) to the node's Redis", 2)
    from pacs_ai.node import configure_process

    configure_process(settings)
    # After the logging is set up: listing the models logs what it leaves out.
    from pacs_ai.models.registry import check_preload

    with refused_as_exit():
        check_preload(settings)
    if "infer" in settings.worker.queues:
        from pacs_ai.pipeline.memory import retain_freed_memory

        # For the pool processes Celery starts below: they run the jobs.
        retain_freed_memory(os.environ, settings.worker.retain_memory_mb)
    from workers.celery_app import app as celery_app

    pool = "threads" if send_only else "prefork"
    size = settings.worker.send_concurrency if send_only else settings.worker.concurrency
    import logging

    logging.getLogger(__name__).info(
        "worker: queues %s, %s pool of %d", ",".join(settings.worker.queues), pool, size
    )

    celery_app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(settings.worker.queues),
            "--concurrency",
            str(size),
            "--pool",
            pool,
            "--hostname",
            f"pacs-ai-{os.getpid()}@{socket.gethostname()}",
            "--loglevel",
            settings.node.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


# --- config --------------------------------------------------------------------------------


@config_app.command("check")
def config_check(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Validate the configuration and print every problem with its key."""
    source = config_path(config)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        if json_out:
            _dump(
                {
                    "valid": False,
                    "source": exc.source,
                    "problems": [{"key": k, "message": m} for k, m in exc.problems],
                }
            )
        else:
            _print_config_error(exc)
        raise typer.Exit(2) from None
    if json_out:
        _dump(
            {
                "valid": True,
                "source": str(source or "defaults"),
                "settings": settings.model_dump(mode="json"),
            }
        )
        return
    node = settings.node
    out.print(f"[green]configuration is valid[/green] ({source or 'defaults'})")
    out.print(f"  AE {node.ae_title}, DICOM port {node.dicom_port}, HTTP port {node.http_port}")
    out.print(
        f"  data dir {node.data_dir}, quiet period {node.quiet_period_s:g} s, "
        f"{node.receiver_count} receiver process(es)"
    )
    for peer in settings.peers:
        roles = "/".join(r for r, on in (("send", peer.send), ("receive", peer.receive)) if on)
        out.print(
            f"  peer {peer.name}: {peer.ae_title}@{peer.host}:{peer.port} ({roles or 'disabled'})"
        )


# --- echo / send ---------------------------------------------------------------------------


TlsOption = Annotated[
    bool,
    typer.Option(
        "--tls", help="Use DICOM TLS (certificates from [tls]); configured peers say tls = true."
    ),
]


def _with_tls(peer: PeerSettings, tls: bool) -> PeerSettings:
    return peer.model_copy(update={"tls": True}) if tls else peer


@app.command()
def echo(
    target: Annotated[str, typer.Argument(help="AE@host:port, or the name of a configured peer.")],
    config: ConfigOption = None,
    calling_ae: Annotated[
        str | None, typer.Option(help="Our AE title; default node.ae_title.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer.")] = 10.0,
    tls: TlsOption = False,
) -> None:
    """C-ECHO a peer."""
    from pacs_ai.dicom.scu import echo as c_echo
    from pacs_ai.dicom.tls import for_peer

    settings = _settings(config)
    try:
        peer = _with_tls(parse_peer(target, settings), tls)
        start = time.perf_counter()
        status = c_echo(
            peer, calling_ae or settings.node.ae_title, timeout, for_peer(settings.tls, peer)
        )
    except PacsAiError as exc:
        _fail(str(exc))
    took = (time.perf_counter() - start) * 1000
    if status != 0:
        _fail(f"{peer.ae_title} answered C-ECHO with status 0x{status:04X}")
    out.print(f"C-ECHO {peer.ae_title}@{peer.host}:{peer.port}: success ({took:.0f} ms)")


@app.command()
def send(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders (walked recursively).", exists=True)
    ],
    to: Annotated[
        str, typer.Option("--to", help="AE@host:port, or the name of a configured peer.")
    ],
    config: ConfigOption = None,
    associations: Annotated[int, typer.Option(min=1, max=16, help="Parallel associations.")] = 1,
    calling_ae: Annotated[
        str | None, typer.Option(help="Our AE title; default node.ae_title.")
    ] = None,
    json_out: JsonOption = False,
    tls: TlsOption = False,
) -> None:
    """C-STORE files to a peer, byte for byte, with a progress bar and a summary per status."""
    from pacs_ai.dicom import scu
    from pacs_ai.dicom.status import describe
    from pacs_ai.dicom.tls import for_peer

    settings = _settings(config)
    try:
        peer = _with_tls(parse_peer(to, settings), tls)
        tls_context = for_peer(settings.tls, peer)
    except PacsAiError as exc:
        _fail(str(exc), 2)
    report = scu.SendReport()
    files = scu.scan(paths, report)
    if not files:
        _fail(f"no DICOM files found under {', '.join(map(str, paths))}")
    progress = Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=json_out or not err.is_terminal,
    )
    start = time.perf_counter()
    with progress:
        task = progress.add_task("send", total=len(files))
        try:
            scu.send(
                files,
                peer,
                calling_ae or settings.node.ae_title,
                associations,
                report,
                on_sent=lambda *_: progress.advance(task),
                tls=tls_context,
            )
        except PacsAiError as exc:
            _fail(str(exc))
    took = time.perf_counter() - start
    if json_out:
        _dump({**report.as_json(), "seconds": round(took, 3)})
    else:
        table = Table(title=f"Sent to {peer.ae_title}@{peer.host}:{peer.port} in {took:.1f} s")
        table.add_column("status")
        table.add_column("meaning")
        table.add_column("files", justify="right")
        for status, n in sorted(report.by_status.items()):
            label = f"0x{status:04X}" if status >= 0 else "none"
            table.add_row(label, describe(status) if status >= 0 else "no response", str(n))
        if report.skipped:
            table.add_row("-", "skipped (not DICOM)", str(len(report.skipped)))
        out.print(table)
        for path, status, comment in report.failures[:20]:
            label = f"0x{status:04X}" if status >= 0 else "none"
            out.print(f"  failed {path}: {label} {comment}")
    if not report.ok:
        raise typer.Exit(1)


# --- tokens --------------------------------------------------------------------------------

tokens_app = typer.Typer(help="API tokens for the HTTP service (worklist, DICOMweb, admin API).")
app.add_typer(tokens_app, name="tokens", no_args_is_help=True)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help="admin, radiologist, integration or worker.")],
    name: Annotated[str, typer.Option(help="Who or what uses it (unique), e.g. dr-smith.")],
    peer: Annotated[
        str, typer.Option(help="For STOW-RS senders: the [[peers]] name results go back to.")
    ] = "",
    config: ConfigOption = None,
) -> None:
    """Create a token. It is printed once, alone on the last line; only its hash is kept."""
    from pacs_ai.storage import tokens

    settings = _settings(config)
    if peer and settings.peer(peer) is None:
        names = ", ".join(p.name for p in settings.peers) or "none configured"
        _fail(f"--peer {peer!r} is not a configured peer ({names})", 2)
    engine = _engine(settings)
    try:
        token = tokens.create(engine, name, role, time.time(), peer=peer)
    except PacsAiError as exc:
        _fail(str(exc), 2)
    _audit_token_change(engine, settings, "created", name, role)
    err.print(f"token {name!r} ({role}) created; store it now, it cannot be shown again:")
    sys.stdout.write(token + "\n")


@tokens_app.command("list")
def tokens_list(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Tokens by name and role (never the tokens themselves)."""
    with open_admin(config, url, token) as node:
        rows = node.tokens_list()
    if json_out:
        _dump(rows)
        return
    table = Table("name", "role", "peer", "created", "last used", "revoked")
    for r in rows:
        table.add_row(
            r["name"],
            r["role"],
            r["peer"] or "-",
            _when(r["created_at"]),
            _when(r["last_used_at"]),
            _when(r["revoked_at"]),
        )
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(name: str, config: ConfigOption = None) -> None:
    """Revoke a token by name; it stops working at once and stays listed as revoked."""
    from pacs_ai.storage import tokens

    settings = _settings(config)
    engine = _engine(settings)
    try:
        tokens.revoke(engine, name, time.time())
    except PacsAiError as exc:
        _fail(str(exc))
    _audit_token_change(engine, settings, "revoked", name, "")
    out.print(f"token {name!r} revoked")


def _audit_token_change(engine: Any, settings: Settings, change: str, name: str, role: str) -> None:
    import getpass

    from pacs_ai.audit.events import AuditEvent, Kind
    from pacs_ai.audit.trail import Auditor

    with Auditor(engine, settings) as auditor:
        auditor.record(
            AuditEvent(
                Kind.SECURITY_ATTRIBUTES_CHANGED,
                actor=getpass.getuser(),
                target=f"token:{name}",
                detail={"change": change, **({"role": role} if role else {})},
            )
        )


# --- retention -----------------------------------------------------------------------------


@app.command()
def purge(
    config: ConfigOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
    keep_days: Annotated[
        float | None, typer.Option(min=0, help="Override retention.keep_days.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Remove source images of studies whose results are delivered ([retention] policy).

    Never before: every job must have ended and every delivery be DONE, and nothing may have
    arrived for keep_days. Index rows, results, reviews and the audit trail stay.
    """
    from pacs_ai.audit.trail import Auditor
    from pacs_ai.storage import retention
    from pacs_ai.storage.spool import Spool

    settings = _settings(config)
    if keep_days is not None:
        settings = settings.model_copy(
            update={"retention": settings.retention.model_copy(update={"keep_days": keep_days})}
        )
    engine = _engine(settings)
    now = time.time()
    if dry_run:
        found = retention.candidates(engine, settings, now)
    else:
        with Auditor(engine, settings) as auditor:
            spool = Spool(settings.node.data_dir, 0)
            found = retention.purge(engine, settings, spool, now, auditor)
    if json_out:
        _dump({"dry_run": dry_run, "studies": [vars(p) for p in found]})
        return
    verb = "would purge" if dry_run else "purged"
    total = sum(p.bytes for p in found)
    for p in found:
        out.print(f"{verb} {p.study_instance_uid}: {p.instances} instances")
    out.print(f"{verb} {len(found)} studies, {total / 2**20:.1f} MiB")


# --- audit ---------------------------------------------------------------------------------

audit_app = typer.Typer(help="The audit trail (append-only).")
app.add_typer(audit_app, name="audit", no_args_is_help=True)


@audit_app.command("export")
def audit_export(
    config: ConfigOption = None,
    since: Annotated[
        str | None,
        typer.Option(help="Oldest event: YYYY-MM-DD, an ISO time (UTC), or UNIX seconds."),
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="Only this kind, e.g. instances-received.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or csv.")] = "json",
    out_file: Annotated[Path | None, typer.Option("--out", help="Write here, not stdout.")] = None,
) -> None:
    """Export the audit trail (who sent, viewed, reviewed, changed what; security alerts)."""
    from pacs_ai.audit import trail
    from pacs_ai.export import csv_text

    if fmt not in ("json", "csv"):
        _fail(f"--format {fmt!r}: use json or csv", 2)
    if kind is not None and kind not in trail.kinds():
        _fail(f"--kind {kind!r}: use one of {', '.join(trail.kinds())}", 2)
    start = _parse_since(since) if since else None
    rows = trail.rows(_engine(_settings(config)), start, kind)
    if fmt == "json":
        text = json.dumps(rows, indent=2) + "\n"
    else:
        text = csv_text(({**r, "detail": json.dumps(r["detail"])} for r in rows), trail.COLUMNS)
    if out_file is None:
        sys.stdout.write(text)
    else:
        out_file.write_text(text, encoding="utf-8")
        err.print(f"{len(rows)} audit events written to {out_file}")


def _parse_since(value: str) -> float:
    from pacs_ai.errors import InvalidArgument
    from pacs_ai.export import parse_since

    try:
        return parse_since(value)
    except InvalidArgument as exc:
        _fail(f"--since: {exc}", 2)


# --- the records: studies, jobs, deliveries, rules, status, worklist (pacs_ai/commands) ---

app.command("status")(status.status)
app.command("worklist")(worklist.worklist)
app.add_typer(records.studies_app, name="studies")
app.add_typer(rules.rules_app, name="rules")
app.add_typer(records.jobs_app, name="jobs")
app.add_typer(records.deliveries_app, name="deliveries")
app.add_typer(worklist.reviews_app, name="reviews")


def main() -> None:
    app()
