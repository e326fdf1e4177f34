"""Every matching rule fires, and a study that matches none is kept and recorded as such.

The dispatcher plans completions on a real database (SQLite and PostgreSQL); the CLI runs as a
subprocess over that database; the HTTP admin API answers as the local one; migration 0011
adds ``studies.rules_fired`` to a database that already holds studies, and takes it away.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path

from alembic import command
from sqlalchemy import Engine, insert, inspect, select

from pacs_ai import admin
from pacs_ai.config import Settings, load_settings
from pacs_ai.dicom.header import read_header
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.assemble import Assembler
from pacs_ai.pipeline.dispatch import PLANNING_GRACE_S, Dispatcher
from pacs_ai.remote import RemoteAdmin
from pacs_ai.storage import index
from pacs_ai.storage.recorder import InstanceRecorder
from pacs_ai.storage.schema import RULES_FIRED_MAX, RULES_FIRED_MORE, series, studies
from pacs_ai.storage.schema import jobs as jobs_table
from tests.databases import alembic
from tests.peers import without_node_settings
from tests.realdata import real_file
from tests.web import bearer, served, web_client

HEADER = read_header(real_file("CT_small.dcm").read_bytes())  # a CT image
PEER = '[[peers]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nreceive = true\n'


def rule(name: str, modality: str | None = None, forward: bool = False) -> str:
    """A ``[[rules]]`` table: a model run (or a forward to "pacs") on series of ``modality``
    (every series when None)."""
    does = 'forward = ["pacs"]' if forward else 'models = ["ct-organs-threshold"]'
    text = f'[[rules]]\nname = "{name}"\n{does}\n'
    return text + (f'[rules.match]\nModality = "{modality}"\n' if modality else "")


# Neither matches the CT that CT_small.dcm is.
NO_MATCH = rule("mr-brain", "MR") + rule("us-forward", "US", forward=True)


def write_config(tmp_path: Path, engine: Engine, rules: str, name: str = "pacs-ai.toml") -> Path:
    config = tmp_path / name
    url = engine.url.render_as_string(hide_password=False)
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n[database]\nurl = "{url}"\n' + PEER + rules
    )
    return config


@dataclass
class Node:
    """The dispatcher and assembler of a node, on a clock the test moves."""

    engine: Engine
    settings: Settings
    now: float = 100.0

    def __post_init__(self) -> None:
        self.sent: list[tuple[str, int]] = []
        self.dispatcher = Dispatcher(
            self.settings,
            self.engine,
            lambda task, id_, queue, priority: self.sent.append((task, id_)),
            clock=lambda: self.now,
        )

    def complete(self, plan: bool = True) -> list[int]:
        """Complete the quiet studies; without ``plan`` the node dies before routing them."""
        listeners = [self.dispatcher.on_study_complete] if plan else []
        done = Assembler(self.engine, 1, listeners, clock=lambda: self.now).poll()
        return [d.study_id for d in done]


def receive(engine: Engine, study_uid: str, modality: str = "CT", at: float = 1.0) -> int:
    """Three instances of one series of ``study_uid`` from PACS; the study's id."""
    with closing(InstanceRecorder(engine)) as rec:
        for n in range(3):
            header = replace(
                HEADER,
                study_instance_uid=study_uid,
                series_instance_uid=f"{study_uid}.1",
                sop_instance_uid=f"{study_uid}.1.{n}",
                modality=modality,
            )
            assert rec.record(header, "PACS", f"{study_uid}/{n}.dcm", 1, at)
    (reception,) = index.find_studies(engine, study_uid)
    return reception.id


def stored(engine: Engine, study_id: int) -> tuple[int, int, str]:
    """(completions, planned_completions, rules_fired) as the row holds them."""
    with engine.connect() as conn:
        row = conn.execute(
            select(
                studies.c.completions, studies.c.planned_completions, studies.c.rules_fired
            ).where(studies.c.id == study_id)
        ).one()
    return int(row.completions), int(row.planned_completions), str(row.rules_fired)


def summary(engine: Engine, study_uid: str) -> index.StudySummary:
    (reception,) = index.find_studies(engine, study_uid)
    return reception


# --- the dispatcher ---------------------------------------------------------------------------


def test_a_study_that_matches_no_rule_is_kept_and_recorded_as_such(
    engine: Engine, tmp_path: Path
) -> None:
    node = Node(engine, load_settings(write_config(tmp_path, engine, NO_MATCH)))
    study_id = receive(engine, "1.2.826.0.1.3680043.9.7777.1")
    before = summary(engine, "1.2.826.0.1.3680043.9.7777.1")
    assert (before.rules_state, before.planned_completions) == (index.RULES_NOT_PLANNED, 0)

    assert node.complete() == [study_id]

    assert stored(engine, study_id) == (1, 1, "")
    after = summary(engine, "1.2.826.0.1.3680043.9.7777.1")
    assert (after.rules_state, after.rules_fired) == (index.RULES_NONE_MATCHED, ())
    assert after.instance_count == 3  # kept, images and all
    assert jobs.job_rows(engine) == [] and jobs.delivery_rows(engine) == []
    assert node.sent == []


