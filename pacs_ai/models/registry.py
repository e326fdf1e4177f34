"""Find models by name.

Models come from three places, the first that knows a name winning:

1. factories registered at run time with :func:`register` (tests, embedding applications);
2. the ``pacs_ai.models`` entry points of installed distributions, named after the model,
   e.g. ``ct-organs-threshold = "pacs_ai.models.builtin.ct_organs_threshold:CtOrgansThreshold"``;
3. the built-in table :data:`pacs_ai.models.builtin.BUILTIN_MODELS`, so that a checkout
   without installed entry points still finds the built-ins.

Model folders from disk (TorchScript, torch.export, ONNX, MONAI bundles; see
:mod:`pacs_ai.models.loaders`) join the first group through :meth:`ModelRegistry.register_dirs`,
which the node calls with the folders its configuration lists.

A factory is anything that, called with no arguments, returns a :class:`~pacs_ai.models.base.Model`:
usually the model class itself. Constructing a model must be cheap; weights are read in
``load(device)``. :meth:`ModelRegistry.create` imports only the module of the model asked for;
:meth:`ModelRegistry.available` imports every model's module to read its manifest, so a model
that needs torch imports it inside ``load`` (or below module level), never at the top of its
module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pacs_ai.errors import ConfigError, UnknownModel
from pacs_ai.models.base import Model, ModelManifest
from pacs_ai.models.builtin import BUILTIN_MODELS

if TYPE_CHECKING:
    from pacs_ai.config import Settings

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "pacs_ai.models"

ModelFactory = Callable[[], Model]
F = TypeVar("F", bound=ModelFactory)


def manifest_of(factory: ModelFactory) -> ModelManifest:
    """The manifest a factory's models carry: from the class if it has one, else an instance."""
    manifest = getattr(factory, "manifest", None)
    if not isinstance(manifest, ModelManifest):
        manifest = factory().manifest
    if not isinstance(manifest, ModelManifest):
        raise TypeError(f"{factory!r} makes models without a ModelManifest as .manifest")
    return manifest


class ModelRegistry:
    """The models one process can run, by name.

    ``entry_points`` and ``builtins`` choose the sources besides registered factories; a
    test that wants only its own models turns both off.
    """

    def __init__(self, *, entry_points: bool = True, builtins: bool = True) -> None:
        self._use_entry_points = entry_points
        self._use_builtins = builtins
        self._registered: dict[str, ModelFactory] = {}

    def register(self, factory: F) -> F:
        """Make ``factory``'s model available under its manifest's name; usable as a decorator."""
        self._registered[manifest_of(factory).name] = factory
        return factory

    def register_dirs(self, paths: Sequence[Path]) -> list[str]:
        """Register every model folder in ``paths``; return the names of the models found.

        Each path is a model folder or holds model folders one level down. Any folder that
        cannot be read raises :class:`~pacs_ai.errors.ModelLoadError` and registers nothing.
        """
        # Imported here: the loaders pull in scipy, which a registry of built-ins never needs.
        from pacs_ai.models.loaders import discover

        found = discover(paths)
        sources = self._sources()
        for model_dir in found:
            name = model_dir.manifest.name
            # The same folder registered again (the CLI's check, then the worker process it
            # starts) replaces nothing; another folder or an installed model is worth a word.
            if name in sources and getattr(sources[name], "path", None) != model_dir.path:
                logger.warning("model folder %s replaces the model %s", model_dir.path, name)
            self.register(model_dir)
        return [model_dir.manifest.name for model_dir in found]

    def names(self) -> list[str]:
        """Every known model name, sorted, without importing any model."""
        return sorted(self._sources())

    def available(self) -> dict[str, ModelManifest]:
        """Every model's manifest by name; a model that fails to load is logged and left out."""
        manifests: dict[str, ModelManifest] = {}
        for name, source in sorted(self._sources().items()):
            # A plugin is third-party code run at import: one broken plugin must not hide the
            # others from a listing (create() of that name still raises its error).
            try:
                manifests[name] = manifest_of(_factory(name, source))
            except Exception:
                logger.exception("model %s could not be loaded; left out of the listing", name)
        return manifests

    def create(self, name: str) -> Model:
        """A new, not yet loaded instance of model ``name``: call ``load(device)`` next.

        Raises :class:`~pacs_ai.errors.UnknownModel` for a name no source knows.
        """
        sources = self._sources()
        if name not in sources:
            raise UnknownModel(name, sorted(sources))
        model = _factory(name, sources[name])()
        if not isinstance(model, Model):
            raise TypeError(f"the factory of model {name!r} returned {model!r}, not a Model")
        return model

    def _sources(self) -> dict[str, ModelFactory | EntryPoint]:
        sources: dict[str, ModelFactory | EntryPoint] = {}
        if self._use_builtins:
            for name, value in BUILTIN_MODELS.items():
                sources[name] = EntryPoint(name, value, ENTRY_POINT_GROUP)
        if self._use_entry_points:
            for entry_point in entry_points(group=ENTRY_POINT_GROUP):
                sources[entry_point.name] = entry_point
        sources.update(self._registered)
        return sources


