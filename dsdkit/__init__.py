"""dsdkit: Discriminative Stable Diffusion (DSD) as a fast, deployable image-text matcher.

``import dsdkit`` is cheap: torch, diffusers and transformers are imported only when a PyTorch feature is used.

    >>> from dsdkit import load_model, Scorer, ScoringConfig
    >>> model = load_model("stabilityai/stable-diffusion-2-1-base", device="cuda", dtype="fp16")
    >>> scorer = Scorer(model, ScoringConfig.from_preset("discffusion"))
    >>> scores = scorer.score(["cat.jpg", "dog.jpg"], ["a cat on a sofa", "a dog on a sofa"])  # [2, 2]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access so `import dsdkit` stays torch-free.
_LAZY = {
    "ScoringConfig": "dsdkit.config",
    "PRESETS": "dsdkit.config",
    "DsdkitError": "dsdkit.errors",
    "ConfigError": "dsdkit.errors",
    "InputError": "dsdkit.errors",
    "ModelError": "dsdkit.errors",
    "OutputError": "dsdkit.errors",
    "load_model": "dsdkit.models",
    "SD2Model": "dsdkit.models",
    "DEFAULT_MODEL": "dsdkit.models",
    "Scorer": "dsdkit.scorer",
    "ScoreOutput": "dsdkit.scorer",
    "write_tiny_model": "dsdkit.tiny",
    "match": "dsdkit.matching",
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
    from .config import PRESETS as PRESETS
    from .config import ScoringConfig as ScoringConfig
    from .errors import ConfigError as ConfigError
    from .errors import DsdkitError as DsdkitError
    from .errors import InputError as InputError
    from .errors import ModelError as ModelError
    from .errors import OutputError as OutputError
    from .matching import match as match
    from .models import DEFAULT_MODEL as DEFAULT_MODEL
    from .models import SD2Model as SD2Model
    from .models import load_model as load_model
    from .scorer import ScoreOutput as ScoreOutput
    from .scorer import Scorer as Scorer
    from .tiny import write_tiny_model as write_tiny_model
