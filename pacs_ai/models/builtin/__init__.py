"""The models that ship with pacs-ai.

``BUILTIN_MODELS`` maps each built-in model's name to its factory as ``module:attribute``: the
same value its ``pacs_ai.models`` entry point holds. The registry reads it so that a plain
checkout, where no entry points are installed, still finds the built-ins; and because the
table holds strings, a model's module (and what it imports) loads only when that model is
asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

BUILTIN_MODELS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "ct-organs-threshold": "pacs_ai.models.builtin.ct_organs_threshold:CtOrgansThreshold",
        "lung-nodule-demo": "pacs_ai.models.builtin.lung_nodule_demo:LungNoduleDemo",
    }
)
