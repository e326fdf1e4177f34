"""Model folders from disk: TorchScript, torch.export, ONNX and MONAI bundles, run on volumes.

The networks are built here with weights set by hand, so that each computes a known function
and the expected label map is known exactly: "tissue" is HU > -500 (logit (HU + 500) / 50).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped]
from scipy.special import expit  # type: ignore[import-untyped]
from torch import nn

from pacs_ai.errors import ModelLoadError
from pacs_ai.imaging.volume import Volume
from pacs_ai.models.base import Model
from pacs_ai.models.file_model import TorchFileModel
from pacs_ai.models.inference import InputSpec, orientation_for
from pacs_ai.models.loaders import discover, load_model_dir, read_model_dir
from pacs_ai.models.registry import ModelRegistry

# Authoring TorchScript is deprecated in torch 2.13; bundles still ship it, so tests make it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

SPACING = (2.5, 0.8, 0.8)
TISSUE_HU, MARKER_HU, LUNG_HU, AIR_HU = 40.0, 60.0, -850.0, -1000.0
ANATOMY = {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
SOFT_TISSUE = {"value": "87784001", "scheme": "SCT", "meaning": "Soft tissue"}
LABEL = {"number": 1, "name": "Tissue", "category": ANATOMY, "type": SOFT_TISSUE}


def make_volume(
    voxels: NDArray[np.float32], spacing: tuple[float, float, float] = SPACING
) -> Volume:
    """Axial LPS volume: slices along +S, rows along +P, columns along +L."""
    return Volume(
        voxels=voxels,
        spacing=spacing,
        affine=np.diag([*spacing, 1.0])[[2, 1, 0, 3]],
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.1.{i}" for i in range(len(voxels))),
        study_instance_uid="1.2.826.0.1.3680043.10.1",
        series_instance_uid="1.2.826.0.1.3680043.10.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.10.3",
        modality="CT",
    )


def phantom() -> NDArray[np.float32]:
    """Air around a tissue block holding two lungs, and a separate small tissue marker."""
    hu = np.full((12, 20, 24), AIR_HU, dtype=np.float32)
    hu[2:10, 3:17, 3:21] = TISSUE_HU
    hu[3:9, 6:14, 6:10] = LUNG_HU
    hu[3:9, 6:14, 14:18] = LUNG_HU
    hu[10:12, 0:2, 0:3] = MARKER_HU
    return hu


def conv_net(channels: int, tap: tuple[int, int, int], weight: float, bias: float) -> nn.Module:
    """A 3×3×3 conv whose last channel is ``weight * input[tap] + bias``; other channels 0."""
    conv = nn.Conv3d(1, channels, 3, padding=1)
    kernel = torch.zeros_like(conv.weight)
    kernel[(-1, 0, *tap)] = weight
    offsets = torch.zeros(channels)
    offsets[-1] = bias
    conv.weight, conv.bias = nn.Parameter(kernel), nn.Parameter(offsets)
    return conv.eval()


def pointwise(channels: int = 1) -> nn.Module:
    """logit = (HU + 500) / 50 per voxel: "tissue" above -500 HU."""
    return conv_net(channels, (1, 1, 1), 1 / 50, 10.0)


def save_torchscript(net: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(net).save(str(path))  # type: ignore[no-untyped-call]


def save_export(net: nn.Module, path: Path) -> None:
    dynamic = {
        2: torch.export.Dim.DYNAMIC,
        3: torch.export.Dim.DYNAMIC,
        4: torch.export.Dim.DYNAMIC,
    }
    program = torch.export.export(net, (torch.zeros(1, 1, 8, 8, 8),), dynamic_shapes=(dynamic,))
    torch.export.save(program, path)


def manifest(name: str = "tissue-net", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "version": "1.0.0", "task": "segmentation", "labels": [LABEL]} | overrides


def model_dir(root: Path, data: dict[str, Any], net: nn.Module | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(data))
    if net is not None:
        save_torchscript(net, root / "model.ts")
    return root


def run(
    folder: Path, voxels: NDArray[np.float32], spacing: tuple[float, float, float] = SPACING
) -> Any:
    model = load_model_dir(folder)
    model.load("cpu")
    return model.predict(make_volume(voxels, spacing))


def test_torchscript_folder_segments_and_describes_components(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "net", manifest(description="HU > -500"), pointwise())
    model = load_model_dir(folder)
    assert isinstance(model, Model)
    assert model.manifest.labels[0].type.meaning == "Soft tissue"
    model.load("cpu")
    hu = phantom()
    prediction = model.predict(make_volume(hu))

    expected = hu > -500
    assert prediction.labelmap.dtype == np.uint8
    np.testing.assert_array_equal(prediction.labelmap, expected.astype(np.uint8))
    assert prediction.present is None
    _, count = ndimage.label(expected)
    assert count == 2 and len(prediction.findings) == 2
    voxel_ml = float(np.prod(SPACING)) / 1000
    body, marker = prediction.findings
    assert body.volume_ml == pytest.approx(np.count_nonzero(expected[:10]) * voxel_ml)
    assert marker.volume_ml == pytest.approx(2 * 2 * 3 * voxel_ml)
    assert body.certainty == pytest.approx(expit((TISSUE_HU + 500) / 50), rel=1e-5)
    assert marker.certainty == pytest.approx(expit((MARKER_HU + 500) / 50), rel=1e-5)
    for finding in prediction.findings:
        assert finding.label == 1 and finding.name == "Tissue"
        assert finding.center is not None and expected[finding.center]


def test_torch_export_detection_model_reports_presence(tmp_path: Path) -> None:
    folder = model_dir(
        tmp_path / "det", manifest(task="detection", input={"min_component_ml": 0.1})
    )
    save_export(pointwise(), folder / "model.pt2")
    hu = phantom()
    prediction = run(folder, hu)
    # The marker (12 voxels, 0.019 mL) is below min_component_ml: gone from map and findings.
    expected = hu > -500
    expected[10:] = False
    np.testing.assert_array_equal(prediction.labelmap, expected.astype(np.uint8))
    assert prediction.present is True and len(prediction.findings) == 1

    empty = run(folder, np.full((6, 8, 8), AIR_HU, dtype=np.float32))
    assert empty.present is False and empty.findings == []
    assert not empty.labelmap.any()


@pytest.mark.parametrize("patch", [[5, 7, 9], [16, 6, 30]])
def test_sliding_window_equals_whole_volume_for_a_pointwise_network(
    tmp_path: Path, patch: list[int]
) -> None:
    hu = phantom()
    whole = run(model_dir(tmp_path / "whole", manifest(), pointwise()), hu)
    input_spec = {"patch": patch, "overlap": 0.5, "batch_size": 3}
    windowed = run(model_dir(tmp_path / "windows", manifest(input=input_spec), pointwise()), hu)
    np.testing.assert_array_equal(windowed.labelmap, whole.labelmap)
    for a, b in zip(windowed.findings, whole.findings, strict=True):
        assert (a.volume_ml, a.center) == (b.volume_ml, b.center)
        assert a.certainty == pytest.approx(b.certainty, rel=1e-6)


def test_resampling_round_trip_stays_on_the_original_grid(tmp_path: Path) -> None:
    hu = phantom()
    plain = run(model_dir(tmp_path / "plain", manifest(), pointwise()), hu)
    resampled_spec = {"spacing_mm": [1.25, 1.6, 1.1]}
    folder = model_dir(tmp_path / "resampled", manifest(input=resampled_spec), pointwise())
    resampled = run(folder, hu)
    assert resampled.labelmap.shape == hu.shape
    differ = resampled.labelmap != plain.labelmap
    mask = plain.labelmap > 0
    boundary = ndimage.binary_dilation(mask, iterations=2) & ~ndimage.binary_erosion(
        mask, iterations=2, border_value=1
    )
    assert not (differ & ~boundary).any()
    assert np.count_nonzero(differ) < 0.1 * np.count_nonzero(boundary)


def test_orientation_follows_the_affine() -> None:
    hu = phantom()
    ras = orientation_for(make_volume(hu).affine, "RAS")
    # Columns run to the patient's left and rows to posterior: both reversed, then S last.
    np.testing.assert_array_equal(ras.forward(hu), hu.transpose(2, 1, 0)[::-1, ::-1, :])
    np.testing.assert_array_equal(ras.backward(ras.forward(hu)[None])[0], hu)


def shift_towards_right(channels: int) -> nn.Module:
    """Logit 20 x - 10 of the next voxel along the network's first axis, for x in 0..1."""
    return conv_net(channels, (2, 1, 1), 20.0, -10.0)


