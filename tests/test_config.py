from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacs_ai.config import load_settings, parse_peer
from pacs_ai.errors import ConfigError, PeerAddressError

EXAMPLE = """
[node]
ae_title = "PACSAI"
dicom_port = 11112
http_port = 8080
data_dir = "./pacs-ai-data"
quiet_period_s = 30

[[peers]]
name = "orthanc"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
send = true
receive = true
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("PACS_AI_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no stray ./pacs-ai.toml


def pacs_ai_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_ai", *args], capture_output=True, text=True, timeout=60
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs-ai.toml"
    path.write_text(text)
    return path


def test_defaults_describe_a_working_node() -> None:
    s = load_settings(None)
    assert (s.node.ae_title, s.node.dicom_port, s.node.http_port) == ("PACSAI", 11112, 8080)
    assert s.node.data_dir == Path("./pacs-ai-data")
    assert s.node.quiet_period_s == 30
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("index.sqlite3")
    assert s.peers == ()


def test_documented_example_loads(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, EXAMPLE))
    (peer,) = s.peers
    assert (peer.name, peer.ae_title, peer.host, peer.port, peer.send, peer.receive) == (
        "orthanc",
        "ORTHANC",
        "127.0.0.1",
        4242,
        True,
        True,
    )


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, EXAMPLE)
    monkeypatch.setenv("PACS_AI_NODE__DICOM_PORT", "11113")
    monkeypatch.setenv("PACS_AI_DATABASE__URL", "postgresql+psycopg://db/pacs")
    s = load_settings(path)
    assert s.node.dicom_port == 11113
    assert s.node.ae_title == "PACSAI"  # untouched keys keep the file's value
    assert s.database_url == "postgresql+psycopg://db/pacs"
    assert len(s.peers) == 1


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text('[node]\nae_title = "ELSEWHERE"\n')
    monkeypatch.setenv("PACS_AI_CONFIG", str(other))
    assert load_settings(None).node.ae_title == "ELSEWHERE"


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[node]
ae_title = "A_TITLE_LONGER_THAN_16"
dicom_port = 70000
quiet_period_s = -1
ae_titel = "typo"

[[peers]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.1"
port = 0

[[peers]]
name = "second"
host = "127.0.0.1"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    keys = {key for key, _ in info.value.problems}
    assert {
        "node.ae_title",
        "node.dicom_port",
        "node.quiet_period_s",
        "node.ae_titel",
        "peers[0].port",
        "peers[1].ae_title",
    } <= keys
    messages = dict(info.value.problems)
    assert "longer than 16" in messages["node.ae_title"]
    assert "unknown key" in messages["node.ae_titel"]
    assert "missing" in messages["peers[1].ae_title"]


def test_duplicate_peer_names_are_refused(tmp_path: Path) -> None:
    peer = '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
    with pytest.raises(ConfigError, match="used twice"):
        load_settings(write(tmp_path, peer + peer))


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 2"):
        load_settings(write(tmp_path, '[node]\nae_title = "unterminated\n'))


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_settings(tmp_path / "nope.toml")


def test_peer_address_parsing() -> None:
    s = load_settings(None)
    peer = parse_peer("ORTHANC@127.0.0.1:4242", s)
    assert (peer.ae_title, peer.host, peer.port) == ("ORTHANC", "127.0.0.1", 4242)
    v6 = parse_peer("PACS@[::1]:104", s)
    assert (v6.host, v6.port) == ("::1", 104)
    for bad in (
        "ORTHANC",
        "ORTHANC@host",
        "@127.0.0.1:104",
        "WAY_TOO_LONG_AE_TITLE@h:1",
        "A@h:99999",
    ):
        with pytest.raises(PeerAddressError):
            parse_peer(bad, s)


def test_config_check_cli(tmp_path: Path) -> None:
    def check(text: str) -> subprocess.CompletedProcess[str]:
        return pacs_ai_cli("config", "check", "--config", str(write(tmp_path, text)))

    good = check(EXAMPLE)
    assert good.returncode == 0, good.stderr
    assert "configuration is valid" in good.stdout
    assert "peer orthanc: ORTHANC@127.0.0.1:4242 (send/receive)" in good.stdout

    bad = check('[node]\ndicom_port = "eleven"\nae_title = ""\n')
    assert bad.returncode == 2
    assert "node.dicom_port" in bad.stderr and "node.ae_title" in bad.stderr


def test_bad_config_never_starts_the_node(tmp_path: Path) -> None:
    path = write(tmp_path, f'[node]\ndicom_port = 0\ndata_dir = "{tmp_path / "data"}"\n')
    result = pacs_ai_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "node.dicom_port" in result.stderr
    assert not (tmp_path / "data").exists()


def test_a_rule_naming_a_missing_model_never_starts_the_node(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rules]]\nname = "x"\nmodels = ["no-such-model"]\n')
    result = pacs_ai_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "no-such-model" in result.stderr and "ct-organs-threshold" in result.stderr
    check = pacs_ai_cli("rules", "check", "--config", str(path))
    assert check.returncode == 2 and "no-such-model" in check.stderr


def test_a_preload_naming_a_missing_model_never_starts_the_node(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n[worker]\npreload = ["no-such-model"]\n',
    )
    result = pacs_ai_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "worker.preload: model 'no-such-model' is not installed" in result.stderr
    assert not (tmp_path / "data").exists()


def test_config_errors_print_table_names_as_written(tmp_path: Path) -> None:
    # The console must not take "[[peers]]" or "[worker]" in a message for markup and drop it.
    text = (
        '[[peers]]\nname = "modality"\nae_title = "CT1"\nhost = "127.0.0.1"\nreceive = false\n'
        '[[rules]]\nname = "back"\nmodels = ["ct-organs-threshold"]\nresults_to = ["modality"]\n'
    )
    result = pacs_ai_cli("config", "check", "--config", str(write(tmp_path, text)))
    assert result.returncode == 2
    assert "sends to 'modality', which is not a [[peers]] entry with receive = true" in " ".join(
        result.stderr.split()
    )
