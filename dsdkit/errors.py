"""dsdkit's exception family (defined in the torch-free runtime, re-exported here). See runtime/errors.py."""

from .runtime.errors import (
    EXIT_CODES,
    BundleError,
    ConfigError,
    DsdkitError,
    InputError,
    ModelError,
    OutputError,
    ParityError,
    TrainingError,
)

__all__ = [
    "DsdkitError",
    "ConfigError",
    "InputError",
    "ModelError",
    "OutputError",
    "TrainingError",
    "BundleError",
    "ParityError",
    "EXIT_CODES",
]
