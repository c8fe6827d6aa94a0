"""Deprecated import paths: modules that moved when the package was grouped by layer (the README's migration table).

``import dsdkit.scorer`` (and ``from dsdkit.scorer import Scorer``) still works: a meta-path finder answers the old
name with the module at its new path, the same module object (so patching and ``isinstance`` agree), and warns once
with a ``DeprecationWarning`` naming the new path. Nothing is copied: one definition, one module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module path -> new module path (every entry is a row of the README's migration table).
MOVED = {
    "dsdkit.acceleration": "dsdkit.pytorch.acceleration",
    "dsdkit.adapters": "dsdkit.pytorch.adapters",
    "dsdkit.attention": "dsdkit.pytorch.attention",
    "dsdkit.forward": "dsdkit.pytorch.forward",
    "dsdkit.models": "dsdkit.pytorch.models",
    "dsdkit.pooling": "dsdkit.pytorch.pooling",
    "dsdkit.reference": "dsdkit.pytorch.reference",
    "dsdkit.schedule": "dsdkit.pytorch.noise",
    "dsdkit.scorer": "dsdkit.pytorch.scorer",
    "dsdkit.tiny": "dsdkit.pytorch.tiny",
    "dsdkit.explain": "dsdkit.pytorch.explain",
    "dsdkit.bench": "dsdkit.jobs.bench",
    "dsdkit.datasets": "dsdkit.jobs.datasets",
    "dsdkit.evaluation": "dsdkit.jobs.evaluation",
    "dsdkit.matching": "dsdkit.jobs.match",
    "dsdkit.shards": "dsdkit.jobs.shards",
    "dsdkit.ray_runner": "dsdkit.jobs.ray_runner",
    "dsdkit.demo": "dsdkit.world.demo",
    "dsdkit.config": "dsdkit.runtime.config",
    "dsdkit.errors": "dsdkit.runtime.errors",
    "dsdkit.runtime.jobs": "dsdkit.runtime.resume",
    "dsdkit.runtime.schedule": "dsdkit.runtime.timesteps",
}

#: (module, old class name) -> new name: classes renamed so that "schedule" means one thing (an adaptive
#: elimination schedule, :class:`dsdkit.runtime.adaptive.Schedule`). The modules answer the old names through
#: :func:`renamed_attribute` with a DeprecationWarning (the torch-free runtime answers its own:
#: ``dsdkit.runtime.config.TimestepSchedule`` -> ``TimestepTable``, without importing from above it).
RENAMED = {
    ("dsdkit.pytorch.noise", "NoiseSchedule"): "DiffusionProcess",
    # moved to another module ("module:name"): the world's benchmark as dataset examples belongs to the jobs layer
    ("dsdkit.world.demo", "items_to_examples"): "dsdkit.jobs.datasets:items_to_examples",
}


def renamed_attribute(module: str, name: str, namespace: dict):
    """A module's ``__getattr__`` for its renamed names: the new object, with a warning; else AttributeError."""
    new = RENAMED.get((module, name))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    where, _, attribute = new.rpartition(":")
    shown = f"{where}.{attribute}" if where else f"{module}.{new}"
    warnings.warn(
        f"{module}.{name} is now {shown} (the old name will be removed in a later release)",
        DeprecationWarning,
        stacklevel=3,
    )
    # The new home is imported by name: a deprecated path must not tie a lower layer to a higher one.
    return getattr(importlib.import_module(where), attribute) if where else namespace[new]


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        """The new module is already executed; the old name is bound to it by the import system."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED`, loads the new module, warns once per old path."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(
            f"{fullname} moved to {new}; import it from there (the old path will be removed in a later release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
