"""The scoring configuration, re-exported from the torch-free runtime (``dsdkit.runtime.config``), where it lives so
that bundles and the PyTorch path read one definition."""

from .runtime.config import *  # noqa: F403 - one definition, two import paths
from .runtime.config import __all__  # noqa: F401
