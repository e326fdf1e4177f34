"""``pacs-ai``: run and inspect the node.

Each command reads the configuration once (``--config`` / ``PACS_AI_CONFIG`` /
``./pacs-ai.toml``) and passes it down. Listings take ``--json`` for scripts.
Exit codes: 0 success, 1 the operation failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pacs_ai import __version__
from pacs_ai.config import Settings, config_path, load_settings, parse_peer
from pacs_ai.errors import ConfigError, PacsAiError

app = typer.Typer(
    help="pacs-ai: a DICOM node that receives studies, runs AI models and returns the results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check the configuration.", no_args_is_help=True)
studies_app = typer.Typer(help="Studies the node holds.", no_args_is_help=True)
rules_app = typer.Typer(
    help="Routing rules: check them, or see why they fired.", no_args_is_help=True
)
app.add_typer(config_app, name="config")
app.add_typer(studies_app, name="studies")
app.add_typer(rules_app, name="rules")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML file; default $PACS_AI_CONFIG, then ./pacs-ai.toml."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        _print_config_error(exc)
        raise typer.Exit(2) from None


def _print_config_error(exc: ConfigError) -> None:
    err.print(f"[red]invalid configuration[/red] ({exc.source}):")
    for key, message in exc.problems:
        err.print(f"  {key or '(file)'}: {message}")


def _dump(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


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
    try:
        Node(settings, config_path=config_path(config)).run()
    except ConfigError as exc:
        _print_config_error(exc)
        raise typer.Exit(2) from None
    except PacsAiError as exc:
        _fail(str(exc))


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[str | None, typer.Option(help="Comma-separated: infer, send.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Processes (one per GPU).")] = None,
) -> None:
    """Run a Celery worker against the configured broker: inference and/or delivery."""
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
    if concurrency:
        os.environ["PACS_AI_WORKER__CONCURRENCY"] = str(concurrency)
    settings = _settings(None)
    unknown = set(settings.worker.queues) - {"infer", "send"}
    if unknown:
        _fail(f"unknown queue(s) {sorted(unknown)}; use infer and/or send", 2)
    if not settings.broker.url:
        _fail("no broker: set [broker] url (or PACS_AI_BROKER__URL) to the node's Redis", 2)
    from pacs_ai.node import configure_process

    configure_process(settings)
    from workers.celery_app import app as celery_app

    celery_app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(settings.worker.queues),
            "--concurrency",
            str(settings.worker.concurrency),
            "--pool",
            "prefork",
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


@app.command()
def echo(
    target: Annotated[str, typer.Argument(help="AE@host:port, or the name of a configured peer.")],
    config: ConfigOption = None,
    calling_ae: Annotated[
        str | None, typer.Option(help="Our AE title; default node.ae_title.")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer.")] = 10.0,
) -> None:
    """C-ECHO a peer."""
    from pacs_ai.dicom.scu import echo as c_echo

    settings = _settings(config)
    try:
        peer = parse_peer(target, settings)
        start = time.perf_counter()
        status = c_echo(peer, calling_ae or settings.node.ae_title, timeout)
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
) -> None:
    """C-STORE files to a peer, byte for byte, with a progress bar and a summary per status."""
    from pacs_ai.dicom import scu
    from pacs_ai.dicom.status import describe

    settings = _settings(config)
    try:
        peer = parse_peer(to, settings)
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


# --- studies -------------------------------------------------------------------------------


def _engine(settings: Settings) -> Any:
    from pacs_ai.storage.db import open_database

    try:
        return open_database(settings.database_url)
    except PacsAiError as exc:
        _fail(str(exc))


def _receptions(engine: Any, study_uid: str) -> list[Any]:
    from pacs_ai.storage import index

    found = index.find_studies(engine, study_uid)
    if not found:
        _fail(f"no study {study_uid} on this node (see `pacs-ai studies list`)")
    return found


@studies_app.command("list")
def studies_list(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="RECEIVING or COMPLETE.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
    json_out: JsonOption = False,
) -> None:
    """Studies held, newest first, with state and counts."""
    from pacs_ai.storage import index
    from pacs_ai.storage.schema import STUDY_STATES

    if state is not None and state.upper() not in STUDY_STATES:
        _fail(f"--state must be one of {', '.join(STUDY_STATES)}", 2)
    settings = _settings(config)
    rows = index.list_studies(_engine(settings), state.upper() if state else None, limit)
    if json_out:
        _dump([r.as_json() for r in rows])
        return
    table = Table(title=f"{len(rows)} studies")
    # UIDs are what an admin copies into the next command: never shorten them.
    table.add_column("study instance uid", no_wrap=True, min_width=20)
    for name in ("from", "state", "patient id", "accession", "date"):
        table.add_column(name, no_wrap=True)
    table.add_column("description", overflow="ellipsis", max_width=24)
    for name in ("mod", "series", "inst", "last received"):
        table.add_column(name, no_wrap=True)
    for r in rows:
        table.add_row(
            r.study_instance_uid,
            r.calling_ae,
            r.state,
            r.patient_id,
            r.accession_number,
            r.study_date,
            r.study_description,
            r.modalities,
            str(r.series_count),
            str(r.instance_count),
            _when(r.last_received_at),
        )
    out.print(table)


@studies_app.command("show")
def studies_show(
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """One study: state, counts, and its series."""
    from pacs_ai.storage import index

    engine = _engine(_settings(config))
    found = _receptions(engine, study_uid)
    if json_out:
        _dump(
            [
                {**s.as_json(), "series": [x.as_json() for x in index.list_series(engine, s.id)]}
                for s in found
            ]
        )
        return
    for s in found:
        out.print(f"[bold]Study {s.study_instance_uid}[/bold] from {s.calling_ae}: {s.state}")
        out.print(
            f"  patient id {s.patient_id or '-'}, accession {s.accession_number or '-'}, "
            f"date {s.study_date or '-'}, {s.study_description or 'no description'}"
        )
        out.print(
            f"  {s.series_count} series, {s.instance_count} instances, {s.duplicates} duplicates"
        )
        out.print(
            f"  first {_when(s.first_received_at)}, last {_when(s.last_received_at)}, "
            f"completed {_when(s.completed_at)} ({s.completions}x, reopened {s.reopened}x)"
        )
        table = Table()
        table.add_column("series instance uid", no_wrap=True, min_width=20)
        for name in ("#", "modality", "description", "body part", "instances"):
            table.add_column(name)
        for x in index.list_series(engine, s.id):
            table.add_row(
                x.series_instance_uid,
                str(x.series_number or ""),
                x.modality,
                x.series_description,
                x.body_part_examined,
                str(x.instance_count),
            )
        out.print(table)


# --- rules ---------------------------------------------------------------------------------


@rules_app.command("check")
def rules_check(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Validate the routing rules: syntax, peers, and that every model is installed."""
    from pacs_ai.errors import ModelLoadError
    from pacs_ai.models.registry import available, register_dirs

    settings = _settings(config)
    try:
        register_dirs(settings.models.paths)
    except ModelLoadError as exc:
        _fail(str(exc), 2)
    models = available()
    problems = [
        f"rule {rule.name!r}: model {model!r} is not installed (installed: {', '.join(models)})"
        for rule in settings.rules
        for model in rule.models
        if model not in models
    ]
    if json_out:
        _dump(
            {
                "valid": not problems,
                "problems": problems,
                "rules": [
                    r.model_dump(mode="json", by_alias=True, exclude_none=True)
                    for r in settings.rules
                ],
            }
        )
    else:
        for rule in settings.rules:
            state = "" if rule.enabled else " (disabled)"
            when = ", ".join(f"{k} {_condition_text(c)}" for k, c in rule.match.items()) or "always"
            does = [f"run {', '.join(rule.models)}"] if rule.models else []
            if rule.forward:
                does.append(f"forward {rule.forward_level} to {', '.join(rule.forward)}")
            out.print(
                f"rule [bold]{rule.name}[/bold]{state}: when {when} -> {'; '.join(does)} "
                f"[{rule.priority.value}], results to "
                f"{', '.join(rule.results_to) or 'the sender'}"
            )
        for problem in problems:
            err.print(f"[red]error:[/red] {problem}")
        if not problems:
            out.print(f"[green]{len(settings.rules)} rule(s) valid[/green]")
    if problems:
        raise typer.Exit(2)


