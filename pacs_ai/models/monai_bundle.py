"""MONAI bundles as pacs-ai models: what their configs say, and (with MONAI) their network.

A bundle (MONAI's "Model Bundle" specification) ships for deployment with a TorchScript export,
``models/model.ts``, which torch alone runs. Its ``configs/metadata.json`` describes the
network's inputs and outputs (``network_data_format``) and names the output channels
(``channel_def``). Its ``configs/inference.json`` is a program for MONAI's ConfigParser: here it
is only read as data, for the literal arguments of a few well-known transforms, never evaluated.
DICOM needs a code for every label, which neither file holds: a pacs-ai ``manifest.json``
beside ``configs/`` supplies them, and whatever it states wins over what is derived here.

A bundle with only a state dict (``models/model.pt``) needs MONAI to build the network from
its configs, and that runs the configs' code: as for every model folder, a bundle is trusted
code installed by an admin.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pacs_ai.errors import ModelLoadError

METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
TORCHSCRIPT = Path("models/model.ts")
STATE_DICT = Path("models/model.pt")
MONAI_NEEDED = (
    "is a state dict, and only MONAI can build its network from the bundle's configs: "
    "install MONAI (pip install monai) or ship the TorchScript export as models/model.ts"
)

# The axis codes most MONAI bundles are trained in (an Orientationd transform with "RAS").
DEFAULT_ORIENTATION = "RAS"
# MONAI metadata names modalities freely; DICOM's Modality values are what volumes carry.
_MODALITIES = {"MRI": "MR", "CTA": "CT", "PET": "PT"}


def is_bundle(path: Path) -> bool:
    return (path / METADATA).is_file()


def manifest_defaults(
    metadata: Mapping[str, Any], inference: Mapping[str, Any], folder_name: str
) -> dict[str, Any]:
    """Manifest fields (as in ``manifest.json``) derived from a bundle's configs.

    Raises ``ValueError`` naming the part of ``metadata.json`` that cannot be used.
    """
    data_format = _mapping(metadata.get("network_data_format", {}), "network_data_format")
    inputs = _mapping(data_format.get("inputs", {}), "network_data_format.inputs")
    outputs = _mapping(data_format.get("outputs", {}), "network_data_format.outputs")
    image = _mapping(next(iter(inputs.values()), {}), "network_data_format.inputs")
    pred = _mapping(next(iter(outputs.values()), {}), "network_data_format.outputs")
    if image.get("num_channels", 1) != 1:
        raise ValueError(
            f"network_data_format.inputs: the network takes {image['num_channels']} channels; "
            "only single-channel inputs (one series) are supported"
        )
    defaults: dict[str, Any] = {"name": folder_name, "task": "segmentation"}
    for key in ("version", "description"):
        if isinstance(metadata.get(key), str):
            defaults[key] = metadata[key]
    if isinstance(image.get("modality"), str):
        modality = image["modality"].upper()
        defaults["modalities"] = [_MODALITIES.get(modality, modality)]

    channel_def = _mapping(pred.get("channel_def", {}), "network_data_format.outputs.channel_def")
    try:
        names = {int(k): str(v) for k, v in channel_def.items()}
    except ValueError:
        raise ValueError(
            f"channel_def keys must be channel numbers, got {sorted(channel_def)}"
        ) from None
    channels = pred.get("num_channels", len(names))
    spec: dict[str, Any] = {"orientation": DEFAULT_ORIENTATION}
    if isinstance(channels, int) and channels > 1:
        # Several channels: softmax over classes, channel 0 the background, channel k label k.
        spec["activation"] = "softmax"
        defaults["labels"] = [{"number": k, "name": v} for k, v in sorted(names.items()) if k]
    elif names:
        spec["activation"] = "sigmoid"
        defaults["labels"] = [{"number": 1, "name": names[min(names)]}]
    shape = image.get("spatial_shape")
    if image.get("is_patch_data") and _numbers(shape, 3, int):
        spec["patch"] = shape
    # What inference.json states (an Orientationd, a SlidingWindowInferer) beats metadata.
    spec.update(_from_transforms(inference))
    defaults["input"] = spec
    return defaults


def merge(defaults: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """``manifest`` over ``defaults``; labels matched by number, ``input`` field by field.

    Raises ``ValueError`` for a manifest label that is no output channel of the bundle.
    """
    merged = {**defaults, **manifest}
    if isinstance(manifest.get("input"), Mapping):
        merged["input"] = {**defaults.get("input", {}), **manifest["input"]}
    elif "input" not in manifest and "input" in defaults:
        merged["input"] = defaults["input"]
    given = manifest.get("labels")
    derived = {label["number"]: label for label in defaults.get("labels", [])}
    if isinstance(given, list) and derived:
        labels = dict(derived)
        for i, label in enumerate(given):
            if not isinstance(label, Mapping):
                raise ValueError(f"labels[{i}] must be a JSON object")
            number = label.get("number")
            if number not in derived:
                raise ValueError(
                    f"labels[{i}]: number {number!r} is not an output channel of the bundle "
                    f"(configs/metadata.json names {', '.join(map(str, sorted(derived)))})"
                )
            labels[number] = {**derived[number], **label}
        merged["labels"] = [labels[n] for n in sorted(labels)]
    return merged


def build_network(state_dict: Path, device: str) -> Any:
    """The bundle's network, built by MONAI from its configs, with the weights of ``state_dict``."""
    try:
        bundle = importlib.import_module("monai.bundle")
    except ImportError as exc:
        raise ModelLoadError(state_dict, MONAI_NEEDED) from exc
    import torch

    root = state_dict.parent.parent
    parser = bundle.ConfigParser()
    parser.read_meta(str(root / METADATA))
    parser.read_config(str(root / INFERENCE))
    network = parser.get_parsed_content("network_def")
    # weights_only: the configs are trusted, but a state dict has no reason to hold code.
    state = torch.load(state_dict, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # MONAI's CheckpointSaver nests the weights under "model"
    network.load_state_dict(state)
    return network.to(device).eval()


def _from_transforms(config: Mapping[str, Any]) -> dict[str, Any]:
    """Input settings from literal arguments of well-known transforms in inference.json.

    The first occurrence wins (preprocessing comes before postprocessing); arguments that are
    references or expressions (``@...``, ``$...``) are left to the manifest.
    """
    spec: dict[str, Any] = {}
    for target, args in _targets(config):
        if target == "Orientationd" and isinstance(args.get("axcodes"), str):
            spec.setdefault("orientation", args["axcodes"])
        elif target == "Spacingd" and _numbers(args.get("pixdim"), 3, float):
            spec.setdefault("spacing_mm", list(args["pixdim"]))
        elif (
            target == "ScaleIntensityRanged"
            and _numbers([args.get("a_min"), args.get("a_max")], 2, float)
            and (args.get("b_min"), args.get("b_max"), args.get("clip")) == (0, 1, True)
        ):
            spec.setdefault("window", [args["a_min"], args["a_max"]])
            spec.setdefault("normalise", "minmax")
        elif target == "SlidingWindowInferer":
            if _numbers(args.get("roi_size"), 3, int):
                spec.setdefault("patch", list(args["roi_size"]))
            if _numbers([args.get("overlap")], 1, float):
                spec.setdefault("overlap", args["overlap"])
            if _numbers([args.get("sw_batch_size")], 1, int):
                spec.setdefault("batch_size", args["sw_batch_size"])
    return spec


def _targets(node: object) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every ``{"_target_": ...}`` object in a config tree, as (class name, arguments)."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str):
            yield target.rpartition(".")[2], node
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _numbers(values: object, size: int, kind: type[int] | type[float]) -> bool:
    allowed = (int,) if kind is int else (int, float)
    return (
        isinstance(values, list)
        and len(values) == size
        and all(isinstance(v, allowed) and not isinstance(v, bool) for v in values)
    )


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value