def test_every_matching_rule_fires_and_is_named_in_rule_order(
    engine: Engine, tmp_path: Path
) -> None:
    # Configured order differs from name order, and a rule that does not match sits between.
    rules = rule("zeta-forward", "CT", forward=True) + rule("mr-brain", "MR") + rule("alpha", "CT")
    node = Node(engine, load_settings(write_config(tmp_path, engine, rules)))
    study_id = receive(engine, "1.2.826.0.1.3680043.9.7777.2")

    node.complete()

    assert stored(engine, study_id) == (1, 1, "zeta-forward,alpha")
    shown = summary(engine, "1.2.826.0.1.3680043.9.7777.2")
    assert shown.rules_state == index.RULES_MATCHED
    assert shown.as_json()["rules_fired"] == ["zeta-forward", "alpha"]
    assert [(j.rule, j.model) for j in jobs.job_rows(engine)] == [("alpha", "ct-organs-threshold")]
    assert [(d.kind, d.peer) for d in jobs.delivery_rows(engine)] == [("SERIES", "pacs")]


def test_the_reconciler_does_not_plan_an_unmatched_study_again(
    engine: Engine, tmp_path: Path
) -> None:
    node = Node(engine, load_settings(write_config(tmp_path, engine, NO_MATCH)))
    unmatched = receive(engine, "1.2.826.0.1.3680043.9.7777.3")
    # The node completes the study and dies before routing it: the reconciler plans it.
    node.complete(plan=False)
    assert stored(engine, unmatched) == (1, 0, "")
    assert summary(engine, "1.2.826.0.1.3680043.9.7777.3").rules_state == index.RULES_NOT_PLANNED
    node.now += PLANNING_GRACE_S + 1
    node.dispatcher.reconcile()
    assert stored(engine, unmatched) == (1, 1, "")
    assert summary(engine, "1.2.826.0.1.3680043.9.7777.3").rules_state == index.RULES_NONE_MATCHED

    # An admin then adds a rule that matches it, and the node restarts. Its reconciler is
    # live (it plans a study completed meanwhile), but the unmatched completion was planned.
    later = Node(
        engine,
        load_settings(write_config(tmp_path, engine, rule("any-ct", "CT"), "later.toml")),
        now=node.now,
    )
    newer = receive(engine, "1.2.826.0.1.3680043.9.7777.4", at=later.now)
    later.now += 2
    later.complete(plan=False)
    later.now += PLANNING_GRACE_S + 1
    later.dispatcher.reconcile()
    later.dispatcher.reconcile()

    assert stored(engine, newer) == (1, 1, "any-ct")
    assert stored(engine, unmatched) == (1, 1, "")
    assert {j.study_instance_uid for j in jobs.job_rows(engine)} == {"1.2.826.0.1.3680043.9.7777.4"}
    assert index.unplanned_completions(engine, later.now + 1000) == []


def test_rules_fired_keeps_whole_names_and_says_when_it_left_some_out(
    engine: Engine, tmp_path: Path
) -> None:
    names = [f"rule-{n:02d}-" + "x" * 52 for n in range(12)]  # 60 characters each
    everything = "".join(rule(name, forward=True) for name in names)
    node = Node(engine, load_settings(write_config(tmp_path, engine, everything)))
    study_id = receive(engine, "1.2.826.0.1.3680043.9.7777.5")

    node.complete()

    text = stored(engine, study_id)[2]
    assert len(text) <= RULES_FIRED_MAX and text.endswith("," + RULES_FIRED_MORE)
    kept = text.split(",")[:-1]
    assert kept == names[: len(kept)]  # whole names, in rule order
    assert len(",".join([*names[: len(kept) + 1], RULES_FIRED_MORE])) > RULES_FIRED_MAX
    assert summary(engine, "1.2.826.0.1.3680043.9.7777.5").rules_state == index.RULES_MATCHED

    # Names that fit exactly are kept whole, without the marker.
    exact = ["a" * 255, "b" * 256]
    assert jobs.rules_fired_text(exact) == ",".join(exact)
    assert len(jobs.rules_fired_text(exact)) == RULES_FIRED_MAX


# --- what an admin sees -----------------------------------------------------------------------


