"""The cache key of a TensorRT engine, as plain data: what an engine was built for and what a bundle here needs.

A serialized TensorRT plan is valid only for the exact graph, precision and batch profile it was built from, the
TensorRT version that built it and the GPU architecture it was tuned on; the model and adapter are part of the key
so that an engine copied in from another bundle is never run against this bundle's tokenizer and config. The
export side (``dsdkit build-engines``) records these fields beside each engine; the runtime compares them with the
bundle and the machine before deserializing anything, because a mismatching plan can load and silently compute
something else (another graph of the same shapes) or crash inside TensorRT instead of failing with a message.

Torch-free and TensorRT-free on purpose: the check is exercised by tests on machines without either.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from .errors import BundleError

__all__ = ["ENGINE_KEY_FIELDS", "engine_key_fields", "engine_cache_key", "check_engine_key"]

#: Everything an engine depends on, in the order a mismatch is reported (bundle-side first, then the machine).
ENGINE_KEY_FIELDS = ("model", "adapter", "graph", "precision", "profile", "tensorrt", "compute_capability")

_LABELS = {
    "model": "model identity",
    "adapter": "adapter sha256",
    "graph": "graph sha256",
    "precision": "precision",
    "profile": "batch profile",
    "tensorrt": "TensorRT",
    "compute_capability": "compute capability",
}
_HASHES = {"model", "adapter", "graph"}
# A message names at most this many mismatching fields: the first ones say enough to see why the engine is stale.
_SHOWN = 3


def engine_key_fields(
    manifest: Mapping[str, Any],
    graph_name: str,
    tensorrt: str | None = None,
    compute_capability: str | None = None,
) -> dict[str, Any]:
    """The key fields of ``graph_name``'s engine from a bundle manifest, plus the machine fields that are given.

    The graph's sha256 is the manifest's record of the file, which :meth:`Bundle.verify` checks against the disk.
    ``tensorrt`` and ``compute_capability`` are left out when ``None`` (a machine that cannot tell its compute
    capability is then not checked on it; deserialization still refuses a plan the GPU cannot run).
    """
    graph = manifest["graphs"][graph_name]
    fields = {
        "model": manifest["model"]["identity"],
        "adapter": (manifest.get("adapter") or {}).get("sha256"),
        "graph": manifest["files"][graph["file"]]["sha256"],
        "precision": graph["precision"],
        "profile": graph["profile"],
    }
    if tensorrt is not None:
        fields["tensorrt"] = tensorrt
    if compute_capability is not None:
        fields["compute_capability"] = compute_capability
    return fields


def engine_cache_key(fields: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of everything an engine depends on."""
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()


def _show(field: str, value: Any, recorded: bool = True) -> str:
    if not recorded:
        return "not recorded"
    if value is None:
        return "none" if field == "adapter" else "unknown"
    if field in _HASHES and isinstance(value, str):
        return value[:12]
    if isinstance(value, (Mapping, list)):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        return text if len(text) <= 60 else text[:57] + "..."
    return str(value)


def _mismatch(field: str, built: Mapping[str, Any], needed: Any) -> str:
    label, have = _LABELS[field], built.get(field)
    if isinstance(have, Mapping) and isinstance(needed, Mapping):
        # A profile has one entry per input; name the first input that differs, not a truncated whole.
        name = next((k for k in sorted({*have, *needed}) if have.get(k) != needed.get(k)), None)
        if name is not None:
            label, have, needed = f"{label} of {name}", have.get(name), needed.get(name)
    return f"{label} built for {_show(field, have, field in built)}, needed {_show(field, needed)}"


def check_engine_key(
    engine_file: str | os.PathLike,
    built: Mapping[str, Any],
    needed: Mapping[str, Any],
    bundle_path: str | os.PathLike,
) -> None:
    """Refuse an engine whose recorded key differs from what the bundle and this machine need.

    Args:
        engine_file: the engine's path (named in the message).
        built: the engine's metadata as ``dsdkit build-engines`` wrote it (the key fields and ``key``).
        needed: :func:`engine_key_fields` of the bundle and this machine; a field left out is not compared.
        bundle_path: the bundle, for the rebuild command.

    Raises:
        BundleError: a field differs or is not recorded, or the recorded ``key`` is not the hash of the recorded
            fields (metadata edited by hand); the message names the first mismatches and the rebuild command.
    """
    rebuild = f"rebuild the engines on this machine with `dsdkit build-engines {bundle_path}`"
    mismatches = [
        _mismatch(field, built, needed[field])
        for field in ENGINE_KEY_FIELDS
        if field in needed and (field not in built or built[field] != needed[field])
    ]
    if mismatches:
        more = f" and {len(mismatches) - _SHOWN} more" if len(mismatches) > _SHOWN else ""
        raise BundleError(f"{engine_file}: stale TensorRT engine ({'; '.join(mismatches[:_SHOWN])}{more}); {rebuild}")
    recorded = {field: built[field] for field in ENGINE_KEY_FIELDS if field in built}
    if "key" in built and built["key"] != engine_cache_key(recorded):
        raise BundleError(
            f"{engine_file}: the engine's metadata does not match its cache key (edited after the build); {rebuild}"
        )
