"""A worker's warm-up: the rules' models loaded once, the encode rehearsed, nothing fatal."""

from __future__ import annotations

import logging
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_ai.config import Settings, load_settings
from pacs_ai.errors import UnknownModel
from pacs_ai.imaging.volume import Volume
from pacs_ai.models.base import ModelManifest, Prediction
from pacs_ai.pipeline import warmup
from pacs_ai.pipeline.infer import ModelCache
from tests.test_results_seg import dciodvfy_errors

RULES = """
[[rules]]
name = "chest"
models = ["model-a", "model-b"]
[[rules]]
name = "again"
models = ["model-b", "no-such-model"]
[[rules]]
name = "off"
models = ["model-c"]
enabled = false
"""


class CountingModel:
    """A model made up by the test that counts its loads; loading takes ``load_s``."""

    loads: list[str]
    load_s = 0.0

    def __init__(self, name: str) -> None:
        self.manifest = ModelManifest(
            name=name, version="1", task="segmentation", description="test", labels=()
        )

    def load(self, device: str) -> None:
        time.sleep(self.load_s)
        CountingModel.loads.append(self.manifest.name)

    def predict(self, volume: Volume) -> Prediction:
        return Prediction(labelmap=np.zeros(volume.shape, dtype=np.uint8))


@pytest.fixture(autouse=True)
def counting_models(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model but ``no-such-model`` is a :class:`CountingModel`; returns the loads."""
    CountingModel.loads = []

    def create(name: str) -> CountingModel:
        if name == "no-such-model":
            raise UnknownModel(name, ["model-a"])
        return CountingModel(name)

    monkeypatch.setattr("pacs_ai.pipeline.infer.create", create)
    return CountingModel.loads


def _settings(tmp_path: Path, extra: str = "") -> Settings:
    config = tmp_path / "pacs-ai.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{extra}{RULES}')
    return load_settings(config)


def test_the_models_are_those_of_the_enabled_rules_each_once(tmp_path: Path) -> None:
    assert warmup.rule_models(_settings(tmp_path)) == ["model-a", "model-b", "no-such-model"]


def test_warm_up_loads_each_model_once_and_survives_one_that_cannot_load(
    tmp_path: Path, counting_models: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cache = ModelCache("cpu")
    with caplog.at_level(logging.WARNING, logger="pacs_ai.pipeline.warmup"):
        warmup.warm_up(_settings(tmp_path), cache)
    assert counting_models == ["model-a", "model-b"]
    assert "no-such-model" in caplog.text
    # The first job finds its model loaded.
    assert cache.get("model-b").manifest.name == "model-b"
    assert counting_models == ["model-a", "model-b"]


def test_start_warms_up_in_the_background_only_where_jobs_run(
    tmp_path: Path, counting_models: list[str]
) -> None:
    send_only = _settings(tmp_path, '[worker]\nqueues = ["send"]\n')
    assert warmup.start(send_only, ModelCache("cpu")) is None
    thread = warmup.start(_settings(tmp_path), ModelCache("cpu"))
    assert thread is not None and thread.daemon
    thread.join(60)
    assert counting_models == ["model-a", "model-b"]


def test_a_job_waits_for_the_load_in_progress_instead_of_loading_again(
    counting_models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CountingModel, "load_s", 0.3)
    cache = ModelCache("cpu")
    threads = [threading.Thread(target=cache.get, args=("model-a",)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert counting_models == ["model-a"]


def test_a_job_arriving_during_the_warm_up_waits_for_it(
    tmp_path: Path, counting_models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CountingModel, "load_s", 0.2)
    rehearsing = threading.Event()
    monkeypatch.setattr(warmup, "rehearse", rehearsing.set)
    cache = ModelCache("cpu")
    thread = warmup.start(_settings(tmp_path), cache)
    assert thread is not None and rehearsing.wait(10)
    # The warm-up holds the cache: the job's model comes after everything it loads.
    model, waited, loading = cache.timed_get("model-b")
    assert model.manifest.name == "model-b" and counting_models == ["model-a", "model-b"]
    assert waited >= 0.2 and loading == 0.0  # the job waited; the warm-up had loaded it
    thread.join(10)


def test_the_rehearsal_encodes_a_synthetic_series(tmp_path: Path) -> None:
    datasets = warmup.synthetic_series(slices=3, size=6)
    assert [int(ds.InstanceNumber) for ds in datasets] == [1, 2, 3]
    # Reads, builds a volume, encodes SEG and SR: what it warms up is a job's real encode.
    seg_bytes, sr_bytes = warmup.rehearse()
    seg, sr = (pydicom.dcmread(BytesIO(raw)) for raw in (seg_bytes, sr_bytes))
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    assert len(seg.SegmentSequence) == 1 and int(seg.NumberOfFrames) >= 1
    for name, raw in (("seg.dcm", seg_bytes), ("sr.dcm", sr_bytes)):
        (tmp_path / name).write_bytes(raw)
        errors, output = dciodvfy_errors(tmp_path / name)
        assert errors == [], output
