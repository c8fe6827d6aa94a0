"""Typed records from JSON: the one way a dsdkit dataclass (a scoring config, a training recipe, an engine spec) is
built from a JSON object or file, with one-line errors that name the record and what is wrong with it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

__all__ = ["record_from_dict", "record_from_file"]

T = TypeVar("T")


def record_from_dict(cls: type[T], data: Any, what: str, unknown_hint: str = "") -> T:
    """``cls(**data)`` for a dataclass ``cls``, refusing in one line (a :class:`ConfigError` naming ``what``): data
    that is not a JSON object, fields ``cls`` does not have (``unknown_hint`` says why they might be there), and
    values the dataclass's own checks refuse or that do not fit its signature."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object of {cls.__name__} fields, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{what} has unknown field(s) {unknown}" + (f"; {unknown_hint}" if unknown_hint else ""))
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def record_from_file(cls: type[T], path: str | os.PathLike, what: str | None = None) -> T:
    """:func:`record_from_dict` of a JSON file (an unreadable or malformed file is refused in one line too)."""
    what = what or str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON record ({exc})") from None
    return record_from_dict(cls, data, what)
