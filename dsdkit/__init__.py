"""dsdkit: Discriminative Stable Diffusion (DSD) as a fast, deployable image-text matcher.

``import dsdkit`` is cheap: torch, diffusers and transformers are imported only when a PyTorch feature is used. It
sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads (unless you set a policy, or imported torch first: then it logs
one hint), so the library's thread pools sleep instead of spinning while they wait, as the CLI's do;
``dsdkit.configure_threads(n)`` sets the thread count.

    >>> from dsdkit import load_model, Scorer
    >>> model = load_model("demo", device="cpu")  # or a diffusers SD2 folder or hub id, on "cuda"
    >>> scorer = Scorer(model, model.scoring_config(num_timesteps=10))  # as `dsdkit match --model demo` scores
    >>> scores = scorer.score(["examples/demo/00-a-red-circle.png"], ["a red circle", "a blue square"])  # [1, 2]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _moved
from .runtime.threads import use_passive_waiting as _use_passive_waiting
from .runtime.version import __version__

# First of all: libgomp (torch's OpenMP) reads its wait policy once, when torch loads (runtime/threads.py).
_use_passive_waiting(hint=True)
_moved.install()  # the deprecated import paths of modules that moved (dsdkit.scorer -> dsdkit.pytorch.scorer, ...)

# name -> module that defines it; resolved on first access so `import dsdkit` stays torch-free.
_LAZY = {
    "ScoringConfig": "dsdkit.runtime.config",
    "PRESETS": "dsdkit.runtime.config",
    "DsdkitError": "dsdkit.runtime.errors",
    "ConfigError": "dsdkit.runtime.errors",
    "InputError": "dsdkit.runtime.errors",
    "ModelError": "dsdkit.runtime.errors",
    "OutputError": "dsdkit.runtime.errors",
    "load_model": "dsdkit.pytorch.models",
    "SD2Model": "dsdkit.pytorch.models",
    "DEFAULT_MODEL": "dsdkit.pytorch.models",
    "Scorer": "dsdkit.pytorch.scorer",
    "ScoreOutput": "dsdkit.pytorch.scorer",
    "write_tiny_model": "dsdkit.pytorch.tiny",
    "match": "dsdkit.jobs.match",
    "configure_threads": "dsdkit.runtime.threads",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dsdkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    # `name as name` marks these as re-exports (the names of __all__) for type checkers and linters.
    from .jobs.match import match as match
    from .pytorch.models import DEFAULT_MODEL as DEFAULT_MODEL
    from .pytorch.models import SD2Model as SD2Model
    from .pytorch.models import load_model as load_model
    from .pytorch.scorer import ScoreOutput as ScoreOutput
    from .pytorch.scorer import Scorer as Scorer
    from .pytorch.tiny import write_tiny_model as write_tiny_model
    from .runtime.config import PRESETS as PRESETS
    from .runtime.config import ScoringConfig as ScoringConfig
    from .runtime.errors import ConfigError as ConfigError
    from .runtime.errors import DsdkitError as DsdkitError
    from .runtime.errors import InputError as InputError
    from .runtime.errors import ModelError as ModelError
    from .runtime.errors import OutputError as OutputError
    from .runtime.threads import configure_threads as configure_threads
