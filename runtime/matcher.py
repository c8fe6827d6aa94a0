"""``Matcher``: DSD scores from a bundle, without torch: the bundle's :class:`~dsdkit.runtime.engine.Engine`.

What is cached, batched and combined is the engine interface's, shared with the PyTorch scorer; this module
supplies the bundle's primitives: the ``image_encoder`` graph (``z0`` and, for kv-prompt adapters, the image
condition), the ``text_encoder`` graph, and one run of the ``scorer`` graph per batch of (pair, timestep) items.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .backends import Runner, make_runners
from .bundle import Bundle
from .config import TimestepTable, knob_field, resolve_scoring
from .engine import Engine, EngineDescription, EngineIdentity, ScoreOutput
from .errors import ConfigError
from .timesteps import discffusion_timesteps
from .tokenizer import context_pool_mask, token_mask

__all__ = ["Matcher", "ScoreOutput"]

logger = logging.getLogger(__name__)


def _check_noise_bank(config, bundle: Bundle) -> None:
    """The scorer graph holds one noise latent per timestep index, so a bundle serves at most its bank's worth."""
    bank = int(bundle.manifest["noise"]["bank_size"])
    steps = len(config.timestep_table)
    if steps <= bank:
        return
    if config.timesteps is TimestepTable.noise_levels:
        raise ConfigError(
            f"{knob_field('noise_levels')}: {steps} levels asked for, but {bundle.path} holds a noise bank of "
            f"{bank}; give at most {bank} levels (or re-export with a larger noise bank)",
            field="noise_levels",
        )
    # The table can hold fewer entries than S (its indices stop at 990), so the largest S is found, not assumed.
    largest = max(s for s in range(1, 981) if len(discffusion_timesteps(s)) <= bank)
    raise ConfigError(
        f"{knob_field('num_timesteps')} {config.num_timesteps}: {bundle.path} holds a noise bank of {bank} "
        f"timesteps, so S can be at most {largest}; use `num_timesteps` {largest} or fewer (or re-export with a "
        "larger noise bank)",
        field="num_timesteps",
    )


