"""``pacs-ai studies``, ``jobs`` and ``deliveries``: list, show, retry, cancel."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from pacs_ai.commands.common import (
    ConfigOption,
    JsonOption,
    TokenOption,
    UrlOption,
    dump,
    open_admin,
    out,
    when,
)
from pacs_ai.storage.index import RULES_MATCHED, RULES_NONE_MATCHED

studies_app = typer.Typer(help="Studies the node holds.", no_args_is_help=True)
jobs_app = typer.Typer(help="AI jobs: one model on one series.", no_args_is_help=True)
deliveries_app = typer.Typer(
    help="Results and forwards on their way to peers.", no_args_is_help=True
)

# --- studies -------------------------------------------------------------------------------


@studies_app.command("list")
def studies_list(
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="RECEIVING or COMPLETE.")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 1000,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Studies held, newest first, with state and counts."""
    with open_admin(config, url, token) as node:
        rows = node.studies_list(state, limit)
    if json_out:
        dump(rows)
        return
    table = Table(title=f"{len(rows)} studies")
    # UIDs are what an admin copies into the next command: never shorten them.
    table.add_column("study instance uid", no_wrap=True, min_width=20)
    for name in ("from", "state", "patient id", "accession", "date"):
        table.add_column(name, no_wrap=True)
    table.add_column("description", overflow="ellipsis", max_width=24)
    for name in ("mod", "series", "inst"):
        table.add_column(name, no_wrap=True)
    table.add_column("rules", overflow="ellipsis", max_width=24)
    table.add_column("last received", no_wrap=True)
    for r in rows:
        table.add_row(
            r["study_instance_uid"],
            r["calling_ae"],
            r["state"],
            r["patient_id"],
            r["accession_number"],
            r["study_date"],
            r["study_description"],
            r["modalities"],
            str(r["series_count"]),
            str(r["instance_count"]),
            _rules(r, short=True),
            when(r["last_received_at"]),
        )
    out.print(table)


@studies_app.command("show")
def studies_show(
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """One study: state, counts, and its series."""
    with open_admin(config, url, token) as node:
        found = node.study_show(study_uid)
    if json_out:
        dump(found)
        return
    for s in found:
        out.print(
            f"[bold]Study {s['study_instance_uid']}[/bold] from {s['calling_ae']}: {s['state']}"
        )
        out.print(
            f"  patient id {s['patient_id'] or '-'}, accession {s['accession_number'] or '-'}, "
            f"date {s['study_date'] or '-'}, {s['study_description'] or 'no description'}"
        )
        out.print(
            f"  {s['series_count']} series, {s['instance_count']} instances, "
            f"{s['duplicates']} duplicates"
        )
        out.print(
            f"  first {when(s['first_received_at'])}, last {when(s['last_received_at'])}, "
            f"completed {when(s['completed_at'])} "
            f"({s['completions']}x, reopened {s['reopened']}x)"
        )
        out.print(f"  rules: {_rules(s)}")
        table = Table()
        table.add_column("series instance uid", no_wrap=True, min_width=20)
        for name in ("#", "modality", "description", "body part", "instances"):
            table.add_column(name)
        for x in s["series"]:
            table.add_row(
                x["series_instance_uid"],
                str(x["series_number"] or ""),
                x["modality"],
                x["series_description"],
                x["body_part_examined"],
                str(x["instance_count"]),
            )
        out.print(table)


def _rules(study: dict[str, Any], short: bool = False) -> str:
    """What the rules made of the study's latest completion (index.StudySummary.rules_state)."""
    state = study["rules_state"]
    if state == RULES_MATCHED:
        return ", ".join(study["rules_fired"])
    if state == RULES_NONE_MATCHED:
        return "none matched" if short else "none matched (kept; nothing runs)"
    return "not planned" if short else "not planned yet"


# --- jobs ----------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    state: Annotated[
        str | None, typer.Option(help="QUEUED, RUNNING, ENCODED, DELIVERED, ...")
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Jobs, newest first."""
    with open_admin(config, url, token) as node:
        rows = node.jobs_list(state, limit)
    if json_out:
        dump(rows)
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
            str(r["id"]),
            r["state"],
            r["model"],
            r["rule"],
            r["priority"],
            f"{r['attempts']}/{r['max_attempts']}",
            r["series_instance_uid"],
            r["reason"],
            when(r["updated_at"]),
        )
    out.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: int,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """One job: state, timings, findings, and its deliveries."""
    with open_admin(config, url, token) as node:
        data = node.job_show(job_id)
    if json_out:
        dump(data)
        return
    _print_job(data)


def _print_job(data: dict[str, Any]) -> None:
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
def jobs_retry(
    job_id: int,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Put a FAILED, CANCELED or SKIPPED job back in the queue (the node enqueues it)."""
    with open_admin(config, url, token) as node:
        data = node.job_retry(job_id)
    if json_out:
        dump(data)
        return
    out.print(f"job {job_id} {data['state']}; the node's reconciler sends it to a worker")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: int,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Cancel a job that has not finished."""
    with open_admin(config, url, token) as node:
        data = node.job_cancel(job_id)
    if json_out:
        dump(data)
        return
    out.print(f"job {job_id} {data['state']}")


# --- deliveries ----------------------------------------------------------------------------


@deliveries_app.command("list")
def deliveries_list(
    config: ConfigOption = None,
    state: Annotated[
        str | None, typer.Option(help="PENDING, SENDING, DONE, FAILED, CANCELED.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Deliveries, newest first, with the last error."""
    with open_admin(config, url, token) as node:
        rows = node.deliveries_list(state, limit)
    if json_out:
        dump(rows)
        return
    table = Table(title=f"{len(rows)} deliveries")
    columns = ("id", "job", "kind", "peer", "state", "attempts", "commitment", "last error")
    for name in (*columns, "updated"):
        table.add_column(name)
    for r in rows:
        table.add_row(
            str(r["id"]),
            str(r["job_id"] or "-"),
            r["kind"],
            r["peer"],
            r["state"],
            f"{r['attempts']}/{r['max_attempts']}",
            _commitment(r),
            r["last_error"] or r.get("commitment_error", ""),
            when(r["updated_at"]),
        )
    out.print(table)


def _commitment(row: dict[str, Any]) -> str:
    """The storage commitment in a word or two: "-" where none was asked for."""
    state = row.get("commitment") or ""
    if not state:
        return "-"
    if state == "COMMITTED":
        return f"COMMITTED {when(row['committed_at'])}"
    if state == "REQUESTED" and row.get("commitment_requests"):
        return f"REQUESTED ({row['commitment_requests']}x)"
    return str(state)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: int,
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Send a FAILED delivery again, with a fresh attempt budget."""
    with open_admin(config, url, token) as node:
        data = node.delivery_retry(delivery_id)
    if json_out:
        dump(data)
        return
    out.print(f"delivery {delivery_id} {data['state']}; the node's reconciler sends it")
