"""``pacs-ai status``: is the node answering, how much disk is left, what it holds, and who
works its queues."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from pacs_ai.commands.common import (
    ConfigOption,
    JsonOption,
    TokenOption,
    UrlOption,
    dump,
    open_admin,
    out,
)

# What a task's one argument is, for people.
_ITEM = {"pacs_ai.infer": "job", "pacs_ai.send": "delivery"}


def status(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Node health: listener, data dir, free disk, counts, broker, queues and workers.

    Exit 1 if the DICOM listener does not answer C-ECHO (with --json, the JSON says so and
    the exit code is 0: a script reads the answer, not the code).
    """
    with open_admin(config, url, token) as node:
        data = node.status()
    if json_out:
        dump(data)
        return
    listening = data["dicom"]["listening"]
    dicom, disk, counts = data["dicom"], data["disk"], data["counts"]
    mark = "[green]listening[/green]" if listening else "[red]not answering C-ECHO[/red]"
    out.print(
        f"AE {data['ae_title']}: DICOM {dicom['bind']}:{dicom['port']} {mark}; "
        f"HTTP port {data['http_port']}"
    )
    out.print(
        f"data dir {data['data_dir']}: {disk['free_bytes'] / 2**30:.1f} GiB free of "
        f"{disk['total_bytes'] / 2**30:.1f} GiB "
        f"(reserve {disk['reserve_bytes'] / 2**20:.0f} MiB)"
        + (" [red]BELOW RESERVE: refusing images[/red]" if disk["below_reserve"] else "")
    )
    out.print(f"database {data['database']}")
    out.print(
        f"studies: {counts['studies_receiving']} receiving, "
        f"{counts['studies_complete']} complete; {counts['series']} series, "
        f"{counts['instances']} instances ({counts['bytes'] / 2**20:.1f} MiB), "
        f"{counts['duplicates']} duplicates, {counts['quarantined']} quarantined"
    )
    _print_workers(data)
    if not listening:
        raise typer.Exit(1)


def _print_workers(data: dict[str, Any]) -> None:
    broker = data["broker"]
    where = escape(broker["url"])
    if not broker["reachable"]:
        out.print(
            f"broker {where}: [red]broker unreachable[/red] ({escape(broker['error'] or '')}); "
            "queues and workers unknown"
        )
        return
    out.print(f"broker {where}: [green]reachable[/green]")
    unserved = set(data["queues_without_worker"])
    for queue, depth in data["queues"].items():
        line = f"queue {queue}: {depth} waiting"
        if queue in unserved:
            colour = "red" if depth else "yellow"
            line += f", [{colour}]NO WORKER consumes it[/{colour}]"
        out.print(line)
    workers = data["workers"]
    if not workers:
        out.print("[red]no worker answers[/red]: no job runs and no result is sent")
        return
    table = Table(title=f"{len(workers)} workers")
    # Concurrency: pool processes of a worker that infers, threads of a send-only one.
    for column in ("worker", "queues", "concurrency", "device", "running now", "tasks taken"):
        table.add_column(column)
    now = time.time()
    for w in workers:
        table.add_row(
            w["name"],
            _unknown(w["queues"], lambda names: ", ".join(names) or "none"),
            _unknown(w["concurrency"], str),
            w["device"] or "-",
            _unknown(w["active"], lambda tasks: _running(tasks, now)),
            _unknown(w["processed"], str),
        )
    out.print(table)


def _running(tasks: list[dict[str, Any]], now: float) -> str:
    if not tasks:
        return "idle"
    lines = []
    for task in tasks:
        item = _ITEM.get(task["task"], task["task"])
        since = f" for {now - task['started_at']:.0f} s" if task["started_at"] else ""
        lines.append(f"{item} {task['id'] if task['id'] is not None else '?'}{since}")
    return "\n".join(lines)


def _unknown(value: Any, show: Callable[[Any], str]) -> str:
    # None: the worker answered the ping but not this question in time.
    return "?" if value is None else show(value)
