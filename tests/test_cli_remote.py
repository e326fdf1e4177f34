"""The CLI against a running node over HTTP (``--url``, ``--token``) prints what it prints on
the node's own host, and says clearly why when the node refuses or cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from tests.peers import NodeProcess, free_port, wait_for

pytestmark = pytest.mark.slow


def remote(node: NodeProcess, token: str, *args: str) -> Any:
    """``pacs-ai ARGS --json --url … --token …`` (NodeProcess adds a --config it ignores)."""
    return node.cli_json(*args, "--url", node.url, "--token", token)


def without_free_disk(status: dict[str, Any]) -> dict[str, Any]:
    status["disk"].pop("free_bytes")  # moves between two calls
    return status


@pytest.fixture
def busy_node(node: NodeProcess, tmp_path: Path) -> NodeProcess:
    """A node holding one small CT study, complete, with the job the default rule made."""
    truth = write_chest_ct(
        tmp_path / "ct", Geometry(rows=64, columns=64, slices=24), with_lung_series=False
    )
    sent = node.cli("send", str(tmp_path / "ct"), "--to", f"PACSAI@127.0.0.1:{node.port}")
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: bool(node.cli_json("jobs", "list")), 60, "the rule's job")
    assert truth.study_instance_uid == node.studies()[0]["study_instance_uid"]
    return node


def test_remote_cli_prints_what_the_local_cli_prints(busy_node: NodeProcess) -> None:
    node = busy_node
    admin = node.token("admin")
    (study,) = node.studies()
    uid = study["study_instance_uid"]
    (job,) = node.cli_json("jobs", "list")
    for args in (
        ("studies", "list"),
        ("studies", "show", uid),
        ("jobs", "list"),
        ("jobs", "show", str(job["id"])),
        ("deliveries", "list"),
        ("rules", "explain", uid),
        ("rules", "check"),
        ("worklist",),
        ("worklist", "--state", "queued", "--modality", "CT"),
        ("tokens", "list"),  # remote first: its call is what stamps the token's last use
    ):
        over_http = remote(node, admin, *args)
        assert over_http == node.cli_json(*args), args
    assert without_free_disk(remote(node, admin, "status")) == without_free_disk(
        node.cli_json("status")
    )
    # A radiologist's token opens the worklist, as the page does.
    radiologist = node.token("radiologist", name="dr-who")
    assert remote(node, radiologist, "worklist")["items"][0]["study_instance_uid"] == uid

    # Acting remotely changes the node's records; the text output says the new state.
    canceled = node.cli("jobs", "cancel", str(job["id"]), "--url", node.url, "--token", admin)
    assert canceled.returncode == 0 and f"job {job['id']} CANCELED" in canceled.stdout
    assert node.cli_json("jobs", "show", str(job["id"]))["state"] == "CANCELED"

    # The environment works as the options do, and needs no configuration file.
    env = {**os.environ, "PACS_AI_URL": node.url, "PACS_AI_TOKEN": admin}
    text = subprocess.run(
        [sys.executable, "-m", "pacs_ai", "studies", "list"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "250"},
        cwd="/",
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert uid in text.stdout and "1 studies" in text.stdout


def test_remote_cli_says_why_it_failed(node: NodeProcess) -> None:
    admin = node.token("admin")
    gone = node.token("admin", name="gone")
    assert node.cli("tokens", "revoke", "gone").returncode == 0
    radiologist = node.token("radiologist", name="dr-no")

    def run(token: str, *args: str, url: str = node.url) -> subprocess.CompletedProcess[str]:
        return node.cli(*args, "--url", url, "--token", token)

    revoked = run(gone, "studies", "list")
    assert revoked.returncode == 1
    assert "token missing or revoked" in revoked.stderr
    assert "pacs-ai tokens create" in revoked.stderr
    forbidden = run(radiologist, "jobs", "list")
    assert forbidden.returncode == 1 and "role admin" in forbidden.stderr
    port = free_port()
    down = run(admin, "status", url=f"http://127.0.0.1:{port}")
    assert down.returncode == 1
    assert f"cannot reach the node at http://127.0.0.1:{port}" in down.stderr
    assert "node.http_port" in down.stderr
    missing = run(admin, "jobs", "retry", "999")
    assert missing.returncode == 1 and "no job 999" in missing.stderr
    bad = run(admin, "jobs", "list", "--state", "LOST")
    assert bad.returncode == 2 and "state must be one of" in bad.stderr
    assert json.loads(run(admin, "jobs", "list", "--json").stdout) == []
