"""``pacs-ai worklist`` and ``pacs-ai reviews export``, on the node's host and over HTTP."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
from typer.testing import CliRunner

from pacs_ai.cli import app
from pacs_ai.worklist import reviews
from tests.records import plan_jobs, store_chest_ct, study_id
from tests.web import bearer, served, web_client


def test_worklist_and_review_export_read_the_same_locally_and_remotely(tmp_path: Path) -> None:
    runner = CliRunner()
    config = str(tmp_path / "pacs-ai.toml")  # web_client's node configuration
    with web_client(tmp_path) as (_client, ctx):
        truth = store_chest_ct(ctx.ingest, tmp_path / "ct")
        (job_id,) = plan_jobs(ctx.engine, truth.study_instance_uid)
        sid = study_id(ctx.engine, truth.study_instance_uid)
        reviews.record(ctx.engine, sid, "ACCEPT", "dr-a", 1000.0, job_id=job_id)
        reviews.record(ctx.engine, sid, "COMMENT", "dr-a", 1001.0, comment="=HYPERLINK(x)")
        auth = bearer(ctx, "radiologist")
        token = auth["Authorization"].split()[1]

        with served(ctx) as url:
            remote = ["--url", url, "--token", token]
            for args in (
                ["worklist", "--json"],
                ["worklist", "--json", "--state", "queued", "--from", "1900-01-01"],
                ["reviews", "export", "--format", "csv"],
                ["reviews", "export", "--format", "json"],
            ):
                local = runner.invoke(app, [*args, "--config", config])
                over_http = runner.invoke(app, [*args, *remote])
                assert local.exit_code == 0, local.output
                assert over_http.exit_code == 0, over_http.output
                assert over_http.stdout == local.stdout, args
            # The CLI writes the CSV the API serves, byte for byte.
            served_csv = httpx.get(
                f"{url}/api/reviews/export", params={"format": "csv"}, headers=auth
            )
            csv_out = runner.invoke(app, ["reviews", "export", "--config", config]).stdout
            assert csv_out == served_csv.text
            assert json.loads(over_http.stdout)["reviews"][1]["comment"] == "=HYPERLINK(x)"
            bad = runner.invoke(app, ["worklist", "--review", "MAYBE", *remote])
            assert bad.exit_code == 2 and "review_state must be one of" in bad.stderr
            table = runner.invoke(app, ["worklist", "--config", config], env={"COLUMNS": "300"})
            assert table.exit_code == 0
            assert truth.study_instance_uid in table.stdout and "1-1 of 1" in table.stdout


def test_review_export_csv_is_safe_for_spreadsheets(tmp_path: Path) -> None:
    runner = CliRunner()
    with web_client(tmp_path) as (_client, ctx):
        truth = store_chest_ct(ctx.ingest, tmp_path / "ct")
        sid = study_id(ctx.engine, truth.study_instance_uid)
        reviews.record(ctx.engine, sid, "COMMENT", "dr-a", 1001.0, comment="=HYPERLINK(x)")
        out = tmp_path / "reviews.csv"
        done = runner.invoke(
            app,
            ["reviews", "export", "--out", str(out), "--config", str(tmp_path / "pacs-ai.toml")],
        )
        assert done.exit_code == 0, done.output
    (row,) = csv.DictReader(io.StringIO(out.read_text()))
    assert row["comment"] == "'=HYPERLINK(x)" and row["reviewer"] == "dr-a"
    assert row["study_instance_uid"] == truth.study_instance_uid
