"""The admin API over a real spool and database: the same answers as the CLI's functions,
and 404 / 409 / 400 where the id, the state or a filter is wrong."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from pacs_ai import admin
from pacs_ai.errors import RemoteError
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.route import RuleSettings
from pacs_ai.remote import RemoteAdmin
from pacs_ai.storage import tokens
from pacs_ai.storage.schema import deliveries
from pacs_ai.web.context import WebContext
from tests.records import fail_delivery, plan_jobs, store_chest_ct
from tests.web import bearer, served, web_client

Client = tuple[TestClient, WebContext, dict[str, str]]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Client]:
    """An admin's client of a node holding one phantom CT study and the job the rules made."""
    with web_client(tmp_path) as (client, ctx):
        truth = store_chest_ct(ctx.ingest, tmp_path / "ct")
        assert plan_jobs(ctx.engine, truth.study_instance_uid)
        yield client, ctx, bearer(ctx, "admin")


def test_studies_are_what_the_cli_lists(api: Client) -> None:
    client, ctx, auth = api
    listed = client.get("/api/admin/studies", headers=auth)
    assert listed.status_code == 200
    assert listed.json() == admin.studies_list(ctx.engine)
    (study,) = listed.json()
    assert study["instance_count"] == 25 and study["series_count"] == 2
    uid = study["study_instance_uid"]

    shown = client.get(f"/api/admin/studies/{uid}", headers=auth).json()
    assert shown == admin.study_show(ctx.engine, uid)
    assert sorted(s["instance_count"] for s in shown[0]["series"]) == [1, 24]

    assert client.get("/api/admin/studies?state=complete", headers=auth).json() == []
    assert len(client.get("/api/admin/studies?state=RECEIVING", headers=auth).json()) == 1
    bad = client.get("/api/admin/studies?state=LOST", headers=auth)
    assert bad.status_code == 400 and "RECEIVING, COMPLETE" in bad.json()["detail"]
    missing = client.get("/api/admin/studies/1.2.3.4", headers=auth)
    assert missing.status_code == 404 and "no study 1.2.3.4" in missing.json()["detail"]


def test_jobs_show_retry_and_cancel_follow_the_state_machine(api: Client) -> None:
    client, ctx, auth = api
    (job,) = client.get("/api/admin/jobs", headers=auth).json()
    assert job == admin.jobs_list(ctx.engine)[0]
    assert job["state"] == "QUEUED" and job["model"] == "ct-organs-threshold"
    job_id = job["id"]
    shown = client.get(f"/api/admin/jobs/{job_id}", headers=auth).json()
    assert shown == {**job, "deliveries": []}

    # A queued job cannot be retried; it can be canceled, once.
    refused = client.post(f"/api/admin/jobs/{job_id}/retry", headers=auth)
    assert refused.status_code == 409 and "QUEUED" in refused.json()["detail"]
    canceled = client.post(f"/api/admin/jobs/{job_id}/cancel", headers=auth)
    assert canceled.status_code == 200 and canceled.json()["state"] == "CANCELED"
    again = client.post(f"/api/admin/jobs/{job_id}/cancel", headers=auth)
    assert again.status_code == 409 and "CANCELED" in again.json()["detail"]
    retried = client.post(f"/api/admin/jobs/{job_id}/retry", headers=auth)
    assert retried.status_code == 200
    assert retried.json()["state"] == "QUEUED" and retried.json()["attempts"] == 0
    row = jobs.job_row(ctx.engine, job_id)
    assert row is not None and row.state == "QUEUED"

    for action in ("retry", "cancel"):
        assert client.post(f"/api/admin/jobs/999/{action}", headers=auth).status_code == 404
    assert client.get("/api/admin/jobs/999", headers=auth).status_code == 404
    (queued,) = client.get("/api/admin/jobs?state=queued", headers=auth).json()
    assert {**queued, "deliveries": []} == retried.json()
    assert client.get("/api/admin/jobs?state=nope", headers=auth).status_code == 400


def test_deliveries_list_and_retry(api: Client) -> None:
    client, ctx, auth = api
    # A forward rule makes a delivery of the whole study to the PACS; it fails every attempt.
    (study,) = admin.studies_list(ctx.engine)
    rule = admin.rules_check(ctx.settings)["rules"][0]
    forward = RuleSettings.model_validate(
        {**rule, "name": "forward", "models": [], "forward": ["pacs"], "forward_level": "study"}
    )
    plan_jobs(ctx.engine, study["study_instance_uid"], rules=(forward,))
    with ctx.engine.connect() as conn:
        delivery_id = conn.execute(select(deliveries.c.id)).scalar_one()
    fail_delivery(ctx.engine, delivery_id)

    listed = client.get("/api/admin/deliveries?state=FAILED", headers=auth).json()
    assert listed == admin.deliveries_list(ctx.engine, "FAILED")
    assert [(d["id"], d["attempts"], d["last_error"]) for d in listed] == [
        (delivery_id, 2, "association rejected")
    ]
    retried = client.post(f"/api/admin/deliveries/{delivery_id}/retry", headers=auth)
    assert retried.status_code == 200
    assert retried.json()["state"] == "PENDING" and retried.json()["attempts"] == 0
    again = client.post(f"/api/admin/deliveries/{delivery_id}/retry", headers=auth)
    assert again.status_code == 409 and "PENDING" in again.json()["detail"]
    assert client.post("/api/admin/deliveries/999/retry", headers=auth).status_code == 404


