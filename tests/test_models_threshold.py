"""The ``ct-organs-threshold`` model on the chest phantom and a real CT, and the model registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray

from pacs_ai.errors import UnknownModel
from pacs_ai.imaging.volume import Volume
from pacs_ai.models import registry
from pacs_ai.models.base import Model, ModelManifest, Prediction
from pacs_ai.models.builtin.ct_organs_threshold import (
    BODY,
    BONE,
    LUNGS,
    MANIFEST,
    CtOrgansThreshold,
)
from pacs_ai.models.registry import ModelRegistry
from pacs_ai.phantoms.chest_ct import Geometry, _hu, _masks, write_chest_ct
from tests.realdata import real_file

GEOMETRY = Geometry(slices=60)
NAMES = {BODY: "body", LUNGS: "lungs", BONE: "bone"}


def read_volume(files: list[Path]) -> Volume:
    """A CT series as a Volume: slices sorted along the normal, HU, LPS affine."""
    datasets = [pydicom.dcmread(f) for f in files]
    first = datasets[0]
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    along_row, along_column = iop[:3], iop[3:]
    normal = np.cross(along_row, along_column)
    datasets.sort(key=lambda ds: float(np.dot(normal, ds.ImagePositionPatient)))
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=float)
    steps = np.diff(positions @ normal)
    slice_mm = float(steps.mean()) if steps.size else float(first.SliceThickness)
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)
    voxels = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    ).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 0] = normal * slice_mm
    affine[:3, 1] = along_column * row_mm
    affine[:3, 2] = along_row * column_mm
    affine[:3, 3] = positions[0]
    return Volume(
        voxels=voxels,
        spacing=(slice_mm, row_mm, column_mm),
        affine=affine,
        sop_instance_uids=tuple(ds.SOPInstanceUID for ds in datasets),
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        frame_of_reference_uid=first.get("FrameOfReferenceUID", ""),
        modality=first.Modality,
    )


def synthetic(voxels: NDArray[np.float32], spacing: tuple[float, float, float]) -> Volume:
    """A volume straight from an array, for cases the phantom writer does not make."""
    return Volume(
        voxels=voxels,
        spacing=spacing,
        affine=np.diag([*spacing, 1.0]),
        sop_instance_uids=tuple(f"1.2.3.{i}" for i in range(voxels.shape[0])),
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        frame_of_reference_uid="1.2.3.2",
        modality="CT",
    )


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def predict(volume: Volume) -> Prediction:
    model = CtOrgansThreshold()
    model.load("cpu")
    return model.predict(volume)


@pytest.fixture(scope="module")
def phantom(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Geometry, Volume, dict[str, float]]]:
    """Both axial series of a written phantom study, read back: geometry, volume, true mL."""
    truth = write_chest_ct(tmp_path_factory.mktemp("phantom"), GEOMETRY, with_scout=False)
    lung_geometry = Geometry(slices=GEOMETRY.slices // 2, slice_thickness_mm=2.5)
    series = {}
    for number, geometry in (("002", GEOMETRY), ("003", lung_geometry)):
        files = [f for f in truth.files if f.parent.name == number]
        volume = read_volume(files)
        series[number] = (geometry, volume, truth.volumes_ml[volume.series_instance_uid])
    return series


@pytest.mark.parametrize("series", ["002", "003"])
def test_phantom_masks_and_volumes_match_the_truth(
    phantom: dict[str, tuple[Geometry, Volume, dict[str, float]]], series: str
) -> None:
    geometry, volume, true_ml = phantom[series]
    assert volume.spacing == pytest.approx((geometry.slice_thickness_mm, 0.7, 0.7))
    z = volume.affine[2, 3] + np.arange(volume.shape[0]) * volume.spacing[0]
    truth = _masks(geometry, z)

    prediction = predict(volume)

    labelmap = prediction.labelmap
    assert labelmap.shape == volume.shape and labelmap.dtype == np.uint8
    assert set(np.unique(labelmap)) == {0, BODY, LUNGS, BONE}
    assert dice(labelmap > 0, truth["body"]) >= 0.99
    # One label per voxel: the Body label is the outline less the lungs and bone.
    truth["body"] = truth["body"] & ~truth["lungs"] & ~truth["bone"]
    assert dice(labelmap == BODY, truth["body"]) >= 0.99
    assert dice(labelmap == LUNGS, truth["lungs"]) >= 0.99
    assert dice(labelmap == BONE, truth["bone"]) >= 0.95
    assert [f.label for f in prediction.findings] == [BODY, LUNGS, BONE]
    voxel_ml = volume.voxel_volume_ml
    true_ml = {**true_ml, "body": float(truth["body"].sum()) * voxel_ml}
    for finding in prediction.findings:
        name = NAMES[finding.label]
        assert finding.name.lower() == name and finding.certainty is None
        assert finding.volume_ml == pytest.approx(true_ml[name], rel=0.05)
        # The centre is a voxel of the structure itself (for lungs, not the mediastinum).
        assert finding.center is not None
        assert truth[name][finding.center]


def test_real_ct_slice_finds_body_and_bone() -> None:
    volume = read_volume([real_file("CT_small.dcm")])
    assert volume.shape == (1, 128, 128)

    prediction = predict(volume)

    found = {f.label: f for f in prediction.findings}
    assert BODY in found and BONE in found
    body_share = np.count_nonzero(prediction.labelmap) / prediction.labelmap.size
    # The slice is cropped to the spine: mostly body, with lung in two corners left out.
    assert 0.6 < body_share < 0.95
    assert found[BODY].volume_ml == pytest.approx(
        np.count_nonzero(prediction.labelmap == BODY) * volume.voxel_volume_ml
    )
    assert found[BONE].center is not None
    assert prediction.labelmap[found[BONE].center] == BONE


def test_gas_pockets_and_air_open_to_the_outside_are_not_lung() -> None:
    geometry = Geometry(
        rows=128, columns=128, pixel_spacing_mm=2.8, slices=40, slice_thickness_mm=5
    )
    z = geometry.z0_mm + (np.arange(geometry.slices) + 0.5) * geometry.slice_thickness_mm
    truth = _masks(geometry, z)
    voxels = _hu(truth, np.random.default_rng(3)).astype(np.float32)
    parts = {name: np.zeros_like(truth["body"]) for name in ("gas", "notch", "airway", "vessel")}
    # 60 mL of bowel gas below the lungs: above the minimum lung volume, but small beside
    # the lungs, which an airway joins into one component, as in real chests.
    parts["gas"][1:7, 40:56, 56:72] = True
    parts["airway"][18:23, 60:64, 56:72] = True
    # A cleft of outside air reaching into the back, and a vessel inside the right lung.
    parts["notch"][10:30, 98:102, 78:] = True
    parts["vessel"][15:25, 60:62, 88:90] = True
    voxels[parts["gas"] | parts["notch"] | parts["airway"]] = -1000.0
    voxels[parts["vessel"]] = 40.0

    labelmap = predict(synthetic(voxels, (5.0, 2.8, 2.8))).labelmap

    assert np.all(labelmap[parts["gas"]] == BODY)
    assert not np.any(labelmap[parts["notch"]])
    assert np.all(labelmap[parts["vessel"]] == LUNGS)
    expected_lungs = truth["lungs"] | parts["airway"] | parts["vessel"]
    assert dice(labelmap == LUNGS, expected_lungs) >= 0.99
    assert dice(labelmap > 0, truth["body"] & ~parts["notch"]) >= 0.99


def test_same_input_same_output_and_input_untouched() -> None:
    geometry = Geometry(rows=96, columns=96, pixel_spacing_mm=3.8, slices=24, slice_thickness_mm=5)
    z = geometry.z0_mm + (np.arange(geometry.slices) + 0.5) * geometry.slice_thickness_mm
    voxels = _hu(_masks(geometry, z), np.random.default_rng(5)).astype(np.float32)
    volume = synthetic(voxels, (5.0, 3.8, 3.8))
    before = voxels.copy()

    first, second = predict(volume), predict(volume)

    assert np.array_equal(first.labelmap, second.labelmap)
    assert first.findings == second.findings
    assert np.array_equal(volume.voxels, before)


def test_refuses_what_is_not_ct() -> None:
    volume = synthetic(np.zeros((2, 8, 8), np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="modality must be CT, got 'MR'"):
        predict(replace(volume, modality="MR"))


def test_registry_lists_and_creates_the_builtin() -> None:
    manifests = registry.available()
    assert manifests["ct-organs-threshold"] == MANIFEST
    assert (MANIFEST.task, MANIFEST.modalities, MANIFEST.min_slices) == (
        "segmentation",
        ("CT",),
        20,
    )
    assert [label.type.value for label in MANIFEST.labels] == ["38266002", "39607008", "272673000"]
    assert MANIFEST.algorithm_family.value == "123101"

    model = registry.create("ct-organs-threshold")
    assert isinstance(model, Model) and isinstance(model, CtOrgansThreshold)
    assert model is not registry.create("ct-organs-threshold")
    model.load("cpu")
    voxels = np.full((3, 32, 32), -1000.0, np.float32)
    voxels[:, 8:24, 8:24] = 40.0
    labelmap = model.predict(synthetic(voxels, (1.0, 1.0, 1.0))).labelmap
    assert np.array_equal(labelmap == BODY, voxels > 0)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(UnknownModel) as caught:
        registry.create("ct-organs-treshold")
    assert "ct-organs-treshold" in str(caught.value)
    assert "ct-organs-threshold" in str(caught.value)
    assert "ct-organs-threshold" in caught.value.known


class EchoModel:
    """A model made up by the test: labels every voxel above 0 as 1."""

    manifest = ModelManifest(
        name="test-echo",
        version="0.0.1",
        task="segmentation",
        description="test model",
        labels=(),
        device="cpu",
    )

    def load(self, device: str) -> None:
        pass

    def predict(self, volume: Volume) -> Prediction:
        return Prediction(labelmap=(volume.voxels > 0).astype(np.uint8))


def test_registered_factory_is_listed_and_created() -> None:
    own = ModelRegistry(entry_points=False, builtins=False)
    with pytest.raises(UnknownModel, match="none are installed"):
        own.create("test-echo")
    assert own.register(EchoModel) is EchoModel

    assert own.available() == {"test-echo": EchoModel.manifest}
    assert isinstance(own.create("test-echo"), EchoModel)
    assert "test-echo" not in registry.available()


def test_entry_point_of_an_installed_distribution_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real (if tiny) installed distribution: a module and a dist-info with entry points.
    (tmp_path / "echo_plugin.py").write_text(
        "from tests.test_models_threshold import EchoModel as Echo\n"
    )
    dist_info = tmp_path / "echo_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        "[pacs_ai.models]\ntest-echo = echo_plugin:Echo\nmisnamed = echo_plugin:Echo\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    own = ModelRegistry()
    listed = own.available()
    assert {"ct-organs-threshold", "test-echo"} <= set(listed) and "misnamed" not in listed
    assert isinstance(own.create("test-echo"), EchoModel)
    with pytest.raises(ValueError, match="must be named after the model's manifest"):
        own.create("misnamed")


def test_creating_a_classical_model_does_not_import_torch() -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from pacs_ai.imaging.volume import Volume
        from pacs_ai.models import registry
        model = registry.create("ct-organs-threshold")
        model.load("cpu")
        voxels = np.zeros((2, 8, 8), np.float32)
        model.predict(Volume(voxels, (1.0, 1.0, 1.0), np.eye(4), ("1", "2"), "3", "4", "5", "CT"))
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
        """
    )
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