class Matcher(Engine):
    """Scores images against captions with the graphs of a bundle (the runtime's :class:`~.engine.Engine`).

    Build one with :meth:`from_bundle`. ``score(images, texts)`` returns ``float64[N, M]``; images may be paths,
    PIL images or arrays. Encodings are cached, so repeated images or captions cost nothing.

    The bundle fixes the knobs that define the score (:data:`~dsdkit.runtime.config.PINNED_KNOBS`); the free ones
    (S, the timestep schedule, the denoising term, normalisation) may be changed with ``overrides``, within the
    noise bank the scorer graph holds.

    Threads: one matcher may be called from any number of threads at once, as every
    :class:`~dsdkit.runtime.engine.Engine` (only cache lookups and stores are serialised). Graph runs take no lock
    on ONNX Runtime (``InferenceSession.run`` is thread-safe), so they run in parallel; TensorRT runs one at a time
    (one execution context per engine). Each graph's session is created once, by the first call that needs it.
    """

    def __init__(
        self,
        bundle: Bundle,
        runners: dict[str, Runner],
        batch_size: int | None = None,
        num_timesteps: int | None = None,
        progress: Callable[[int], None] | None = None,
        chunk_size: int = 64,
        max_cached_images: int = 4096,
        overrides: dict[str, Any] | None = None,
    ):
        self.bundle = bundle
        self.runners = runners
        overrides = dict(overrides or {})
        if num_timesteps is not None:
            overrides["num_timesteps"] = int(num_timesteps)
        # The one rule of every engine; it refuses --timesteps on a noise-levels bundle, naming --noise-levels.
        self.config = resolve_scoring(None, bundle.scoring, overrides, source=str(bundle.path))
        self.timesteps = self.config.timestep_table
        _check_noise_bank(self.config, bundle)
        self.tokenizer = bundle.tokenizer()
        model = bundle.manifest["model"]
        self.resolution = int(self.config.resolution or model["resolution"])
        self.layer_names = list(bundle.manifest.get("layers") or [])
        self.conditioned = "condition" in bundle.graph("scorer")["inputs"]
        profile = bundle.manifest["export"]["batch"]
        self.batch_size = int(batch_size or profile[1])
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if any(getattr(r, "max_batch", None) for r in runners.values()):  # engines cannot exceed their profile
            self.batch_size = min(self.batch_size, int(profile[2]))
        self.progress = progress
        if chunk_size < 1:
            raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        # Bounded caches (oldest first out) keep memory flat over thousands of images; captions are few and stay.
        self.max_cached_images = max(int(max_cached_images), self.chunk_size)
        self._init_caches()

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike,
        backend: str = "auto",
        device: str = "auto",
        *,
        batch_size: int | None = None,
        threads: int | None = None,
        chunk_size: int = 64,
        verify: bool = True,
        progress: Callable[[int], None] | None = None,
        **knobs: Any,
    ) -> Matcher:
        """Open a bundle and prepare its runners (sessions are created on first use).

        Args:
            backend: ``auto`` (TensorRT when the bundle has engines and TensorRT is installed, else ONNX Runtime),
                ``onnxruntime`` or ``tensorrt``.
            device: ``auto``, ``cpu`` or ``cuda`` (for ONNX Runtime: the CUDA provider, when installed).
            batch_size: pairs per scorer run (default: the export profile's optimal batch; at most its maximum).
            threads: ONNX Runtime's intra-op CPU threads (default: :func:`~dsdkit.runtime.threads.current_threads`;
                its pools wait without spinning either way).
            chunk_size: images per chunk in :meth:`score`.
            verify: check every file's sha256 first.
            progress: the default progress callback (evaluations after each batch).
            knobs: free scoring knobs to change, by name (see the class doc): ``num_timesteps`` (another S for the
                discffusion table: the graph serves any S up to its noise bank), ``normalize`` and the others the
                graphs do not fix; ``overrides={...}`` (a dict of them) is accepted too.
        """
        overrides = dict(knobs.pop("overrides", None) or {})
        overrides.update(knobs)
        num_timesteps = overrides.pop("num_timesteps", None)
        bundle = Bundle.open(path, verify=verify)
        runners = make_runners(bundle, backend, device, threads)
        return cls(
            bundle,
            runners,
            batch_size=batch_size,
            num_timesteps=num_timesteps,
            chunk_size=chunk_size,
            progress=progress,
            overrides=overrides,
        )

    def shortlist_embedder(self):
        """The bundle's shortlist CLIP (exported with ``--shortlist``), torch-free; ``None`` without one."""
        if not self.bundle.manifest.get("shortlist"):
            return None
        from .clip import OnnxClip

        profile = self.bundle.manifest["export"]["batch"]
        return OnnxClip(self.bundle, self.runners, batch_size=int(profile[2]))

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()

    def identity(self) -> EngineIdentity:
        manifest = self.bundle.manifest
        return EngineIdentity(
            engine="bundle",
            weights=manifest["files"][manifest["graphs"]["scorer"]["file"]]["sha256"],
            scoring=self.config.to_dict(),
            timesteps=tuple(self.timesteps),
        )

    def describe(self) -> EngineDescription:
        manifest = self.bundle.manifest
        model = manifest["model"]
        runner = self.runners["scorer"].name
        return EngineDescription(
            backend=runner,
            label=f"{runner} ({self.bundle.path})",
            model={k: model[k] for k in ("source", "identity", "resolution", "licence") if k in model},
            precision=manifest["precision"],
            scoring=self.config.to_dict(),
            timesteps=list(self.timesteps),
            layers=list(self.layer_names),
            adapters=(manifest.get("adapter") or {}).get("file"),
            text_length=int(model["text_length"]),
            warnings=["random-weight test model: scores are meaningless"]
            if model.get("test_model_random_weights")
            else [],
            details={"bundle": str(self.bundle.path), "runners": {n: r.describe() for n, r in self.runners.items()}},
        )

    # -- the engine's primitives ---------------------------------------------------------------------------------

    def _encode_pixel_batch(self, pixels: np.ndarray) -> list[tuple[Any, Any]]:
        # The engine hands over at most batch_size images (one graph run within the export's profile).
        out = self.runners["image_encoder"].infer({"pixels": pixels})
        conditions = out.get("condition")
        return [(out["latents"][i], None if conditions is None else conditions[i]) for i in range(len(pixels))]

    def _encode_token_batch(self, tokens) -> list[tuple[Any, Any]]:
        ids = np.stack([t.ids for t in tokens])
        states = self.runners["text_encoder"].infer({"input_ids": ids})["states"]
        context = self.bundle.manifest["model"].get("context_tokens", "all")  # bundles before it: all
        if context == "all":
            return [(states[i], token_mask(t.roles, self.config.tokens.value)) for i, t in enumerate(tokens)]
        return [(states[i], context_pool_mask(t.roles, context)) for i, t in enumerate(tokens)]

    def _evaluate(self, images, texts, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = {
            "latents": np.stack([e.latent for e in images]),
            "states": np.stack([e.states for e in texts]),
            "token_mask": np.stack([e.mask for e in texts]),
            "timestep": np.asarray(self.timesteps, dtype=np.int64)[steps],
            "noise_index": steps.astype(np.int64),
        }
        if self.conditioned:
            feed["condition"] = np.stack([e.condition for e in images])
        out = self.runners["scorer"].infer(feed)
        return out["layer_scores"].astype(np.float64), out["noise_error"].astype(np.float64)