def _condition_text(condition: Any) -> str:
    parts = condition.model_dump(exclude_none=True, by_alias=True)
    return " ".join(f"{op}={value}" for op, value in parts.items())


@rules_app.command("explain")
def rules_explain(
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """For each rule and series of a study: matched or not, and which condition decided."""
    from pacs_ai.pipeline.facts import series_facts
    from pacs_ai.pipeline.route import explain

    settings = _settings(config)
    engine = _engine(settings)
    receptions = _receptions(engine, study_uid)
    report = []
    for reception in receptions:
        facts = series_facts(engine, reception.id)
        for decision in explain(settings.rules, facts):
            report.append(
                {
                    "calling_ae": reception.calling_ae,
                    "series_instance_uid": decision.series_instance_uid,
                    "series_description": next(
                        f.values["SeriesDescription"]
                        for f in facts
                        if f.series_instance_uid == decision.series_instance_uid
                    ),
                    "rule": decision.rule,
                    "matched": decision.matched,
                    "conditions": [c.__dict__ for c in decision.conditions],
                }
            )
    if json_out:
        _dump(report)
        return
    for item in report:
        mark = "[green]MATCH[/green]" if item["matched"] else "[dim]no[/dim]"
        out.print(
            f"{mark} rule {item['rule']} on series {item['series_instance_uid']} "
            f"({item['series_description'] or 'no description'}) from {item['calling_ae']}"
        )
        for c in item["conditions"]:
            sign = "ok " if c["passed"] else "[red]FAIL[/red]"
            out.print(f"    {sign} {c['keyword']}: {c['reason']}")
    if not any(item["matched"] for item in report):
        out.print("no rule matches this study: it is kept, and nothing runs on it")


# --- jobs and deliveries -------------------------------------------------------------------

jobs_app = typer.Typer(help="AI jobs: one model on one series.", no_args_is_help=True)
deliveries_app = typer.Typer(
    help="Results and forwards on their way to peers.", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")
app.add_typer(deliveries_app, name="deliveries")


def _job_json(row: Any) -> dict[str, Any]:
    data = dict(row._mapping)
    data["timings"] = json.loads(data["timings"] or "{}")
    data["findings"] = json.loads(data["findings"]) if data["findings"] else None
    return data


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    state: Annotated[
        str | None, typer.Option(help="QUEUED, RUNNING, ENCODED, DELIVERED, ...")
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    json_out: JsonOption = False,
) -> None:
    """Jobs, newest first."""
    from pacs_ai.pipeline import jobs
    from pacs_ai.storage.schema import JOB_STATES

    if state is not None and state.upper() not in JOB_STATES:
        _fail(f"--state must be one of {', '.join(JOB_STATES)}", 2)
    rows = jobs.job_rows(_engine(_settings(config)), state.upper() if state else None, limit)
    if json_out:
        _dump([_job_json(r) for r in rows])
        return
    table = Table(title=f"{len(rows)} jobs")
    table.add_column("id", justify="right")
    for name in ("state", "model", "rule", "priority", "attempts"):
        table.add_column(name, no_wrap=True)
    table.add_column("series instance uid", no_wrap=True, min_width=20)
    table.add_column("reason", overflow="ellipsis", max_width=40)
    table.add_column("updated", no_wrap=True)
    for r in rows:
        table.add_row(
            str(r.id),
            r.state,
            r.model,
            r.rule,
            r.priority,
            f"{r.attempts}/{r.max_attempts}",
            r.series_instance_uid,
            r.reason,
            _when(r.updated_at),
        )
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """One job: state, timings, findings, and its deliveries."""
    from pacs_ai.pipeline import jobs

    engine = _engine(_settings(config))
    found = [r for r in jobs.job_rows(engine, limit=1_000_000) if r.id == job_id]
    if not found:
        _fail(f"no job {job_id} (see `pacs-ai jobs list`)")
    data = _job_json(found[0])
    data["deliveries"] = [dict(d._mapping) for d in jobs.delivery_rows(engine, job_id=job_id)]
    if json_out:
        _dump(data)
        return
    for key in (
        "id",
        "state",
        "reason",
        "model",
        "rule",
        "priority",
        "attempts",
        "worker",
        "study_instance_uid",
        "series_instance_uid",
        "destinations",
        "timings",
        "findings",
    ):
        out.print(f"{key:20} {data[key]}")
    for d in data["deliveries"]:
        out.print(
            f"delivery {d['id']}: {d['kind']} to {d['peer']} {d['state']} "
            f"(attempts {d['attempts']}) {d['last_error']}"
        )


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: ConfigOption = None) -> None:
    """Put a FAILED, CANCELED or SKIPPED job back in the queue (the node enqueues it)."""
    from pacs_ai.pipeline import jobs

    if not jobs.retry(_engine(_settings(config)), job_id, time.time()):
        _fail(f"job {job_id} is not FAILED, CANCELED or SKIPPED (or does not exist)")
    out.print(f"job {job_id} QUEUED; the node's reconciler sends it to a worker")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, config: ConfigOption = None) -> None:
    """Cancel a job that has not been delivered."""
    from pacs_ai.pipeline import jobs

    if not jobs.cancel(_engine(_settings(config)), job_id, time.time()):
        _fail(f"job {job_id} is already finished (or does not exist)")
    out.print(f"job {job_id} CANCELED")


