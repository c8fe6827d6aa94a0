"""TensorRT engines for a bundle's graphs, through Polygraphy's lazy loaders (kept thin on purpose).

The network is parsed **strongly typed** from the ONNX file: the precision of every tensor is the one the graph
states (fp16 weights and activations, fp32 score islands), never a builder flag; TensorRT 11 has no fp16 builder flag
at all. One optimisation profile per graph over the batch axis (the spec's min/opt/max), and a timing cache shared by
the graphs of a bundle so rebuilds are fast.

Each engine is saved with its metadata (TensorRT version, GPU name and compute capability, profile, precision) and a
cache key over everything that makes an engine valid: the model, the adapter, the graph file, the precision, the
profile, the TensorRT version and the compute capability (:mod:`dsdkit.runtime.engine_key`). An engine whose key does
not match the bundle or the machine is refused by the runtime, before it is deserialized, with the command that
rebuilds it (``dsdkit build-engines BUNDLE``).

None of this runs on our CI machines: TensorRT's libraries come only from NVIDIA's package index, which they cannot
reach. The ``trt``-marked tests run it wherever ``import tensorrt`` works and a GPU is present.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..runtime.engine_key import engine_cache_key, engine_key_fields
from ..runtime.errors import ConfigError, install_hint
from ..runtime.files import atomic_write_text, disk_full, output_error

__all__ = ["tensorrt_unavailable_reason", "engine_cache_key", "build_engine", "build_engines"]

logger = logging.getLogger(__name__)


def tensorrt_unavailable_reason() -> str | None:
    """``None`` when engines can be built here, else one line saying what is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return (
            f"TensorRT is not installed (`import tensorrt` failed; install the trt extra, {install_hint('trt')}, "
            "with TensorRT from NVIDIA's index)"
        )
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return f"Polygraphy is not installed (install the trt extra: {install_hint('trt')})"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    except ImportError:
        pass
    return None


def device_description() -> dict[str, Any]:
    """GPU name and compute capability of device 0 (through torch, which the export side has)."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profile: dict[str, dict[str, list[int]]],
    timing_cache: Path,
    workspace_gb: float | None = None,
) -> float:
    """Parse ``onnx_path`` strongly typed, build with one profile, save to ``engine_path``; returns seconds."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    trt_profile = Profile()
    for name, shapes in profile.items():
        trt_profile.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_gb * 2**30)} if workspace_gb else None
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    # The plan and the timing cache are saved under temporary names and renamed into place, so a crash or a full
    # disk never leaves a truncated engine (or a cache that breaks the next build) under the final names.
    new_cache = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.tmp")
    new_plan = engine_path.with_name(f".{engine_path.name}.{os.getpid()}.tmp")
    config = CreateConfig(
        profiles=[trt_profile],
        load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
        memory_pool_limits=limits,
    )
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(new_cache))
    started = time.perf_counter()
    try:
        SaveEngine(engine, path=str(new_plan))()
        seconds = time.perf_counter() - started
        for path in (new_plan, new_cache):
            if path.exists():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(new_plan, engine_path)
        if new_cache.exists():
            os.replace(new_cache, timing_cache)
    except BaseException as exc:
        new_plan.unlink(missing_ok=True)
        new_cache.unlink(missing_ok=True)
        if isinstance(exc, Exception) and disk_full(exc):
            raise output_error(engine_path, exc) from None
        raise
    return seconds


def build_engines(bundle_dir: Path, manifest: dict[str, Any], workspace_gb: float | None = None) -> dict[str, Any]:
    """Build one engine per graph of the bundle in ``bundle_dir/engines``; returns the manifest's ``engines`` entry.

    Raises:
        ConfigError: TensorRT or a GPU is missing (the message says which).
    """
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise ConfigError(f"cannot build TensorRT engines here: {reason}")
    import tensorrt as trt

    device = device_description()
    folder = bundle_dir / "engines"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    timing_cache = folder / "timing.cache"
    entries = {}
    for name, graph in manifest["graphs"].items():
        onnx_path = bundle_dir / graph["file"]
        # The same fields the runtime recomputes from the bundle and its machine before loading (one definition).
        fields = engine_key_fields(manifest, name, trt.__version__, device["compute_capability"])
        engine_file = f"engines/{name}.plan"
        seconds = build_engine(onnx_path, bundle_dir / engine_file, graph["profile"], timing_cache, workspace_gb)
        meta = {
            **fields,
            **device,
            "file": engine_file,
            "key": engine_cache_key(fields),
            "build_seconds": round(seconds, 1),
        }
        atomic_write_text(folder / f"{name}.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        logger.info(
            "built TensorRT engine %s in %.1f s (%s, sm %s)",
            engine_file,
            seconds,
            device["gpu"],
            device["compute_capability"],
        )
        entries[name] = meta
    return {"built": True, "tensorrt": trt.__version__, **device, "graphs": entries}
