"""The one engine factory: :func:`open_engine` builds the engine an :class:`~dsdkit.jobs.specs.EngineSpec` names.

- a bundle: the torch-free :class:`~dsdkit.runtime.matcher.Matcher` (torch is never imported);
- a model: the PyTorch :class:`~dsdkit.pytorch.scorer.Scorer`, its scoring config resolved by the one rule every
  command uses (:func:`~dsdkit.runtime.config.resolve_scoring`: explicit knobs over the adapter's header over the
  preset, under what the model declares about its cross-attention context).

Everything above this module drives the returned :class:`~dsdkit.runtime.engine.Engine` through its interface only.
"""

from __future__ import annotations

from ..runtime.engine import Engine
from .specs import EngineSpec

__all__ = ["open_engine"]


def open_engine(spec: EngineSpec) -> Engine:
    """The engine ``spec`` names, ready to score (close it, or use it as a context manager)."""
    if spec.kind == "bundle":
        from ..runtime.matcher import Matcher

        return Matcher.from_bundle(
            spec.bundle,
            backend=spec.backend,
            device=spec.device or "auto",
            batch_size=spec.batch_size,
            chunk_size=spec.chunk_size,
            overrides=spec.knobs,
            threads=spec.threads,
        )
    from ..pytorch.scorer import build_scorer
    from ..runtime.threads import configure_threads

    if spec.threads is not None:
        configure_threads(spec.threads)
    return build_scorer(
        spec.model,
        spec.adapters,
        spec.preset,
        spec.knobs,
        spec.batch_size,
        device=spec.device,
        dtype=spec.dtype,
        compile=spec.compile,
        chunk_size=spec.chunk_size,
    )
