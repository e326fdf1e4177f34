"""Health probes answer without a token; readiness reports each check."""

from __future__ import annotations

from pathlib import Path

from tests.web import web_client


def test_healthz_and_readyz_need_no_token(tmp_path: Path) -> None:
    with web_client(tmp_path) as (client, _ctx):
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["database"] is True


def test_readyz_is_503_when_a_check_fails(tmp_path: Path) -> None:
    with web_client(tmp_path) as (client, ctx):
        ctx.readiness = lambda: {"receivers": False}
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "checks": {"database": True, "receivers": False}}
