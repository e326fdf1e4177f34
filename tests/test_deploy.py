"""The files in deploy/ are checked, not just shipped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pacs_ai.config import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_example_config_is_valid() -> None:
    settings = load_settings(DEPLOY / "pacs-ai.toml")
    assert settings.node.require_known_peers
    assert {p.name for p in settings.peers} == {"pacs", "ct-scanner-1"}


def test_systemd_unit_is_well_formed() -> None:
    analyze = shutil.which("systemd-analyze")
    unit = (DEPLOY / "systemd" / "pacs-ai.service").read_text()
    assert "ExecStart=/opt/pacs-ai/.venv/bin/pacs-ai serve" in unit
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(DEPLOY / "systemd" / "pacs-ai.service")],
        capture_output=True,
        text=True,
    )
    # verify also complains that /opt/pacs-ai does not exist here; only syntax errors count.
    syntax = [
        line for line in result.stderr.splitlines() if "Unknown" in line or "bad" in line.lower()
    ]
    assert syntax == []
