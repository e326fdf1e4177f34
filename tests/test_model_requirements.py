"""What a model's manifest asks of a series (modality, slice count) and of the worker (a CUDA
device), enforced on real jobs.

Real files go through the real ingest path into a real database, and the real ``run_job``
(what a Celery worker calls) runs the job, so the only thing missing is the broker. The
CUDA-only model is a real TorchScript model folder, registered as ``models.paths`` registers
it; each test that registers one gets a fresh process-wide registry, so no test model stays
installed for the tests after it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import MRImageStorage
from sqlalchemy import Engine, select

from pacs_ai.config import Settings, load_settings
from pacs_ai.errors import ConfigError
from pacs_ai.models import registry
from pacs_ai.models.base import ModelManifest
from pacs_ai.models.registry import ModelRegistry, check_preload, register_dirs, wrong_device
from pacs_ai.phantoms.chest_ct import Geometry, write_chest_ct
from pacs_ai.pipeline import jobs
from pacs_ai.pipeline.infer import ModelCache, WorkerContext, resolve_device, run_job
from pacs_ai.pipeline.route import Priority
from pacs_ai.storage.ingest import Ingest
from pacs_ai.storage.schema import deliveries, instances, series
from tests.peers import without_node_settings
from tests.records import local_worker, node_on_disk
from tests.test_models_loaders import manifest, model_dir, pointwise

# Authoring TorchScript is deprecated in torch 2.13; bundles still ship it, so tests make it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

MODEL = "ct-organs-threshold"  # a built-in: no weights to load, a cheap encode
MIN_SLICES = registry.create(MODEL).manifest.min_slices
GPU_MODEL = "tissue-net-cuda"


def _geometry(slices: int) -> Geometry:
    return Geometry(rows=64, columns=64, pixel_spacing_mm=5.6, slices=slices, slice_thickness_mm=5)


def _as_mr(path: Path) -> None:
    """The same pixels sent as an MR series: what a rule without a Modality match lets in."""
    ds = dcmread(path)
    ds.Modality = "MR"
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.save_as(path)


def _store_series(
    ingest: Ingest, folder: Path, slices: int, seed: int, damage: Callable[[Path], None] | None
) -> tuple[int, int]:
    """One axial phantom series, stored as a sender would; its (study id, series id)."""
    truth = write_chest_ct(
        folder, _geometry(slices), seed=seed, with_lung_series=False, with_scout=False
    )
    (series_uid,) = truth.series.values()
    for path in truth.files:
        if damage is not None:
            damage(path)
        assert ingest.store(path.read_bytes(), "CT").status == 0
    with ingest.engine.connect() as conn:
        study_id, series_id = conn.execute(
            select(series.c.study_id, series.c.id).where(series.c.series_instance_uid == series_uid)
        ).one()
    return int(study_id), int(series_id)


def _job(engine: Engine, ids: tuple[int, int], model: str, max_attempts: int = 3) -> int:
    spec = jobs.JobSpec(*ids, model, "r", Priority.ROUTINE, (), 1)
    ((job_id, _),), _ = jobs.create(engine, [spec], [], max_attempts, 3, 0.0)
    return job_id


def _results(engine: Engine, job_id: int) -> tuple[int, int]:
    """(result instances in the index, deliveries) that a job left."""
    with engine.connect() as conn:
        kept = conn.execute(
            select(instances.c.id).where(instances.c.path.like(f"results/{job_id}/%"))
        ).all()
        sent = conn.execute(select(deliveries.c.id).where(deliveries.c.job_id == job_id)).all()
    return len(kept), len(sent)


# --- the series: modality and slice count ------------------------------------------------------


@pytest.mark.parametrize("prepared", [False, True], ids=["read-by-the-job", "prepared"])
@pytest.mark.parametrize(
    "slices, damage, words",
    [
        (MIN_SLICES, _as_mr, [MODEL, "takes CT", "not 'MR'"]),
        (
            MIN_SLICES - 1,
            None,
            [MODEL, f"at least {MIN_SLICES} slices", f"has {MIN_SLICES - 1}"],
        ),
    ],
    ids=["modality-not-accepted", "one-slice-too-few"],
)
def test_a_series_the_model_does_not_take_ends_its_job_skipped_with_the_reason(
    tmp_path: Path,
    database_url: str,
    prepared: bool,
    slices: int,
    damage: Callable[[Path], None] | None,
    words: list[str],
) -> None:
    """The check runs on both paths a series reaches a model by: read by the job itself, or
    prepared by the worker in the study's quiet period."""
    settings, ingest = node_on_disk(tmp_path, database_url)
    ids = _store_series(ingest, tmp_path / "unfit", slices, 0, damage)
    job_id = _job(ingest.engine, ids, MODEL)
    ctx = local_worker(settings, ingest.engine)
    if prepared:
        assert ctx.prepared is not None and ctx.prepared.prepare(ids[1]) == "PREPARED"

    assert run_job(ctx, job_id) == "SKIPPED"

    row = jobs.job_row(ingest.engine, job_id)
    assert row is not None and row.state == "SKIPPED", row
    for word in words:
        assert word in row.reason, row.reason
    assert row.finished_at is not None and row.attempts == 1
    assert _results(ingest.engine, job_id) == (0, 0)  # no SEG, no SR, nothing to send
    if ctx.prepared is not None:
        assert ctx.prepared.entries == {}  # the job took the prepared series
    # The same worker runs the model on a series that just suits it: exactly MIN_SLICES CT
    # slices, so the refusal above was the series', at its boundary.
    fit = _store_series(ingest, tmp_path / "fit", MIN_SLICES, 1, None)
    fit_job = _job(ingest.engine, fit, MODEL)
    assert run_job(ctx, fit_job) == "ENCODED"
    assert _results(ingest.engine, fit_job) == (2, 0)  # SEG and SR kept on the node
    ingest.close()


