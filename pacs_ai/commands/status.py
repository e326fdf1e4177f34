"""``pacs-ai status``: is the node answering, how much disk is left, what it holds."""

from __future__ import annotations

import typer

from pacs_ai.commands.common import (
    ConfigOption,
    JsonOption,
    TokenOption,
    UrlOption,
    dump,
    open_admin,
    out,
)


def status(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Node health: listener, data dir, free disk, counts.

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
    if not listening:
        raise typer.Exit(1)
