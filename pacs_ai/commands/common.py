"""What every ``pacs-ai`` command shares: consoles, options, exit codes, and the node to ask.

A command that inspects or changes a node's records gets it from :func:`open_admin`: the
local database (from ``--config``) or, with ``--url``, the node's HTTP API. Both give the
same JSON, so a table or ``--json`` prints the same either way.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from pacs_ai.config import Settings, load_settings
from pacs_ai.errors import ConfigError, InvalidArgument, PacsAiError, RemoteError

if TYPE_CHECKING:
    from pacs_ai.admin import Admin

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML file; default $PACS_AI_CONFIG, then ./pacs-ai.toml."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="PACS_AI_URL",
        help="Ask the node at this URL (http://host:http_port) instead of the local database.",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="PACS_AI_TOKEN",
        help="API token for --url (pacs-ai tokens create --role admin on the node).",
        show_default=False,
    ),
]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def print_config_error(exc: ConfigError) -> None:
    err.print(f"[red]invalid configuration[/red] ({escape(str(exc.source))}):")
    for key, message in exc.problems:
        # Messages name TOML tables ([[peers]], [worker]): text, not console markup.
        err.print(f"  {escape(key or '(file)')}: {escape(message)}")


@contextmanager
def refused_as_exit() -> Iterator[None]:
    """A command's refusal as its exit: a bad configuration exits 2 with each problem named,
    any other deliberate error 1 with its message."""
    try:
        yield
    except ConfigError as exc:
        print_config_error(exc)
        raise typer.Exit(2) from None
    except PacsAiError as exc:
        fail(str(exc))


def settings_from(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        print_config_error(exc)
        raise typer.Exit(2) from None


def dump(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def open_engine(settings: Settings) -> Any:
    from pacs_ai.storage.db import open_database

    try:
        return open_database(settings.database_url)
    except PacsAiError as exc:
        fail(str(exc))


@contextmanager
def exit_codes() -> Iterator[None]:
    """Turn pacs-ai errors into a message and the documented exit code (1 failed, 2 usage)."""
    try:
        yield
    except InvalidArgument as exc:
        fail(str(exc), 2)
    except RemoteError as exc:
        fail(str(exc), 2 if exc.status in (400, 422) else 1)
    except ConfigError as exc:
        print_config_error(exc)
        raise typer.Exit(2) from None
    except PacsAiError as exc:
        fail(str(exc))


@contextmanager
def open_admin(config: Path | None, url: str | None, token: str | None) -> Iterator[Admin]:
    """The node to ask, local or remote, with its errors turned into exit codes."""
    if url:
        from pacs_ai.remote import RemoteAdmin

        remote = RemoteAdmin(url, token)
        try:
            with exit_codes():
                yield remote
        finally:
            remote.close()
        return
    from pacs_ai.admin import LocalAdmin

    local = LocalAdmin(settings_from(config))
    try:
        with exit_codes():
            yield local
    finally:
        local.close()
