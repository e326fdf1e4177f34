"""``manifest.json`` of a model folder: read it, check it, and turn it into a ModelManifest.

The format is described in :mod:`pacs_ai.models.loaders`. Every problem is a
:class:`~pacs_ai.errors.ModelLoadError` that names the file and the field, e.g.
``labels[0].category: missing field 'scheme'``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from pacs_ai.errors import ModelLoadError
from pacs_ai.models.base import Code, LabelSpec, ModelManifest
from pacs_ai.models.inference import InputSpec

MANIFEST_FILE = "manifest.json"
_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelManifest)) | {"input"}
_REQUIRED = ("name", "version", "task", "labels")
_LABEL_FIELDS = ("number", "name", "category", "type")
_CODE_FIELDS = ("value", "scheme", "meaning")
_INPUT_FIELDS = frozenset(f.name for f in dataclasses.fields(InputSpec))
# Names appear in routing rules, the CLI and job rows: no spaces or path separators.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_T = TypeVar("_T")
_KINDS: dict[type, str] = {
    str: "a string",
    int: "a whole number",
    bool: "true or false",
    list: "a list",
}


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; any other content is a :class:`ModelLoadError`."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(file, f"cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ModelLoadError(file, f"is not UTF-8 text: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(
            file, f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(file, f"must hold a JSON object, not {type(data).__name__}")
    return data


def parse_manifest(data: Mapping[str, Any], file: Path) -> tuple[ModelManifest, InputSpec]:
    """The manifest and input settings that ``data`` (read from ``file``) describes."""
    _check_fields(data, _FIELDS, _REQUIRED, "", file)
    name = _typed(data["name"], str, "name", file)
    if not _NAME.fullmatch(name):
        raise ModelLoadError(file, f"name {name!r} may hold only letters, digits, '.', '_', '-'")
    task = _choice(data["task"], ("segmentation", "detection"), "task", file)
    device = _choice(data.get("device", "any"), ("cpu", "cuda", "any"), "device", file)
    modalities = _typed(data.get("modalities", ["CT"]), list, "modalities", file)
    if not modalities or not all(isinstance(m, str) and m for m in modalities):
        raise ModelLoadError(
            file, f"modalities must be a list of DICOM Modality values, got {modalities!r}"
        )
    labels = data["labels"]
    if not isinstance(labels, list) or not labels:
        raise ModelLoadError(file, "labels must be a non-empty list")
    specs = tuple(_label(item, f"labels[{i}]", file) for i, item in enumerate(labels))
    numbers = [spec.number for spec in specs]
    if len(set(numbers)) != len(numbers):
        raise ModelLoadError(file, f"labels: numbers must differ, got {numbers}")
    extra: dict[str, Any] = {}
    if "algorithm_family" in data:
        extra["algorithm_family"] = _code(data["algorithm_family"], "algorithm_family", file)
    manifest = ModelManifest(
        name=name,
        version=_typed(data["version"], str, "version", file),
        task=cast(Literal["segmentation", "detection"], task),
        description=_typed(data.get("description", ""), str, "description", file),
        labels=specs,
        modalities=tuple(modalities),
        min_slices=_positive(data.get("min_slices", 1), "min_slices", file),
        needs_3d=_typed(data.get("needs_3d", True), bool, "needs_3d", file),
        device=cast(Literal["cpu", "cuda", "any"], device),
        memory_mb=_positive(data.get("memory_mb", 1024), "memory_mb", file),
        research_only=_typed(data.get("research_only", True), bool, "research_only", file),
        **extra,
    )
    settings = data.get("input", {})
    _check_fields(settings, _INPUT_FIELDS, (), "input", file)
    # JSON has lists where InputSpec has tuples.
    kwargs: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()
    }
    try:
        spec = InputSpec(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(file, f"input: {exc}") from exc
    return manifest, spec


def _label(item: object, where: str, file: Path) -> LabelSpec:
    _check_fields(item, _LABEL_FIELDS, _LABEL_FIELDS, where, file)
    assert isinstance(item, Mapping)  # checked just above
    number = _typed(item["number"], int, f"{where}.number", file)
    if not 1 <= number <= 255:
        # The label map is uint8 and 0 is background.
        raise ModelLoadError(file, f"{where}.number must be 1 to 255, got {number}")
    return LabelSpec(
        number=number,
        name=_typed(item["name"], str, f"{where}.name", file),
        category=_code(item["category"], f"{where}.category", file),
        type=_code(item["type"], f"{where}.type", file),
    )


def _code(value: object, where: str, file: Path) -> Code:
    _check_fields(value, _CODE_FIELDS, _CODE_FIELDS, where, file)
    assert isinstance(value, Mapping)  # checked just above
    parts = [_typed(value[key], str, f"{where}.{key}", file) for key in _CODE_FIELDS]
    if not all(parts):
        raise ModelLoadError(file, f"{where}: value, scheme and meaning must not be empty")
    return Code(*parts)


def _check_fields(
    value: object,
    allowed: Sequence[str] | frozenset[str],
    required: Sequence[str],
    where: str,
    file: Path,
) -> None:
    at = f"{where}: " if where else ""
    if not isinstance(value, Mapping):
        raise ModelLoadError(file, f"{at}must be a JSON object, got {json.dumps(value)}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ModelLoadError(
            file,
            f"{at}unknown field {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(allowed))})",
        )
    missing = [key for key in required if key not in value]
    if missing:
        raise ModelLoadError(file, f"{at}missing field {', '.join(map(repr, missing))}")


def _typed(value: object, kind: type[_T], where: str, file: Path) -> _T:
    # bool is an int in Python, but true is no label number.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        wanted = _KINDS.get(kind, kind.__name__)
        raise ModelLoadError(file, f"{where} must be {wanted}, got {json.dumps(value)}")
    return value


def _positive(value: object, where: str, file: Path) -> int:
    number = _typed(value, int, where, file)
    if number < 1:
        raise ModelLoadError(file, f"{where} must be at least 1, got {number}")
    return number


def _choice(value: object, choices: Sequence[str], where: str, file: Path) -> str:
    if value not in choices:
        raise ModelLoadError(file, f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return cast(str, value)
