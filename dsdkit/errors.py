"""dsdkit's exception family (defined in the torch-free runtime, re-exported here). See runtime/errors.py."""

from .runtime.errors import EXIT_CODES, ConfigError, DsdkitError, InputError, ModelError, OutputError, TrainingError

__all__ = ["DsdkitError", "ConfigError", "InputError", "ModelError", "OutputError", "TrainingError", "EXIT_CODES"]
