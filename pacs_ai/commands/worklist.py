"""``pacs-ai worklist`` and ``pacs-ai reviews export``: what radiologists see and decided."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pacs_ai.commands.common import (
    ConfigOption,
    JsonOption,
    TokenOption,
    UrlOption,
    dump,
    err,
    fail,
    open_admin,
    out,
    when,
)

reviews_app = typer.Typer(help="Radiologists' reviews of AI findings.", no_args_is_help=True)


def worklist(
    config: ConfigOption = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="Study state (RECEIVING, COMPLETE) or AI state "
            "(queued, running, done, failed, skipped, canceled)."
        ),
    ] = None,
    priority: Annotated[
        str | None, typer.Option(help="STAT, URGENT, ROUTINE, ... or NONE (no AI planned).")
    ] = None,
    modality: Annotated[str | None, typer.Option(help="A series modality, e.g. CT.")] = None,
    date_from: Annotated[
        str | None, typer.Option("--from", help="Study date on or after (YYYYMMDD).")
    ] = None,
    date_to: Annotated[
        str | None, typer.Option("--to", help="Study date on or before (YYYYMMDD).")
    ] = None,
    review: Annotated[
        str | None, typer.Option(help="UNREVIEWED, ACCEPTED, REJECTED or PARTIAL.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Studies with a job of this model.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows per page (at most 500).")] = 50,
    offset: Annotated[int, typer.Option(min=0, help="Rows to skip (paging).")] = 0,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """The radiologists' worklist: most urgent first, then the longest waiting."""
    filters = {
        "state": state,
        "priority": priority,
        "modality": modality,
        "date_from": date_from,
        "date_to": date_to,
        "review_state": review,
        "model": model,
        "limit": limit,
        "offset": offset,
    }
    with open_admin(config, url, token) as node:
        page = node.worklist(filters)
    if json_out:
        dump(page)
        return
    items = page["items"]
    if not items:
        out.print(f"no studies on this page ({page['total']} match, offset {page['offset']})")
        return
    first = page["offset"] + 1
    table = Table(
        title=f"worklist: {first}-{page['offset'] + len(items)} of {page['total']} studies"
    )
    for name in ("priority", "received", "patient", "patient id", "accession", "mod"):
        table.add_column(name, no_wrap=True)
    table.add_column("description", overflow="ellipsis", max_width=24)
    for name in ("date", "state", "AI"):
        table.add_column(name, no_wrap=True)
    table.add_column("findings", overflow="ellipsis", max_width=40)
    table.add_column("review", no_wrap=True)
    table.add_column("study instance uid", no_wrap=True, min_width=20)
    for item in items:
        table.add_row(
            item["priority"] or "-",
            when(item["received_at"]),
            item["patient_name"],
            item["patient_id"],
            item["accession_number"],
            item["modality"],
            item["study_description"],
            item["study_date"],
            item["state"],
            ", ".join(f"{ai['model']} {ai['state']}" for ai in item["ai"]) or "-",
            item["findings_summary"],
            item["review_state"],
            item["study_instance_uid"],
        )
    out.print(table)


class ExportFormat(StrEnum):
    CSV = "csv"
    JSON = "json"


@reviews_app.command("export")
def reviews_export(
    config: ConfigOption = None,
    fmt: Annotated[ExportFormat, typer.Option("--format", help="csv or json.")] = ExportFormat.CSV,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write to this file instead of stdout.")
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Every review (accept, reject, comment) with its study, job and model, oldest first.

    For measuring the models: no patient names or IDs, only study UID and accession number.
    """
    with open_admin(config, url, token) as node:
        export = node.reviews_export()
    from pacs_ai.export import csv_text
    from pacs_ai.worklist.reviews import EXPORT_FIELDS

    rows = export["reviews"]
    if fmt is ExportFormat.CSV:
        text = csv_text(rows, EXPORT_FIELDS)
    else:
        text = json.dumps(export, indent=2) + "\n"
    if out_file is None:
        typer.echo(text, nl=False)
        return
    try:
        out_file.write_text(text, encoding="utf-8", newline="")
    except OSError as exc:
        fail(f"cannot write {out_file}: {exc.strerror}")
    err.print(f"{len(rows)} review(s) written to {out_file}")
