"""The DSD scorer on PyTorch: the :class:`~dsdkit.runtime.engine.Engine` of a loaded SD2 model.

What is cached, batched and combined is the engine interface's, shared with the bundle runtime
(:mod:`dsdkit.runtime.engine`); this module supplies the PyTorch primitives: the VAE (posterior mean x scaling
factor -> ``z0``), the text encoder, and one UNet batch through :class:`~dsdkit.pytorch.forward.ScoringForward` (eager
or compiled, :mod:`dsdkit.pytorch.acceleration`) with the fixed, seeded noise bank.

A pair's score never depends on what else is in its batch: every operation is per sample (no batch statistics),
the noise ε_k is shared by all pairs at timestep k, and reductions run over a pair's own tensors only.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from ..runtime.config import ScoringConfig, TokenSet, resolve_scoring
from ..runtime.engine import (
    Engine,
    EngineDescription,
    EngineIdentity,
    ImageEncoding,
    ProgressCallback,
    ScoreOutput,
    TextEncoding,
)
from ..runtime.errors import ConfigError
from ..runtime.tokenizer import context_pool_mask
from .acceleration import Acceleration, compiled_forward, set_channels_last
from .forward import Noising, ScoringForward
from .models import SD2Model
from .noise import noise_bank
from .pooling import token_mask

__all__ = ["Scorer", "ScoreOutput", "ImageEncoding", "TextEncoding", "build_scorer"]

logger = logging.getLogger(__name__)


class Scorer(Engine):
    """Scores image-caption pairs with DSD on a loaded SD2 model (the PyTorch :class:`~dsdkit.runtime.engine.Engine`).

    Threads: one scorer, or several scorers sharing one model (any configs, adapters, resolutions), may be called
    from any number of threads at the same time; each call returns what it would return made alone (within the
    scoring contract's batch-invariance tolerance). What is cached, and what of that is serialised, is the
    :class:`~dsdkit.runtime.engine.Engine`'s: cache lookups and stores only; a missing encoding or unconditional term
    is computed by one thread while the others that need it wait. On the model:

    - In parallel: the UNet, VAE and text-encoder passes of different threads (torch releases the GIL in its
      kernels; the UNet's processors keep no state, each pass records into its own
      :class:`~dsdkit.pytorch.forward.ForwardCall`), compiled CPU forwards included.
    - Serialised, briefly, under a lock: installing the processors on a UNet (once), the channels-last conversion,
      the cache of compiled forwards. ``torch.compile`` compiles one graph at a time (dynamo's own lock); a compiled
      forward with CUDA graphs (``reduce-overhead``, ``max-autotune``) runs one batch at a time.
    - CPU threads: each Python thread's torch ops use intra-op threads of their own; for many concurrent calls,
      ``torch.set_num_threads(1)`` (or a small number) keeps the cores from being oversubscribed.

    Args:
        model: from :func:`dsdkit.load_model`.
        config: how to score; defaults to the ``discffusion`` preset.
        batch_size: UNet batch (pairs x timesteps packed together). Scores do not depend on it.
        progress: the default progress callback, ``progress(n)`` after each UNet batch with the n sample-evaluations
            it ran (each scoring call may pass its own); see :meth:`planned_evaluations` for a job's total.
        adapter: a trained (or fresh) adapter from :mod:`dsdkit.pytorch.adapters`; ``None`` scores zero-shot.
        acceleration: ``torch.compile`` and channels-last (:class:`~dsdkit.pytorch.acceleration.Acceleration`); scores
            agree with the eager scorer's within the export's parity tolerances. Compiled scorers pad a short last
            batch to ``batch_size`` (one static shape per batch size).
        adapter_file: where ``adapter`` was loaded from, for :meth:`metadata` (result files name it).
        chunk_size: images per chunk in :meth:`score` and :meth:`iter_blocks`.
    """

    def __init__(
        self,
        model: SD2Model,
        config: ScoringConfig | None = None,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        adapter=None,
        acceleration: Acceleration | None = None,
        adapter_file: str | None = None,
        *,
        chunk_size: int = 64,
    ):
        self.model = model
        self.adapter_file = adapter_file
        if chunk_size < 1:
            raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.acceleration = acceleration or Acceleration()
        self.adapter = adapter
        cfg = config or resolve_scoring(model=model.declaration)
        if model.context_tokens != "all" and cfg.tokens is not TokenSet.words:
            # The model's declared context takes precedence over the tokens knob (resolve_scoring refuses an
            # explicit conflicting value; a preset's default is simply replaced).
            logger.info(
                "%s attends to word tokens only (%s): scoring with tokens=words", model.source, model.context_tokens
            )
            cfg = cfg.replace(tokens=TokenSet.words)
        self.config = cfg
        self.batch_size = int(batch_size or 8)
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        self.progress = progress
        if cfg.needs_empty_caption_score and cfg.tokens is TokenSet.words and model.context_tokens == "all":
            raise ConfigError(
                "tokens=words keeps no position of the empty caption, so its score (needed by normalize=uncond and "
                "uncond_in_attention) is undefined; use tokens=words-eos or all"
            )
        self.resolution = cfg.resolution or model.resolution
        latent_size = self.resolution // model.vae_scale_factor
        if latent_size % 8:
            raise ConfigError(
                f"resolution {self.resolution} gives a {latent_size}x{latent_size} latent; the SD2 UNet needs a "
                "multiple of 8 (use a resolution that is a multiple of 64)"
            )
        self.tokenizer = model.tokenizer
        self.timesteps = cfg.timestep_table
        self.forward = ScoringForward(model, cfg, adapter)
        self.layer_names = self.forward.layer_names
        device = model.device
        latent_shape = (model.latent_channels, latent_size, latent_size)
        self.noise = noise_bank(cfg.noise_seed, len(self.timesteps), latent_shape).to(device)
        signal, noise = model.schedule.coefficients(self.timesteps)
        self._signal = torch.tensor(signal, dtype=torch.float32, device=device)
        self._noise_scale = torch.tensor(noise, dtype=torch.float32, device=device)
        self._timestep_tensor = torch.tensor(self.timesteps, dtype=torch.int64, device=device)
        self._init_caches()
        if self.acceleration.uses_channels_last:
            set_channels_last(model, True)
        mode = self.acceleration.mode_for(device.type)
        self._compiled = None if mode is None else compiled_forward(self.forward, mode)

    def noising(self, steps: torch.Tensor) -> Noising:
        """How samples at timestep indices ``steps`` (positions in :attr:`timesteps`) are noised: ``sqrt(ā_t)``,
        ``sqrt(1 - ā_t)``, the noise bank's ``ε_k`` and ``t``."""
        steps = steps.to(self.model.device)
        return Noising(self._signal[steps], self._noise_scale[steps], self.noise[steps], self._timestep_tensor[steps])

    def with_adapter(self, adapter) -> Scorer:
        """A scorer for another adapter (or its new weights) that reuses this one's image and caption encodings."""
        other = Scorer(self.model, self.config, self.batch_size, self.progress, adapter, self.acceleration, None)
        other.share_encodings(self)
        return other

    def identity(self) -> EngineIdentity:
        return EngineIdentity(
            engine="pytorch",
            weights=self.model.identity(),
            scoring=self.config.to_dict(),
            timesteps=tuple(self.timesteps),
            adapters=self.adapter_file,
        )

    def describe(self) -> EngineDescription:
        model = self.model
        label = f"pytorch ({model.device}, {model.precision.value})"
        if self.acceleration.compile is not None:
            label += f", compiled ({self.acceleration.compile})"
        return EngineDescription(
            backend="pytorch",
            label=label,
            model=model.describe(),
            precision=model.precision.value,
            scoring=self.config.to_dict(),
            timesteps=list(self.timesteps),
            layers=list(self.layer_names),
            adapters=self.adapter_file,
            text_length=self.tokenizer.max_length,
            warnings=["random-weight test model: scores are meaningless"] if model.is_test_model else [],
            details={"compile": self.acceleration.compile},
        )

    # -- the engine's primitives ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def _encode_pixel_batch(self, pixels: np.ndarray) -> list[tuple[Any, Any]]:
        batch = torch.from_numpy(pixels).to(self.model.device, torch.float32)
        latents = self.model.vae.encode(batch).latent_dist.mean * self.model.scaling_factor
        return [(latent.float(), None) for latent in latents]

    @torch.inference_mode()
    def _encode_token_batch(self, tokens) -> list[tuple[Any, Any]]:
        ids = torch.from_numpy(np.stack([t.ids for t in tokens])).to(self.model.device)
        states = self.model.text_encoder(input_ids=ids).last_hidden_state.float()
        out = []
        for item, state in zip(tokens, states, strict=True):
            if self.model.context_tokens == "all":
                mask = token_mask(torch.from_numpy(item.roles.astype(np.int64)), self.config.tokens)
            else:
                mask = torch.from_numpy(context_pool_mask(item.roles, self.model.context_tokens))
            out.append((state, mask.to(self.model.device)))
        return out

    @torch.inference_mode()
    def _evaluate(self, images, texts, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One batched UNet evaluation at per-sample timesteps."""
        latents = torch.stack([e.latent for e in images])
        states = torch.stack([e.states for e in texts])
        masks = torch.stack([e.mask for e in texts])
        steps = torch.from_numpy(steps)
        count = latents.shape[0]
        if self._compiled is not None and count < self.batch_size:
            # One static shape per batch size: repeat the last item (its results are dropped below).
            fill = self.batch_size - count
            steps = torch.cat([steps, steps[-1:].expand(fill)])
            latents, states, masks = (
                torch.cat([t, t[-1:].expand(fill, *t.shape[1:])]) for t in (latents, states, masks)
            )
        noising = self.noising(steps)
        if self.acceleration.uses_channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
            noising = noising._replace(noise=noising.noise.contiguous(memory_format=torch.channels_last))
        run = self._compiled or self.forward
        layers, errors = run(latents, noising, states, masks)
        return (
            layers[:count].double().cpu().numpy(),
            errors[:count].double().cpu().numpy(),
        )


#: What :func:`build_scorer` takes beside the model, adapter and scoring config (``EngineSpec``'s PyTorch fields).
SCORER_OPTIONS = ("device", "dtype", "compile", "chunk_size")


def build_scorer(
    model=None,
    adapters=None,
    preset: str | None = None,
    overrides: dict | None = None,
    batch_size: int | None = None,
    **options: Any,
) -> Scorer:
    """A scorer from command-line style options: the model (a folder, hub id, ``"demo"``, or a loaded
    :class:`~dsdkit.pytorch.models.SD2Model`), an optional adapter file, the scoring config
    (:func:`~dsdkit.runtime.config.resolve_scoring` of ``preset``, the adapter's header and the knob ``overrides``,
    under the context the model declares), and ``options``: ``device``, ``dtype``, ``compile`` (a ``torch.compile``
    mode, :class:`~dsdkit.pytorch.acceleration.Acceleration`) and ``chunk_size`` (images per chunk of
    :meth:`~Scorer.score`). Bad options are refused before the model loads."""
    from .adapters import load_adapter, read_adapter_header
    from .models import declared_model, load_model

    unknown = sorted(set(options) - set(SCORER_OPTIONS))
    if unknown:
        raise ConfigError(
            f"build_scorer: unknown option(s) {', '.join(unknown)}; choose from {', '.join(SCORER_OPTIONS)}"
        )
    acceleration = Acceleration(compile=options.get("compile"))
    pinned = read_adapter_header(adapters)["scoring"] if adapters is not None else None
    declaration = model.declaration if isinstance(model, SD2Model) else declared_model(model)
    config = resolve_scoring(preset, pinned, overrides, source=str(adapters), model=declaration)
    sd2 = (
        model
        if isinstance(model, SD2Model)
        else load_model(model, device=options.get("device"), dtype=options.get("dtype"))
    )
    adapter = load_adapter(adapters, sd2, config)[0] if adapters is not None else None
    adapter_file = None if adapters is None else str(adapters)
    return Scorer(
        sd2, config, batch_size, None, adapter, acceleration, adapter_file, chunk_size=options.get("chunk_size", 64)
    )
