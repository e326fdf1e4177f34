"""``pacs-ai rules``: check the routing rules, or see why they fired on a study."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from pacs_ai.commands.common import (
    ConfigOption,
    JsonOption,
    TokenOption,
    UrlOption,
    dump,
    err,
    open_admin,
    out,
)

rules_app = typer.Typer(
    help="Routing rules: check them, or see why they fired.", no_args_is_help=True
)


@rules_app.command("check")
def rules_check(
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Validate the routing rules: syntax, peers, and that every model is installed.

    With --url, the rules a running node uses (as loaded when it started).
    """
    with open_admin(config, url, token) as node:
        report = node.rules_check()
    if json_out:
        dump(report)
    else:
        for rule in report["rules"]:
            state = "" if rule.get("enabled", True) else " (disabled)"
            when = (
                ", ".join(f"{k} {_condition_text(c)}" for k, c in rule.get("match", {}).items())
                or "always"
            )
            does = [f"run {', '.join(rule['models'])}"] if rule.get("models") else []
            if rule.get("forward"):
                does.append(f"forward {rule['forward_level']} to {', '.join(rule['forward'])}")
            out.print(
                f"rule [bold]{rule['name']}[/bold]{state}: when {when} -> {'; '.join(does)} "
                f"[{rule['priority']}], results to "
                f"{', '.join(rule.get('results_to', [])) or 'the sender'}"
            )
        for problem in report["problems"]:
            err.print(f"[red]error:[/red] {escape(problem)}")
        if not report["problems"]:
            out.print(f"[green]{len(report['rules'])} rule(s) valid[/green]")
    if report["problems"]:
        raise typer.Exit(2)


def _condition_text(condition: dict[str, Any]) -> str:
    return " ".join(f"{op}={value}" for op, value in condition.items())


@rules_app.command("explain")
def rules_explain(
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    config: ConfigOption = None,
    json_out: JsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """For each rule and series of a study: matched or not, and which condition decided."""
    with open_admin(config, url, token) as node:
        report = node.rules_explain(study_uid)
    if json_out:
        dump(report)
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