def test_the_cli_shows_which_rules_fired_or_that_none_did(engine: Engine, tmp_path: Path) -> None:
    config = write_config(tmp_path, engine, rule("mr-brain", "MR"))
    node = Node(engine, load_settings(config))
    ct, mr, late = (f"1.2.826.0.1.3680043.9.7777.{n}" for n in (6, 7, 8))
    receive(engine, ct)
    receive(engine, mr, modality="MR")
    receive(engine, late, at=node.now - 0.5)  # still in its quiet period
    node.complete()

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "pacs_ai", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=without_node_settings(COLUMNS="250"),
        )
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    assert "rules: none matched (kept; nothing runs)" in cli("studies", "show", ct)
    assert "rules: mr-brain\n" in cli("studies", "show", mr)
    assert "rules: not planned yet" in cli("studies", "show", late)

    listed = {s["study_instance_uid"]: s for s in json.loads(cli("studies", "list", "--json"))}
    assert {uid: (s["rules_state"], s["rules_fired"]) for uid, s in listed.items()} == {
        ct: ("NONE_MATCHED", []),
        mr: ("MATCHED", ["mr-brain"]),
        late: ("NOT_PLANNED", []),
    }
    assert (listed[ct]["completions"], listed[ct]["planned_completions"]) == (1, 1)

    lines = cli("studies", "list").splitlines()
    row = {uid: next(line for line in lines if uid in line) for uid in (ct, mr, late)}
    assert "none matched" in row[ct] and "mr-brain" in row[mr] and "not planned" in row[late]


def test_the_http_admin_api_answers_as_the_local_admin(tmp_path: Path) -> None:
    with web_client(tmp_path, extra_toml=PEER + NO_MATCH) as (_client, ctx):
        node = Node(ctx.engine, ctx.settings)
        uid = "1.2.826.0.1.3680043.9.7777.9"
        receive(ctx.engine, uid)
        node.complete()
        local = admin.LocalAdmin(ctx.settings, ctx.engine)
        with served(ctx) as url:
            remote = RemoteAdmin(url, bearer(ctx, "admin")["Authorization"].split()[1])
            try:
                listed = remote.studies_list(None, 10)
                assert listed == local.studies_list(None, 10)
                assert remote.study_show(uid) == local.study_show(uid)
            finally:
                remote.close()
    (study,) = listed
    assert (study["rules_state"], study["rules_fired"]) == ("NONE_MATCHED", [])


# --- migration 0011 ---------------------------------------------------------------------------


def _study_columns(engine: Engine) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns("studies")}


def test_migration_0011_adds_rules_fired_to_existing_studies_and_removes_it(
    bare_engine: Engine,
) -> None:
    alembic(bare_engine, command.upgrade, "0010")
    assert "rules_fired" not in _study_columns(bare_engine)
    old = {
        "calling_ae": "OLD",
        "state": "COMPLETE",
        "first_received_at": 1.0,
        "last_received_at": 1.0,
        "completions": 2,
        "planned_completions": 2,
    }
    with bare_engine.begin() as conn:
        quiet = conn.execute(
            insert(studies).values(study_instance_uid="1.2.3.1", **old).returning(studies.c.id)
        ).scalar_one()
        busy = conn.execute(
            insert(studies).values(study_instance_uid="1.2.3.2", **old).returning(studies.c.id)
        ).scalar_one()
        series_id = conn.execute(
            insert(series)
            .values(study_id=busy, series_instance_uid="1.2.3.2.1", first_received_at=1.0)
            .returning(series.c.id)
        ).scalar_one()
        # Jobs of the planned completion name its rules; the first completion's do not.
        made = (("lungs", 2), ("brain", 1), ("chest", 2), ("lungs", 2))
        for n, (rule_name, completion) in enumerate(made):
            conn.execute(
                insert(jobs_table).values(
                    study_id=busy,
                    series_id=series_id,
                    model=f"model-{n}",
                    rule=rule_name,
                    priority="ROUTINE",
                    state="DELIVERED",
                    max_attempts=1,
                    created_at=1.0,
                    updated_at=1.0,
                    completion=completion,
                )
            )

    alembic(bare_engine, command.upgrade, "0011")

    with bare_engine.connect() as conn:
        rows = conn.execute(
            select(
                studies.c.id,
                studies.c.study_instance_uid,
                studies.c.completions,
                studies.c.planned_completions,
                studies.c.rules_fired,
            ).order_by(studies.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [
        (quiet, "1.2.3.1", 2, 2, ""),
        (busy, "1.2.3.2", 2, 2, "chest,lungs"),  # name order: a migration knows no rule order
    ]
    assert summary(bare_engine, "1.2.3.1").rules_state == index.RULES_NONE_MATCHED

    alembic(bare_engine, command.downgrade, "0010")
    assert "rules_fired" not in _study_columns(bare_engine)
    with bare_engine.connect() as conn:
        kept = conn.execute(select(studies.c.study_instance_uid).order_by(studies.c.id)).all()
    assert [r[0] for r in kept] == ["1.2.3.1", "1.2.3.2"]