@deliveries_app.command("list")
def deliveries_list(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="PENDING, SENDING, DONE, FAILED.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    json_out: JsonOption = False,
) -> None:
    """Deliveries, newest first, with the last error."""
    from pacs_ai.pipeline import jobs

    rows = jobs.delivery_rows(
        _engine(_settings(config)), state.upper() if state else None, limit=limit
    )
    if json_out:
        _dump([dict(r._mapping) for r in rows])
        return
    table = Table(title=f"{len(rows)} deliveries")
    for name in ("id", "job", "kind", "peer", "state", "attempts", "last error", "updated"):
        table.add_column(name)
    for r in rows:
        table.add_row(
            str(r.id),
            str(r.job_id or "-"),
            r.kind,
            r.peer,
            r.state,
            f"{r.attempts}/{r.max_attempts}",
            r.last_error,
            _when(r.updated_at),
        )
    out.print(table)


@deliveries_app.command("retry")
def deliveries_retry(delivery_id: int, config: ConfigOption = None) -> None:
    """Send a FAILED delivery again, with a fresh attempt budget."""
    from pacs_ai.pipeline import jobs

    if not jobs.retry_delivery(_engine(_settings(config)), delivery_id, time.time()):
        _fail(f"delivery {delivery_id} is not FAILED (or does not exist)")
    out.print(f"delivery {delivery_id} PENDING; the node's reconciler sends it")


