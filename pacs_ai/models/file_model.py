"""A model whose network is a file (TorchScript, torch.export, ONNX, a MONAI state dict).

:class:`TorchFileModel` opens the network in ``load(device)`` and, per volume, runs the steps of
:mod:`pacs_ai.models.inference`, then ends them here: each voxel's label is decided on the
volume's own grid, and each connected component of a label becomes a Finding. torch and
onnxruntime are imported only when a network is opened, so that reading manifests and listing
models stays cheap and works without them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage  # type: ignore[import-untyped]

from pacs_ai.errors import ModelLoadError
from pacs_ai.imaging.volume import Volume
from pacs_ai.models import monai_bundle
from pacs_ai.models.base import Finding, ModelManifest, Prediction
from pacs_ai.models.inference import (
    InputSpec,
    Network,
    infer,
    prepare,
    probabilities,
    to_volume_grid,
)

logger = logging.getLogger(__name__)

NetworkFormat = Literal["torchscript", "torch.export", "onnx", "monai"]

ONNX_MISSING = (
    "needs ONNX Runtime (the Python package onnxruntime), which is not installed: "
    "pip install pacs-ai[onnx]"
)


class TorchFileModel:
    """A :class:`~pacs_ai.models.base.Model` whose network is read from a file in ``load``."""

    def __init__(
        self,
        manifest: ModelManifest,
        spec: InputSpec,
        network_file: Path,
        network_format: NetworkFormat,
    ) -> None:
        self.manifest = manifest
        self.spec = spec
        self.network_file = network_file
        self.network_format = network_format
        self._network: Network | None = None

    def load(self, device: str) -> None:
        self._network = open_network(self.network_file, self.network_format, device)
        logger.info("model %s loaded from %s on %s", self.manifest.name, self.network_file, device)

    def predict(self, volume: Volume) -> Prediction:
        if self._network is None:
            raise RuntimeError(f"model {self.manifest.name} is not loaded: call load(device) first")
        if volume.modality not in self.manifest.modalities:
            raise ValueError(
                f"{self.manifest.name} takes {', '.join(self.manifest.modalities)}, "
                f"got modality {volume.modality!r}"
            )
        prediction = predict_with(self._network, volume, self.manifest, self.spec)
        logger.info(
            "%s on series %s: %d findings",
            self.manifest.name,
            volume.series_instance_uid,
            len(prediction.findings),
        )
        return prediction


def open_network(path: Path, network_format: NetworkFormat, device: str) -> Network:
    """The network in ``path`` on ``device``, as a numpy-in, numpy-out callable."""
    if network_format == "onnx":
        return _onnx_network(path, device)
    import torch
    from torch.export.passes import move_to_device_pass

    module: Callable[..., Any]
    try:
        if network_format == "torchscript":
            with warnings.catch_warnings():
                # torch deprecates TorchScript for new work, yet it is how MONAI bundles and
                # many published models ship for deployment: loading them is this loader's job.
                warnings.filterwarnings(
                    "ignore", "`torch.jit.load` is deprecated", DeprecationWarning
                )
                loaded = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
                module = loaded.eval()
        elif network_format == "torch.export":
            program = torch.export.load(path)
            if device != "cpu":
                program = move_to_device_pass(program, device)
            module = program.module()
        else:
            module = monai_bundle.build_network(path, device)
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(path, f"cannot be loaded as {network_format}: {exc}") from exc
    return _torch_network(module, device)


def _torch_network(module: Callable[..., Any], device: str) -> Network:
    import torch

    def run(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        # bf16 on CUDA only: there it halves memory and runs on tensor cores; CPUs gain little
        # or nothing from it and would only lose precision.
        autocast: contextlib.AbstractContextManager[Any] = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.startswith("cuda")
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = module(torch.from_numpy(batch).to(device))
        if isinstance(out, tuple | list):
            out = out[0]  # deep-supervision networks return the full-resolution output first
        result: NDArray[np.float32] = out.float().cpu().numpy()
        return result

    return run


def _onnx_network(path: Path, device: str) -> Network:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise ModelLoadError(path, ONNX_MISSING) from exc
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    # onnxruntime's errors are pybind11 classes with no public common base to name here.
    except Exception as exc:
        raise ModelLoadError(path, f"cannot be loaded by ONNX Runtime: {exc}") from exc
    name = session.get_inputs()[0].name

    def run(batch: NDArray[np.float32]) -> NDArray[np.float32]:
        return np.asarray(session.run(None, {name: batch})[0], dtype=np.float32)

    return run


def predict_with(
    network: Network, volume: Volume, manifest: ModelManifest, spec: InputSpec
) -> Prediction:
    """Run ``network`` on ``volume`` as ``spec`` says and describe what it found."""
    prepared = prepare(volume, spec)
    probs = to_volume_grid(probabilities(infer(prepared.array, network, spec), spec), prepared)
    numbers = [label.number for label in manifest.labels]
    labelmap, channels = decide(probs, spec, numbers)
    names = {label.number: label.name for label in manifest.labels}
    found = findings(
        labelmap, probs, channels, names, volume.voxel_volume_ml, spec.min_component_ml
    )
    present = bool(found) if manifest.task == "detection" else None
    return Prediction(labelmap=labelmap, findings=found, present=present)


def decide(
    probs: NDArray[np.float32], spec: InputSpec, numbers: Sequence[int]
) -> tuple[NDArray[np.uint8], dict[int, int]]:
    """The label map, and the probability channel of each label number."""
    channels = probs.shape[0]
    if spec.activation == "softmax":
        if channels <= max(numbers):
            raise ValueError(
                f"the network gives {channels} channels; labels go up to {max(numbers)}"
            )
        winner = np.argmax(probs, axis=0)
        # Channels the manifest does not name are background, so a manifest may publish only
        # some of a network's classes.
        lut = np.zeros(channels, dtype=np.uint8)
        lut[list(numbers)] = numbers
        return lut[winner], {n: n for n in numbers}
    if channels != len(numbers):
        raise ValueError(f"the network gives {channels} channels for {len(numbers)} labels")
    best = np.argmax(probs, axis=0)
    best_p = np.take_along_axis(probs, best[None], axis=0)[0]
    labelmap = np.where(best_p >= spec.threshold, np.asarray(numbers, dtype=np.uint8)[best], 0)
    return labelmap.astype(np.uint8), {n: i for i, n in enumerate(numbers)}


def findings(
    labelmap: NDArray[np.uint8],
    probs: NDArray[np.float32],
    channels: Mapping[int, int],
    names: Mapping[int, str],
    voxel_ml: float,
    min_ml: float,
) -> list[Finding]:
    """One Finding per 3D connected component of each label, largest first within a label.

    Components below ``min_ml`` are cleared from ``labelmap`` (in place), so that the SEG and
    the SR built from one prediction agree.
    """
    found: list[Finding] = []
    for number, channel in channels.items():
        components, count = ndimage.label(labelmap == number)
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        certainty = ndimage.mean(probs[channel], components, index)
        boxes = ndimage.find_objects(components)
        for i in np.argsort(sizes, kind="stable")[::-1]:
            box, volume_ml = boxes[i], float(sizes[i]) * voxel_ml
            if volume_ml < min_ml:
                labelmap[box][components[box] == i + 1] = 0
                continue
            points = np.argwhere(components[box] == i + 1)
            # The component's voxel nearest its centroid: a centroid may lie outside a curved
            # structure, and key slices and SR coordinates must point into it.
            nearest = points[np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1))]
            s, r, c = (int(v) + b.start for v, b in zip(nearest, box, strict=True))
            found.append(
                Finding(
                    label=number,
                    name=names[number],
                    volume_ml=volume_ml,
                    certainty=float(certainty[i]),
                    center=(s, r, c),
                )
            )
    return found