def write_bundle(root: Path, manifest_data: dict[str, Any] | None) -> Path:
    (root / "configs").mkdir(parents=True)
    metadata = {
        "version": "0.3.1",
        "description": "A MONAI-shaped bundle built by the test",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1}},
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 2,
                    "channel_def": {"0": "background", "1": "tissue"},
                }
            },
        },
    }
    transforms = [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": -1000,
            "a_max": 0,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
    ]
    inference = {"preprocessing": {"_target_": "Compose", "transforms": transforms}}
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    if manifest_data is not None:
        (root / "manifest.json").write_text(json.dumps(manifest_data))
    return root


def test_monai_bundle_with_torchscript_runs_in_its_orientation(tmp_path: Path) -> None:
    label_codes = {"number": 1, "category": ANATOMY, "type": SOFT_TISSUE}
    bundle = write_bundle(tmp_path / "tissue_bundle", {"labels": [label_codes]})
    save_torchscript(shift_towards_right(2), bundle / "models" / "model.ts")

    found = read_model_dir(bundle)
    assert found.network_format == "torchscript"
    assert (found.manifest.name, found.manifest.version) == ("tissue_bundle", "0.3.1")
    assert found.manifest.labels[0].name == "tissue"
    assert found.spec == InputSpec(
        orientation="RAS", window=(-1000, 0), normalise="minmax", activation="softmax"
    )
    hu = phantom()
    prediction = run(bundle, hu)
    # The network looks one voxel to the patient's right: one column back, as columns run left.
    expected = np.zeros(hu.shape, dtype=np.uint8)
    expected[:, :, 1:] = hu[:, :, :-1] > -500
    np.testing.assert_array_equal(prediction.labelmap, expected)


