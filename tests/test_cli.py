"""The admin CLI against a running node, as an administrator would use it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pacs_ai.phantoms.chest_ct import ChestTruth
from tests.peers import NodeProcess, free_port
from tests.realdata import real_file

pytestmark = pytest.mark.slow


def test_echo(node: NodeProcess) -> None:
    ok = node.cli("echo", f"PACSAI@127.0.0.1:{node.port}")
    assert ok.returncode == 0 and "success" in ok.stdout
    down = node.cli("echo", f"PACSAI@127.0.0.1:{free_port()}", "--timeout", "3")
    assert down.returncode == 1 and "no association" in down.stderr
    wrong = node.cli("echo", f"NOBODY@127.0.0.1:{node.port}")
    assert wrong.returncode == 1 and "rejected" in wrong.stderr
    bad = node.cli("echo", "not-an-address")
    assert bad.returncode == 1 and "AE@host:port" in bad.stderr


def test_send_folder_with_summary_then_list_and_show(
    node: NodeProcess, tmp_path: Path, chest_ct: ChestTruth
) -> None:
    folder = tmp_path / "study"
    shutil.copytree(chest_ct.files[0].parent.parent, folder)
    (folder / "README.txt").write_text("not DICOM")
    truncated = folder / "999" / "broken.dcm"
    truncated.parent.mkdir()
    truncated.write_bytes(real_file("CT_small.dcm").read_bytes()[:-4000])

    result = node.cli(
        "send",
        str(folder),
        "--to",
        f"PACSAI@127.0.0.1:{node.port}",
        "--associations",
        "3",
        "--json",
    )
    assert result.returncode == 1, result.stderr  # one object failed
    report = json.loads(result.stdout)
    assert report["sent"] == 452 and report["succeeded"] == 451
    assert report["by_status"] == {"0x0000": 451, "0xC000": 1}
    (failure,) = report["failures"]
    assert failure["path"].endswith("broken.dcm") and "truncated" in failure["comment"]
    assert [s["path"].endswith("README.txt") for s in report["skipped"]] == [True]

    table = node.cli("send", str(folder / "002"), "--to", f"PACSAI@127.0.0.1:{node.port}")
    assert table.returncode == 0
    assert "0x0000" in table.stdout and "300" in table.stdout

    studies = node.cli("studies", "list")
    assert chest_ct.study_instance_uid in studies.stdout and "PACSAI" in studies.stdout
    shown = node.cli("studies", "show", chest_ct.study_instance_uid)
    assert shown.returncode == 0
    assert "AXIAL 1.25 SOFT TISSUE" in shown.stdout and "451 instances" in shown.stdout
    assert "300 duplicates" in shown.stdout
    missing = node.cli("studies", "show", "1.2.3.4")
    assert missing.returncode == 1 and "no study 1.2.3.4" in missing.stderr


def test_send_to_configured_peer_by_name(
    node_factory: type[NodeProcess], node: NodeProcess, tmp_path: Path
) -> None:
    # A second node is the destination; the first one knows it as a peer called "archive".
    archive = node_factory(tmp_path / "archive", ae_title="ARCHIVE").start()
    node.peers.append(
        {
            "name": "archive",
            "ae_title": "ARCHIVE",
            "host": "127.0.0.1",
            "port": archive.port,
            "send": False,
            "receive": True,
        }
    )
    node.write_config()
    result = node.cli("send", str(real_file("CT_small.dcm")), "--to", "archive", "--json")
    assert result.returncode == 0, result.stderr
    assert archive.cli_json("status")["counts"]["instances"] == 1
    (study,) = archive.studies()
    assert study["calling_ae"] == "PACSAI"  # the node sends as itself


def test_status(node: NodeProcess) -> None:
    status = node.cli_json("status")
    assert status["dicom"] == {"bind": "127.0.0.1", "port": node.port, "listening": True}
    assert status["ae_title"] == "PACSAI" and status["disk"]["below_reserve"] is False
    assert status["counts"]["instances"] == 0
    text = node.cli("status")
    assert text.returncode == 0 and "listening" in text.stdout
    node.stop()
    stopped = node.cli("status")
    assert stopped.returncode == 1 and "not answering" in stopped.stdout


def test_rules_explain_says_why(node: NodeProcess, chest_ct: ChestTruth) -> None:
    files = [chest_ct.files[0], *chest_ct.files[1:26]]  # the scout and 25 axial slices
    sent = node.cli("send", *map(str, files), "--to", f"PACSAI@127.0.0.1:{node.port}")
    assert sent.returncode == 0, sent.stderr
    report = node.cli_json("rules", "explain", chest_ct.study_instance_uid)
    by_series = {item["series_description"]: item for item in report}
    assert by_series["AXIAL 1.25 SOFT TISSUE"]["matched"] is True
    scout = by_series["SCOUT"]
    assert scout["matched"] is False and scout["rule"] == "ct-organs"
    failed = [c["keyword"] for c in scout["conditions"] if not c["passed"]]
    assert failed == ["NumberOfSeriesRelatedInstances", "ImageType"]
    text = node.cli("rules", "explain", chest_ct.study_instance_uid)
    assert (
        "MATCH rule ct-organs" in text.stdout
        and "FAIL NumberOfSeriesRelatedInstances" in text.stdout
    )
