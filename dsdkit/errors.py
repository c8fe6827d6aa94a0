"""dsdkit's exception family (defined in the torch-free runtime, re-exported here). See runtime/errors.py."""

from .runtime.errors import *  # noqa: F403 - the whole family, one definition
from .runtime.errors import __all__  # noqa: F401
