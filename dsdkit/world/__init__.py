"""The demo world: synthetic scenes of coloured shapes with captions whose truth is known (:mod:`.scenes`), and
the shipped demo model and mini-CLIP trained on it (:mod:`.demo`). ``from dsdkit import world`` gives the scenes'
API, as before."""

from .scenes import *  # noqa: F403
from .scenes import __all__ as __all__


def __getattr__(name: str):
    # ``dsdkit.world`` was one module: its constants and helpers outside ``__all__`` (``TWO_SIDE``,
    # ``training_layouts``, ...) stay reachable under the package's name.
    from . import scenes

    try:
        return getattr(scenes, name)
    except AttributeError:
        raise AttributeError(f"module 'dsdkit.world' has no attribute {name!r}") from None