def _factory(name: str, source: ModelFactory | EntryPoint) -> ModelFactory:
    """Import an entry point's factory and check that it makes the model it is named for."""
    if not isinstance(source, EntryPoint):
        return source
    factory = source.load()
    if not callable(factory):
        raise TypeError(f"entry point {name} = {source.value!r} is not a model factory")
    manifest_name = manifest_of(factory).name
    if manifest_name != name:
        raise ValueError(
            f"entry point {name} = {source.value!r} makes model {manifest_name!r}: "
            "the entry point must be named after the model's manifest"
        )
    loaded: ModelFactory = factory
    return loaded


# Models are a property of the installed process, like the entry points they come from: one
# registry per process, which workers and the CLI share.
_default = ModelRegistry()


def available() -> dict[str, ModelManifest]:
    """The manifest of every model this process can run, by name."""
    return _default.available()


def not_installed(name: str, installed: Collection[str]) -> str | None:
    """Why ``name`` cannot run here, naming the models that can; ``None`` when it can."""
    if name in installed:
        return None
    return f"model {name!r} is not installed (installed: {', '.join(installed) or 'none'})"


def wrong_device(name: str, manifest: ModelManifest, device: str) -> str | None:
    """Why model ``name`` cannot run on ``device`` (a worker's resolved device: ``cpu``,
    ``cuda``, ``cuda:N``), saying how to fix it; ``None`` when it can.

    Only a model that needs CUDA is refused, on a CPU: loaded there it would run, if at all,
    far slower than whoever wrote its manifest allowed for. A ``cpu`` model on a GPU worker
    is left to load where the worker puts it.
    """
    if manifest.device != "cuda" or device.startswith("cuda"):
        return None
    return (
        f"model {name!r} needs a CUDA device; this worker runs on {device}: "
        "run `pacs-ai worker --queues infer --device cuda:0` on a GPU machine"
    )


def check_installed(
    paths: Sequence[Path], wanted: Sequence[tuple[str, str]], source: str = ""
) -> None:
    """Raise :class:`ConfigError` for each ``(setting, model name)`` in ``wanted`` that this
    machine cannot run, once the model folders ``paths`` are registered process-wide.

    Not part of the settings' validation: which models exist is a fact of the machine that
    runs them (its installed plugins, its ``models.paths``), while the settings are read by
    every process and command on every machine, and listing the models imports each model's
    module (scipy, a plugin's own code). A folder that cannot be read raises
    :class:`~pacs_ai.errors.ModelLoadError`.
    """
    if not wanted:
        return
    register_dirs(paths)
    installed = available()
    problems = [(key, why) for key, name in wanted if (why := not_installed(name, installed))]
    if problems:
        raise ConfigError(problems, source)


def preload_wanted(settings: Settings) -> list[tuple[str, str]]:
    """``worker.preload``'s models, as :func:`check_installed` takes them, where the worker
    warms up (it consumes ``infer``); none for a delivery-only worker, which loads no model."""
    if "infer" not in settings.worker.queues:
        return []
    return [("worker.preload", name) for name in settings.worker.preload]


def check_preload(settings: Settings) -> None:
    """What ``pacs-ai worker`` checks before Celery starts: a GPU server that names a model it
    does not have refuses to start, with the name and the models it has, as ``pacs-ai
    serve`` does for a rule's model (a warning in its log would only be found when the first
    study comes late). So does a worker on a CPU asked to preload a model that needs CUDA
    (:func:`wrong_device`): every job of that model would fail there."""
    check_installed(settings.models.paths, preload_wanted(settings), "worker")
    check_preload_device(settings, "worker")


def check_preload_device(settings: Settings, source: str) -> None:
    """Refuse a preload of a model that needs CUDA on a worker that runs on the CPU (the
    models are installed: :func:`check_installed` came first)."""
    wanted = preload_wanted(settings)
    if not wanted:
        return
    manifests = available()
    needs_cuda = [(key, name) for key, name in wanted if manifests[name].device == "cuda"]
    if not needs_cuda:
        return
    # Imported here: that module imports this one. Resolved only now, because "auto" imports
    # torch to look for a GPU, which a worker whose models run anywhere need not pay for here.
    from pacs_ai.pipeline.infer import resolve_device

    device = resolve_device(settings.worker.device)
    problems = [
        (key, why)
        for key, name in needs_cuda
        if (why := wrong_device(name, manifests[name], device))
    ]
    if problems:
        raise ConfigError(problems, source)


def create(name: str) -> Model:
    """A new, not yet loaded instance of model ``name``; see :meth:`ModelRegistry.create`."""
    return _default.create(name)


def register(factory: F) -> F:
    """Add a model factory to the process-wide registry; see :meth:`ModelRegistry.register`."""
    return _default.register(factory)


def register_dirs(paths: Sequence[Path]) -> list[str]:
    """Register model folders process-wide; see :meth:`ModelRegistry.register_dirs`."""
    return _default.register_dirs(paths)