def test_bundle_without_torchscript_needs_monai(tmp_path: Path) -> None:
    if importlib.util.find_spec("monai") is not None:
        pytest.skip("MONAI is installed here")
    bundle = write_bundle(tmp_path / "bundle", {"labels": [{"number": 1, **LABEL}]})
    (bundle / "models").mkdir()
    torch.save(shift_towards_right(2).state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(ModelLoadError, match=r"pip install monai") as caught:
        load_model_dir(bundle)
    assert caught.value.path == str(bundle / "models" / "model.pt")


def test_bundle_needs_a_pacs_ai_manifest_for_label_codes(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle", None)
    save_torchscript(shift_towards_right(2), bundle / "models" / "model.ts")
    with pytest.raises(ModelLoadError, match=r"without a pacs-ai manifest\.json"):
        load_model_dir(bundle)
    (bundle / "manifest.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"labels\[0\]: missing field 'category', 'type'"):
        load_model_dir(bundle)


def test_onnx_model_needs_onnxruntime(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "onnx", manifest())
    if importlib.util.find_spec("onnxruntime") is None:
        (folder / "model.onnx").write_bytes(b"never read without onnxruntime")
        with pytest.raises(ModelLoadError, match=r"onnxruntime.*pip install pacs-ai\[onnx\]"):
            load_model_dir(folder)
        return
    try:
        torch.onnx.export(pointwise(), (torch.zeros(1, 1, 12, 20, 24),), str(folder / "model.onnx"))
    except ImportError:
        pytest.skip("torch.onnx.export needs the onnx/onnxscript packages, not installed")
    hu = phantom()
    np.testing.assert_array_equal(run(folder, hu).labelmap, (hu > -500).astype(np.uint8))


@pytest.mark.parametrize(
    ("content", "extra_files", "message"),
    [
        ({k: v for k, v in manifest().items() if k != "name"}, [], "missing field 'name'"),
        ("{not json", [], "is not valid JSON: .* line 1, column 2"),
        (manifest(), ["model.pt2"], r"2 network files \(model.ts, model.pt2\)"),
        (
            manifest(labels=[LABEL | {"type": SOFT_TISSUE | {"code": "x"}}]),
            [],
            "labels.0..type: unknown field 'code'",
        ),
        (manifest(labels=[LABEL | {"number": 0}]), [], r"labels\[0\].number must be 1 to 255"),
        (manifest(input={"normalise": "z"}), [], "input: normalise must be one of"),
        (manifest(input={"window": [0]}), [], "input: window must be 2 numbers"),
        (manifest(task="classification"), [], "task must be one of segmentation, detection"),
    ],
)
def test_bad_model_folders_name_the_file_and_the_problem(
    tmp_path: Path, content: Any, extra_files: list[str], message: str
) -> None:
    folder = model_dir(tmp_path / "bad", {}, pointwise())
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "manifest.json").write_text(text)
    for name in extra_files:
        (folder / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_model_dir(folder)
    if not extra_files:
        assert caught.value.path == str(folder / "manifest.json")


def test_a_folder_without_a_network_file(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "empty", manifest())
    with pytest.raises(ModelLoadError, match=r"no network file: expected one of model\.ts"):
        load_model_dir(folder)


def test_a_state_dict_is_not_torchscript(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "weights", manifest())
    torch.save(pointwise().state_dict(), folder / "model.pt")
    model = load_model_dir(folder)
    with pytest.raises(ModelLoadError, match=r"model\.pt: cannot be loaded as torchscript"):
        model.load("cpu")


def test_register_dirs_makes_folders_available_by_name(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_dir(root / "a", manifest("tissue-a"), pointwise())
    model_dir(root / "b", manifest("tissue-b", version="2.0"), pointwise())
    (root / "notes").mkdir()  # not a model folder: ignored
    registry = ModelRegistry(entry_points=False, builtins=False)
    assert registry.register_dirs([root]) == ["tissue-a", "tissue-b"]
    available = registry.available()
    assert sorted(available) == ["tissue-a", "tissue-b"]
    assert available["tissue-b"].version == "2.0"
    assert available["tissue-a"].labels[0].name == "Tissue"
    model = registry.create("tissue-b")
    assert isinstance(model, TorchFileModel)
    with pytest.raises(RuntimeError, match="not loaded"):
        model.predict(make_volume(phantom()))
    model.load("cpu")
    assert model.predict(make_volume(phantom())).labelmap.any()


def test_a_folder_registered_again_replaces_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = model_dir(tmp_path / "a" / "net", manifest("tissue-net"), pointwise())
    registry = ModelRegistry(entry_points=False, builtins=False)
    with caplog.at_level(logging.WARNING, logger="pacs_ai.models.registry"):
        registry.register_dirs([first])
        registry.register_dirs([first])  # the CLI's check, then the worker it starts
        assert "replaces" not in caplog.text
        other = model_dir(tmp_path / "b" / "net", manifest("tissue-net"), pointwise())
        registry.register_dirs([other])
    assert f"model folder {other} replaces the model tissue-net" in caplog.text


def test_discover_reports_every_broken_folder_and_duplicate_names(tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_dir(root / "a", manifest("same"), pointwise())
    model_dir(root / "b", manifest("same"), pointwise())
    model_dir(root / "c", manifest("other"))
    with pytest.raises(ModelLoadError) as caught:
        discover([root, tmp_path / "missing"])
    text = str(caught.value)
    assert "c: has no network file" in text
    assert f"'same' is also in {root / 'a'}" in text
    assert f"{tmp_path / 'missing'}: the model path is not a folder" in text
