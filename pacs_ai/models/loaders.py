"""Models that users bring from disk: one folder per model, found by :func:`discover`.

A model folder is trusted code. TorchScript, torch.export and MONAI files can run code when
they are loaded, so an admin installs them; nothing a sender supplies ever becomes one.

A pacs-ai model folder::

    <dir>/manifest.json          what the model is and what its network expects (below)
    <dir>/model.ts or model.pt   TorchScript (torch.jit.save), read with torch.jit.load
    <dir>/model.pt2              torch.export (torch.export.save), read with torch.export.load
    <dir>/model.onnx             ONNX, run by ONNX Runtime (pip install pacs-ai[onnx])

with exactly one network file.

``manifest.json`` mirrors :class:`~pacs_ai.models.base.ModelManifest`, plus ``input``
(:class:`~pacs_ai.models.inference.InputSpec`)::

    {"name": "ct-lungs-net", "version": "1.0.0", "task": "segmentation" | "detection",
     "description": "...", "modalities": ["CT"], "min_slices": 1, "needs_3d": true,
     "device": "cpu" | "cuda" | "any", "memory_mb": 1024, "research_only": true,
     "labels": [{"number": 1, "name": "Lungs",
                 "category": {"value": "123037004", "scheme": "SCT",
                              "meaning": "Anatomical Structure"},
                 "type": {"value": "39607008", "scheme": "SCT", "meaning": "Lung"}}],
     "input": {"spacing_mm": [z, y, x] | null, "window": [low, high] | null,
               "normalise": "zscore" | "minmax" | "none", "patch": [z, y, x] | null,
               "overlap": 0.25, "batch_size": 4, "orientation": "RAS" | null,
               "output": "logits" | "probabilities", "activation": "sigmoid" | "softmax",
               "threshold": 0.5, "min_component_ml": 0}}

``name``, ``version``, ``task`` and ``labels`` are required; everything else has the defaults of
ModelManifest and InputSpec. An unknown field is an error, so that a misspelt one cannot
quietly fall back to its default.

A MONAI bundle folder (see :mod:`pacs_ai.models.monai_bundle`)::

    <dir>/configs/metadata.json    MONAI's: version, modality, patch, output channel names
    <dir>/configs/inference.json   optional; literal transform arguments are read as data
    <dir>/models/model.ts          TorchScript export of the network (preferred)
    <dir>/models/model.pt          state dict: only with MONAI installed
    <dir>/manifest.json            pacs-ai's: label codes at least; its fields win
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pacs_ai.errors import ModelLoadError
from pacs_ai.models import monai_bundle
from pacs_ai.models.base import Model, ModelManifest
from pacs_ai.models.file_model import ONNX_MISSING, NetworkFormat, TorchFileModel
from pacs_ai.models.inference import InputSpec
from pacs_ai.models.manifest_json import MANIFEST_FILE, parse_manifest, read_json

logger = logging.getLogger(__name__)

NETWORK_FILES: Mapping[str, NetworkFormat] = {
    "model.ts": "torchscript",
    "model.pt": "torchscript",
    "model.pt2": "torch.export",
    "model.onnx": "onnx",
}


@dataclass(frozen=True)
class ModelDir:
    """A model folder, read and checked; calling it makes a new, unloaded model.

    It is a model factory for :class:`~pacs_ai.models.registry.ModelRegistry`, whose
    ``manifest`` attribute lets the registry list the model without building one.
    """

    path: Path
    manifest: ModelManifest
    spec: InputSpec
    network_file: Path
    network_format: NetworkFormat

    def __call__(self) -> TorchFileModel:
        return TorchFileModel(self.manifest, self.spec, self.network_file, self.network_format)


def load_model_dir(path: Path) -> Model:
    """The model in folder ``path``, not loaded yet: call ``load(device)`` next."""
    return read_model_dir(path)()


def is_model_dir(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file() or monai_bundle.is_bundle(path)


def discover(paths: Sequence[Path]) -> list[ModelDir]:
    """Every model folder in ``paths``: each path is a model folder or holds them one level down.

    Raises one :class:`ModelLoadError` that lists every folder that cannot be read, and every
    name used twice: an admin fixes all of them at once, and a node never starts without a
    model its configuration lists.
    """
    found: list[ModelDir] = []
    problems: list[ModelLoadError] = []
    for root in paths:
        if not root.is_dir():
            problems.append(ModelLoadError(root, "the model path is not a folder"))
            continue
        if is_model_dir(root):
            folders = [root]
        else:
            folders = sorted(p for p in root.iterdir() if p.is_dir() and is_model_dir(p))
        if not folders:
            logger.warning("no model folders in %s", root)
        for folder in folders:
            try:
                found.append(read_model_dir(folder))
            except ModelLoadError as exc:
                problems.append(exc)
    first: dict[str, Path] = {}
    for model in found:
        name = model.manifest.name
        if name in first:
            problems.append(ModelLoadError(model.path, f"model {name!r} is also in {first[name]}"))
        first.setdefault(name, model.path)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        others = "".join(f"\n  and {problem}" for problem in problems[1:])
        raise ModelLoadError(problems[0].path, problems[0].problem + others)
    return found


def read_model_dir(path: Path) -> ModelDir:
    """Read and check the model folder ``path`` (its network is opened later, by ``load``)."""
    if not path.is_dir():
        raise ModelLoadError(path, "is not a folder")
    manifest_file = path / MANIFEST_FILE
    if monai_bundle.is_bundle(path):
        return _read_bundle(path)
    if not manifest_file.is_file():
        raise ModelLoadError(
            path, f"has no {MANIFEST_FILE} (nor {monai_bundle.METADATA} of a MONAI bundle)"
        )
    manifest, spec = parse_manifest(read_json(manifest_file), manifest_file)
    present = [name for name in NETWORK_FILES if (path / name).is_file()]
    if not present:
        raise ModelLoadError(
            path, f"has no network file: expected one of {', '.join(NETWORK_FILES)}"
        )
    if len(present) > 1:
        raise ModelLoadError(
            path, f"has {len(present)} network files ({', '.join(present)}): keep exactly one"
        )
    network_file, network_format = path / present[0], NETWORK_FILES[present[0]]
    if network_format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise ModelLoadError(network_file, ONNX_MISSING)
    return ModelDir(path, manifest, spec, network_file, network_format)


def _read_bundle(path: Path) -> ModelDir:
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise ModelLoadError(
            path,
            f"is a MONAI bundle without a pacs-ai {MANIFEST_FILE} beside configs/: add one "
            "with at least a code (category and type) for each label",
        )
    metadata_file, inference_file = path / monai_bundle.METADATA, path / monai_bundle.INFERENCE
    metadata = read_json(metadata_file)
    inference = read_json(inference_file) if inference_file.is_file() else {}
    try:
        defaults = monai_bundle.manifest_defaults(metadata, inference, path.name)
    except ValueError as exc:
        raise ModelLoadError(metadata_file, str(exc)) from exc
    try:
        merged = monai_bundle.merge(defaults, read_json(manifest_file))
    except ValueError as exc:
        raise ModelLoadError(manifest_file, str(exc)) from exc
    manifest, spec = parse_manifest(merged, manifest_file)

    network_format: NetworkFormat = "torchscript"
    network_file = path / monai_bundle.TORCHSCRIPT
    if not network_file.is_file():
        network_file, network_format = path / monai_bundle.STATE_DICT, "monai"
        if not network_file.is_file():
            raise ModelLoadError(path, "is a MONAI bundle without models/model.ts or model.pt")
        if importlib.util.find_spec("monai") is None:
            raise ModelLoadError(network_file, monai_bundle.MONAI_NEEDED)
        if not inference_file.is_file():
            raise ModelLoadError(path, f"has a state dict but no {monai_bundle.INFERENCE}")
    return ModelDir(path, manifest, spec, network_file, network_format)