# --- status --------------------------------------------------------------------------------


@app.command()
def status(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Node health: listener, data dir, free disk, counts."""
    from pacs_ai.config import PeerSettings
    from pacs_ai.dicom.scu import echo as c_echo
    from pacs_ai.storage import index
    from pacs_ai.storage.spool import Spool

    settings = _settings(config)
    node = settings.node
    host = (
        "127.0.0.1" if node.bind in ("0.0.0.0", "") else ("::1" if node.bind == "::" else node.bind)
    )
    try:
        listening = (
            c_echo(
                PeerSettings(name="self", ae_title=node.ae_title, host=host, port=node.dicom_port),
                node.ae_title,
                3.0,
            )
            == 0
        )
    except PacsAiError:
        listening = False
    spool = Spool(node.data_dir, int(settings.storage.reserve_mb * 2**20))
    spool.prepare()
    disk = shutil.disk_usage(node.data_dir)
    counts = index.totals(_engine(settings))
    data: dict[str, Any] = {
        "ae_title": node.ae_title,
        "dicom": {"bind": node.bind, "port": node.dicom_port, "listening": listening},
        "http_port": node.http_port,
        "data_dir": str(node.data_dir.resolve()),
        "database": settings.database_url.split("@")[-1]
        if "@" in settings.database_url
        else settings.database_url,
        "disk": {
            "free_bytes": disk.free,
            "total_bytes": disk.total,
            "reserve_bytes": spool.reserve_bytes,
            "below_reserve": disk.free < spool.reserve_bytes,
        },
        "counts": {**counts, "quarantined": spool.quarantine_count()},
    }
    if json_out:
        _dump(data)
        return
    mark = "[green]listening[/green]" if listening else "[red]not answering C-ECHO[/red]"
    out.print(
        f"AE {node.ae_title}: DICOM {node.bind}:{node.dicom_port} {mark}; "
        f"HTTP port {node.http_port}"
    )
    out.print(
        f"data dir {data['data_dir']}: {disk.free / 2**30:.1f} GiB free of "
        f"{disk.total / 2**30:.1f} GiB (reserve {spool.reserve_bytes / 2**20:.0f} MiB)"
        + (" [red]BELOW RESERVE: refusing images[/red]" if disk.free < spool.reserve_bytes else "")
    )
    out.print(f"database {data['database']}")
    out.print(
        f"studies: {counts['studies_receiving']} receiving, {counts['studies_complete']} complete; "
        f"{counts['series']} series, {counts['instances']} instances "
        f"({counts['bytes'] / 2**20:.1f} MiB), {counts['duplicates']} duplicates, "
        f"{data['counts']['quarantined']} quarantined"
    )
    if not listening:
        raise typer.Exit(1)


# --- tokens --------------------------------------------------------------------------------

tokens_app = typer.Typer(help="API tokens for the HTTP service (worklist, DICOMweb, admin API).")
app.add_typer(tokens_app, name="tokens", no_args_is_help=True)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help="admin, radiologist or integration.")],
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
    try:
        token = tokens.create(_engine(settings), name, role, time.time(), peer=peer)
    except PacsAiError as exc:
        _fail(str(exc), 2)
    err.print(f"token {name!r} ({role}) created; store it now, it cannot be shown again:")
    sys.stdout.write(token + "\n")


@tokens_app.command("list")
def tokens_list(config: ConfigOption = None, json_out: JsonOption = False) -> None:
    """Tokens by name and role (never the tokens themselves)."""
    from pacs_ai.storage import tokens

    rows = tokens.list_tokens(_engine(_settings(config)))
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

    try:
        tokens.revoke(_engine(_settings(config)), name, time.time())
    except PacsAiError as exc:
        _fail(str(exc))
    out.print(f"token {name!r} revoked")


def main() -> None:
    app()