def test_rules_status_and_tokens(api: Client) -> None:
    client, ctx, auth = api
    (study,) = admin.studies_list(ctx.engine)
    uid = study["study_instance_uid"]
    explained = client.get(f"/api/admin/rules/explain/{uid}", headers=auth).json()
    assert explained == admin.rules_explain(ctx.settings, ctx.engine, uid)
    by_description = {e["series_description"]: e["matched"] for e in explained}
    assert by_description == {"SCOUT": False, "AXIAL 1.25 SOFT TISSUE": True}
    assert client.get("/api/admin/rules/explain/1.2.3", headers=auth).status_code == 404
    check = client.get("/api/admin/rules/check", headers=auth).json()
    assert check["valid"] is True and check["rules"][0]["name"] == "ct-organs"

    status = client.get("/api/admin/status", headers=auth).json()
    local = admin.node_status(ctx.settings, ctx.engine)
    for volatile in (status, local):
        volatile["disk"].pop("free_bytes")
    assert status == local
    assert status["counts"]["instances"] == 25
    assert status["dicom"]["listening"] is False  # this in-process app has no DICOM listener

    listed = client.get("/api/admin/tokens", headers=auth)
    assert [t["role"] for t in listed.json()] == ["admin"]
    assert set(listed.json()[0]) == {
        "id",
        "name",
        "role",
        "peer",
        "created_at",
        "last_used_at",
        "revoked_at",
    }
    secret = auth["Authorization"].split()[1]
    assert secret not in listed.text and tokens.hash_token(secret) not in listed.text


def test_remote_admin_answers_as_the_local_one(api: Client) -> None:
    """The CLI's two ways to ask give the same JSON: local database, or this API over HTTP."""
    _client, ctx, auth = api
    local = admin.LocalAdmin(ctx.settings, ctx.engine)
    (study,) = local.studies_list(None, 10)
    uid = study["study_instance_uid"]
    (job,) = local.jobs_list(None, 10)
    with served(ctx) as url:
        remote = RemoteAdmin(url, auth["Authorization"].split()[1])
        try:
            assert remote.studies_list(None, 10) == local.studies_list(None, 10)
            assert remote.study_show(uid) == local.study_show(uid)
            assert remote.jobs_list("QUEUED", 10) == local.jobs_list("QUEUED", 10)
            assert remote.job_show(job["id"]) == local.job_show(job["id"])
            assert remote.deliveries_list(None, 10) == local.deliveries_list(None, 10)
            assert remote.rules_explain(uid) == local.rules_explain(uid)
            assert remote.rules_check() == local.rules_check()
            assert remote.tokens_list() == local.tokens_list()

            assert remote.job_cancel(job["id"])["state"] == "CANCELED"
            assert local.job_show(job["id"])["state"] == "CANCELED"
            assert remote.job_retry(job["id"])["state"] == "QUEUED"
            with pytest.raises(RemoteError, match="only FAILED, CANCELED or SKIPPED") as conflict:
                remote.job_retry(job["id"])
            assert conflict.value.status == 409
            with pytest.raises(RemoteError, match="no job 999") as missing:
                remote.job_show(999)
            assert missing.value.status == 404
            with pytest.raises(RemoteError, match="state must be one of") as bad:
                remote.jobs_list("LOST", 10)
            assert bad.value.status == 400
        finally:
            remote.close()


def test_remote_admin_says_what_to_do_when_refused(api: Client) -> None:
    _client, ctx, _auth = api
    revoked = bearer(ctx, "admin", name="gone")["Authorization"].split()[1]
    tokens.revoke(ctx.engine, "gone", 1.0)
    radiologist = bearer(ctx, "radiologist")["Authorization"].split()[1]
    with served(ctx) as url:
        for token in (None, revoked):
            with pytest.raises(RemoteError, match="token missing or revoked") as refused:
                RemoteAdmin(url, token).status()
            assert refused.value.status == 401 and "pacs-ai tokens create" in str(refused.value)
        with pytest.raises(RemoteError, match=r"needs 'admin'.*role admin$") as forbidden:
            RemoteAdmin(url, radiologist).jobs_list(None, 10)
        assert forbidden.value.status == 403
    with pytest.raises(RemoteError, match=rf"cannot reach the node at {url}.*node\.http_port"):
        RemoteAdmin(url, "pai_x", timeout_s=2).status()