# --- the worker: a model that needs CUDA -------------------------------------------------------


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh process-wide registry (built-ins and entry points as usual), put back after."""
    monkeypatch.setattr(registry, "_default", ModelRegistry())


def _tissue_models(root: Path) -> Path:
    """Two folders of one real TorchScript network that runs on a CPU: one whose manifest
    asks for CUDA, one that runs anywhere."""
    net = pointwise()
    model_dir(root / GPU_MODEL, manifest(GPU_MODEL, device="cuda"), net)
    model_dir(root / "tissue-net-any", manifest("tissue-net-any", device="any"), net)
    return root


def _message(name: str, device: str) -> list[str]:
    return [
        f"model '{name}' needs a CUDA device",
        f"this worker runs on {device}",
        "pacs-ai worker --queues infer --device cuda:0",
        "on a GPU machine",
    ]


def test_only_a_cuda_model_on_a_cpu_is_refused() -> None:
    needs = {
        device: ModelManifest(GPU_MODEL, "1", "segmentation", "", (), device=device)
        for device in ("cuda", "cpu", "any")
    }
    why = wrong_device(GPU_MODEL, needs["cuda"], "cpu")
    assert why is not None
    for part in _message(GPU_MODEL, "cpu"):
        assert part in why
    for worker in ("cuda", "cuda:0", "cuda:3"):
        assert wrong_device(GPU_MODEL, needs["cuda"], worker) is None
    for device in ("cpu", "any"):
        for worker in ("cpu", "cuda:0"):
            assert wrong_device(GPU_MODEL, needs[device], worker) is None


@pytest.mark.usefixtures("own_registry")
def test_a_job_of_a_cuda_model_on_a_cpu_worker_fails_without_loading_it(
    tmp_path: Path, database_url: str
) -> None:
    """Its attempts fail at once with how to fix it, the retry goes back to the infer queue
    (where a GPU worker may take it), and the last attempt leaves the job FAILED. The same
    network with a manifest that does not ask for CUDA runs on this very worker."""
    settings, ingest = node_on_disk(tmp_path, database_url)
    assert set(register_dirs([_tissue_models(tmp_path / "models")])) == {
        GPU_MODEL,
        "tissue-net-any",
    }
    ids = _store_series(ingest, tmp_path / "ct", MIN_SLICES, 0, None)
    job_id = _job(ingest.engine, ids, GPU_MODEL, max_attempts=2)
    retried: list[tuple[int, Priority]] = []
    ctx = WorkerContext(
        settings,
        ingest.engine,
        ModelCache("cpu"),
        enqueue_delivery=lambda _: None,
        enqueue_job_retry=lambda job, priority: retried.append((job, priority)),
    )

    assert run_job(ctx, job_id) == "QUEUED"
    assert retried == [(job_id, Priority.ROUTINE)]
    assert run_job(ctx, job_id) == "FAILED"
    assert len(retried) == 1  # the last attempt is not sent again

    row = jobs.job_row(ingest.engine, job_id)
    assert row is not None and row.state == "FAILED" and row.attempts == 2, row
    for part in _message(GPU_MODEL, "cpu"):
        assert part in row.reason, row.reason
    assert ctx.models.loaded == {}  # never loaded on the CPU
    assert _results(ingest.engine, job_id) == (0, 0)

    runs_anywhere = _job(ingest.engine, ids, "tissue-net-any")
    assert run_job(ctx, runs_anywhere) == "ENCODED"
    assert list(ctx.models.loaded) == ["tissue-net-any"]
    ingest.close()


def _worker_settings(tmp_path: Path, models: Path, worker: str) -> Settings:
    config = tmp_path / "pacs-ai.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[models]\npaths = ["{models}"]\n[worker]\n{worker}\n'
    )
    return load_settings(config)


@pytest.mark.usefixtures("own_registry")
def test_a_cpu_worker_refuses_to_preload_a_cuda_model(tmp_path: Path) -> None:
    models = _tissue_models(tmp_path / "models")
    preload = f'preload = ["tissue-net-any", "{GPU_MODEL}"]'
    with pytest.raises(ConfigError) as refused:
        check_preload(_worker_settings(tmp_path, models, f'device = "cpu"\n{preload}'))
    ((key, message),) = refused.value.problems  # the model that runs anywhere passes
    assert key == "worker.preload" and refused.value.source == "worker"
    for part in _message(GPU_MODEL, "cpu"):
        assert part in message, message
    # A GPU worker may preload it; so may a delivery-only worker, which loads no model.
    check_preload(_worker_settings(tmp_path, models, f'device = "cuda:0"\n{preload}'))
    check_preload(_worker_settings(tmp_path, models, f'queues = ["send"]\n{preload}'))
    # "auto" is what this machine resolves it to: refused where that is the CPU.
    auto = _worker_settings(tmp_path, models, f'device = "auto"\n{preload}')
    if resolve_device("auto") == "cpu":
        with pytest.raises(ConfigError, match="needs a CUDA device"):
            check_preload(auto)
    else:
        check_preload(auto)


def test_the_worker_command_on_a_cpu_refuses_to_preload_a_cuda_model(tmp_path: Path) -> None:
    models = _tissue_models(tmp_path / "models")
    (tmp_path / "pacs-ai.toml").write_text(
        f'[models]\npaths = ["{models}"]\n[worker]\nnode_url = "http://127.0.0.1:9"\ntoken = "t"\n'
    )
    # No broker answers at this URL: the command must stop before it tries one.
    done = subprocess.run(
        [sys.executable, "-m", "pacs_ai", "worker", "--device", "cpu", "--preload", GPU_MODEL],
        cwd=tmp_path,
        env=without_node_settings(PACS_AI_BROKER__URL="redis://127.0.0.1:9/0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "invalid configuration" in done.stderr
    assert f"worker.preload: model '{GPU_MODEL}' needs a CUDA device" in done.stderr
    for part in _message(GPU_MODEL, "cpu"):
        assert part in done.stderr, done.stderr


def test_serve_on_a_cpu_refuses_to_preload_a_cuda_model(tmp_path: Path) -> None:
    # Else its embedded worker would refuse the preload, and the node run on with no inference.
    models = _tissue_models(tmp_path / "models")
    data = tmp_path / "data"
    (tmp_path / "pacs-ai.toml").write_text(
        f'[node]\ndata_dir = "{data}"\n[models]\npaths = ["{models}"]\n'
        f'[worker]\ndevice = "cpu"\npreload = ["{GPU_MODEL}"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "pacs_ai", "serve", "--config", str(tmp_path / "pacs-ai.toml")],
        cwd=tmp_path,
        env=without_node_settings(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"worker.preload: model '{GPU_MODEL}' needs a CUDA device" in done.stderr
    assert not data.exists()
