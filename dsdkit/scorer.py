"""The DSD scorer on PyTorch: many images against many captions, batched, with per-image and per-caption caching.

Work is split by what it depends on (DESIGN.md, scoring contract):

- per image, once: preprocess, VAE-encode (posterior mean x scaling factor) -> ``z0``;
- per caption, once: tokenize, text-encode -> ``c`` (77 x D) and the token mask;
- per (image, timestep), once, when the config needs it: the unconditional pass ``ε̂(x_t, ∅)`` and the empty
  caption's attention score;
- per (pair, timestep): one conditional UNet pass on ``(x_t, t_k, c)``, pairs of all timesteps packed into batches.

A pair's score never depends on what else is in its batch: every operation is per sample (no batch statistics),
the noise ε_k is shared by all pairs at timestep k, and reductions run over a pair's own tensors only.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .acceleration import Acceleration, compiled_forward, set_channels_last
from .attention import Recorder, scoring_processors, select_layers
from .config import Normalization, ScoringConfig, TokenSet
from .errors import ConfigError, InputError
from .models import SD2Model
from .pooling import token_mask
from .runtime.images import ImageInput, preprocess_image
from .runtime.scoring import combine_terms as combine
from .runtime.tokenizer import TokenizedText
from .schedule import noise_bank, timesteps_for

__all__ = ["Scorer", "ScoreOutput", "ImageEncoding", "TextEncoding", "unet_pass", "combine_terms"]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]


@dataclass
class ImageEncoding:
    """One image's cached work: ``z0`` (independent of adapters and timesteps)."""

    key: str
    latent: torch.Tensor  # float32[C, h, w], on the model's device


@dataclass
class TextEncoding:
    """One caption's cached work: token ids and roles, text states and the kept-token mask."""

    text: str
    tokens: TokenizedText
    states: torch.Tensor  # float32[T, D]
    mask: torch.Tensor  # float32[T]


@dataclass
class ScoreOutput:
    """Scores of ``pairs`` (or of a full matrix), with the terms they are made of.

    Attributes:
        scores: ``float64[P]`` (pairs) or ``[N, M]`` (matrix): the final scores.
        layer_scores: ``float64[..., L]`` attention term per scored layer (normalised when ``normalize=uncond``),
            mean over timesteps.
        denoise: ``float64[...]`` the denoising term (mean over timesteps), or ``None`` when it is off.
        layer_names: the scored cross-attention layers.
        timesteps: the timesteps averaged over.
        truncated: per caption, word tokens dropped beyond the 77-token context.
        unet_evaluations: UNet sample-evaluations this call ran (cached work not counted).
    """

    scores: np.ndarray
    layer_scores: np.ndarray
    denoise: np.ndarray | None
    layer_names: list[str]
    timesteps: list[int]
    truncated: list[int] = field(default_factory=list)
    unet_evaluations: int = 0


class Scorer:
    """Scores image-caption pairs with DSD on a loaded SD2 model.

    Args:
        model: from :func:`dsdkit.load_model`.
        config: how to score; defaults to the ``discffusion`` preset.
        batch_size: UNet batch (pairs x timesteps packed together). Scores do not depend on it.
        adapter: a trained (or fresh) adapter from :mod:`dsdkit.adapters`; ``None`` scores zero-shot.
        progress: called as ``progress(n)`` after each UNet batch with the n sample-evaluations it ran; see
            :meth:`planned_evaluations` for the total of a job.
        acceleration: ``torch.compile`` and channels-last (:class:`~dsdkit.acceleration.Acceleration`); scores
            agree with the eager scorer's within the export's parity tolerances. Compiled scorers pad a short last
            batch to ``batch_size`` (one static shape per batch size).
    """

    def __init__(
        self,
        model: SD2Model,
        config: ScoringConfig | None = None,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        adapter=None,
        acceleration: Acceleration | None = None,
    ):
        self.model = model
        self.acceleration = acceleration or Acceleration()
        self.adapter = adapter
        self.config = config or ScoringConfig()
        self.batch_size = int(batch_size or 8)
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        self.progress = progress
        cfg = self.config
        needs_empty_score = cfg.normalize is Normalization.uncond or cfg.uncond_in_attention
        if needs_empty_score and cfg.tokens is TokenSet.words:
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
        self.timesteps = timesteps_for(cfg)
        self.layer_names = select_layers(model.unet, cfg.layers)
        device = model.device
        latent_shape = (model.latent_channels, latent_size, latent_size)
        self.noise = noise_bank(cfg.noise_seed, len(self.timesteps), latent_shape).to(device)
        signal, noise = model.schedule.coefficients(self.timesteps)
        self._signal = torch.tensor(signal, dtype=torch.float32, device=device)
        self._noise_scale = torch.tensor(noise, dtype=torch.float32, device=device)
        self._timestep_tensor = torch.tensor(self.timesteps, dtype=torch.int64, device=device)
        self._images: dict[str, ImageEncoding] = {}
        self._texts: dict[str, TextEncoding] = {}
        # Per image key: the empty caption's layer scores [K, L] and ‖ε_k − ε̂(x_t, ∅)‖₂ [K] (depend on the adapter).
        self._uncond: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._empty: TextEncoding | None = None
        self._recorder = Recorder(self.layer_names, cfg)
        self._evaluations = 0
        if self.acceleration.uses_channels_last:
            set_channels_last(model, True)
        mode = self.acceleration.mode_for(device.type)
        self._compiled = None if mode is None else compiled_forward(model, self.layer_names, cfg, adapter, mode)

    def noising(self, steps: torch.Tensor):
        """``(sqrt(ā_t), sqrt(1 - ā_t), t)`` for timestep indices ``steps`` (positions in :attr:`timesteps`)."""
        steps = steps.to(self.model.device)
        return self._signal[steps], self._noise_scale[steps], self._timestep_tensor[steps]

    def with_adapter(self, adapter) -> Scorer:
        """A scorer for another adapter (or its new weights) that reuses this one's image and caption encodings."""
        other = Scorer(self.model, self.config, self.batch_size, self.progress, adapter, self.acceleration)
        other._images, other._texts, other._empty = self._images, self._texts, self._empty
        return other

    # -- per-image and per-caption work (cached) -----------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> list[ImageEncoding]:
        """VAE latents (posterior mean x scaling factor) of ``images``, cached by pixel content.

        Identical pixels (the same file twice, or two copies of one image) share one cached encoding.
        """
        keys, todo = [], {}
        for index, image in enumerate(images):
            array = preprocess_image(image, self.resolution, self.config.resize, index=index)
            key = hashlib.sha1(array.tobytes()).hexdigest()
            keys.append(key)
            if key not in self._images:
                todo[key] = array
        items = list(todo.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch = torch.from_numpy(np.stack([a for _, a in chunk])).to(self.model.device, torch.float32)
            latents = self.model.vae.encode(batch).latent_dist.mean * self.model.scaling_factor
            for (key, _), latent in zip(chunk, latents, strict=True):
                self._images[key] = ImageEncoding(key=key, latent=latent.float())
        return [self._images[key] for key in keys]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], where: Sequence[str] | None = None) -> list[TextEncoding]:
        """Text states and token masks of ``texts``, cached by caption.

        Args:
            texts: captions.
            where: optional names for error messages (e.g. ``"captions.txt line 3"``), one per caption.
        """
        tokenizer = self.model.tokenizer
        todo: dict[str, TokenizedText] = {}
        keys = []
        for index, text in enumerate(texts):
            name = where[index] if where is not None else f"caption #{index}"
            tokens = tokenizer.encode(text, where=name)
            key = text.strip() if isinstance(text, str) else text
            keys.append(key)
            if key not in self._texts and key not in todo:
                todo[key] = tokens
        self._encode_tokens(todo)
        return [self._texts[key] for key in keys]

    def _encode_tokens(self, todo: dict[str, TokenizedText]) -> None:
        items = list(todo.items())
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            ids = torch.from_numpy(np.stack([t.ids for _, t in chunk])).to(self.model.device)
            states = self.model.text_encoder(input_ids=ids).last_hidden_state.float()
            for (key, tokens), state in zip(chunk, states, strict=True):
                roles = torch.from_numpy(tokens.roles.astype(np.int64))
                mask = token_mask(roles, self.config.tokens).to(self.model.device)
                self._texts[key] = TextEncoding(text=key, tokens=tokens, states=state, mask=mask)

    @property
    def empty_caption(self) -> TextEncoding:
        """The unconditional prompt's encoding (BOS, EOS, padding)."""
        if self._empty is None:
            tokens = self.model.tokenizer.encode_empty()
            with torch.inference_mode():
                self._encode_tokens({"": tokens})
            self._empty = self._texts.pop("")
        return self._empty

    # -- scoring -----------------------------------------------------------------------------------------------

    def planned_evaluations(self, num_images: int, num_pairs: int) -> int:
        """UNet sample-evaluations needed for ``num_pairs`` pairs over ``num_images`` new images (nothing cached)."""
        per_image = len(self.timesteps) if self.config.needs_unconditional_pass else 0
        return num_images * per_image + num_pairs * len(self.timesteps)

    def score(self, images: Sequence[ImageInput], texts: Sequence[str]) -> np.ndarray:
        """``float64[N, M]`` scores of every image against every caption."""
        return self.score_matrix(images, texts).scores

    def score_matrix(self, images: Sequence[ImageInput], texts: Sequence[str]) -> ScoreOutput:
        """Every image against every caption, with the per-layer and denoising terms."""
        image_encodings = self.encode_images(images)
        text_encodings = self.encode_texts(texts)
        return self.score_encoded_matrix(image_encodings, text_encodings)

    def score_encoded_matrix(self, image_encodings, text_encodings) -> ScoreOutput:
        n, m = len(image_encodings), len(text_encodings)
        if n == 0 or m == 0:
            raise InputError("nothing to score: give at least one image and one caption")
        # Score unique images and captions once, then expand to the requested matrix.
        unique_images = list({e.key: e for e in image_encodings}.values())
        unique_texts = list({e.text: e for e in text_encodings}.values())
        image_slot = {e.key: i for i, e in enumerate(unique_images)}
        text_slot = {e.text: j for j, e in enumerate(unique_texts)}
        pairs = [(i, j) for i in range(len(unique_images)) for j in range(len(unique_texts))]
        result = self.score_encoded_pairs(unique_images, unique_texts, pairs)
        rows = np.array([image_slot[e.key] for e in image_encodings])
        cols = np.array([text_slot[e.text] for e in text_encodings])
        u_m = len(unique_texts)
        flat = rows[:, None] * u_m + cols[None, :]
        return ScoreOutput(
            scores=result.scores[flat],
            layer_scores=result.layer_scores[flat],
            denoise=None if result.denoise is None else result.denoise[flat],
            layer_names=result.layer_names,
            timesteps=result.timesteps,
            truncated=[e.tokens.truncated for e in text_encodings],
            unet_evaluations=result.unet_evaluations,
        )

    def score_pairs(self, images: Sequence[ImageInput], texts: Sequence[str], pairs: Sequence[tuple[int, int]]):
        """Scores of the given ``(image index, caption index)`` pairs only (e.g. a query and its candidates)."""
        return self.score_encoded_pairs(self.encode_images(images), self.encode_texts(texts), pairs)

    @torch.inference_mode()
    def score_encoded_pairs(
        self, image_encodings: Sequence[ImageEncoding], text_encodings: Sequence[TextEncoding], pairs
    ) -> ScoreOutput:
        """Core computation on already-encoded inputs. ``pairs`` index into the two lists."""
        cfg = self.config
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        start_evaluations = self._evaluations
        if cfg.needs_unconditional_pass:
            self._ensure_unconditional([image_encodings[i] for i in sorted(set(pairs[:, 0].tolist()))])
        layers, errors = self._conditional_terms(image_encodings, text_encodings, pairs)  # [P,K,L], [P,K]

        # Terms are combined in float64 so the score is exactly the mean of the reported per-layer terms.
        image_keys = [image_encodings[i].key for i in pairs[:, 0]]
        uncond_layers = uncond_errors = None
        if cfg.needs_unconditional_pass:
            uncond_layers = torch.stack([self._uncond[key][0] for key in image_keys]).double()  # [P, K, L]
            uncond_errors = torch.stack([self._uncond[key][1] for key in image_keys]).double()  # [P, K]
        per_step, attention, denoise = combine_terms(
            cfg, layers.double(), errors.double(), uncond_layers, uncond_errors
        )
        scores = per_step.mean(dim=1)
        return ScoreOutput(
            scores=scores.cpu().numpy(),
            layer_scores=attention.mean(dim=1).cpu().numpy(),
            denoise=None if denoise is None else denoise.mean(dim=1).cpu().numpy(),
            layer_names=list(self.layer_names),
            timesteps=list(self.timesteps),
            truncated=[e.tokens.truncated for e in text_encodings],
            unet_evaluations=self._evaluations - start_evaluations,
        )

    # -- UNet passes -------------------------------------------------------------------------------------------

    def _conditional_terms(self, image_encodings, text_encodings, pairs: np.ndarray):
        """Per (pair, timestep): layer scores ``[P, K, L]`` and ``‖ε_k − ε̂(x_t, c)‖₂`` ``[P, K]``."""
        num_steps = len(self.timesteps)
        # Work items ordered (pair, timestep) so each pair's terms are contiguous; batches mix timesteps freely.
        pair_of = torch.arange(len(pairs)).repeat_interleave(num_steps)
        image_of = torch.from_numpy(pairs[:, 0])[pair_of]
        text_of = torch.from_numpy(pairs[:, 1])[pair_of]
        latents = torch.stack([e.latent for e in image_encodings])
        states = torch.stack([e.states for e in text_encodings])
        masks = torch.stack([e.mask for e in text_encodings])
        layers, errors = self._run_items(
            lambda sl: (latents[image_of[sl]], states[text_of[sl]], masks[text_of[sl]]), len(pairs)
        )
        return layers.view(len(pairs), num_steps, -1), errors.view(len(pairs), num_steps)

    def _ensure_unconditional(self, image_encodings: Sequence[ImageEncoding]) -> None:
        """Compute ε̂(x_t, ∅) errors and the empty caption's layer scores once per (image, timestep)."""
        todo = list({e.key: e for e in image_encodings if e.key not in self._uncond}.values())
        if not todo:
            return
        empty = self.empty_caption
        num_steps = len(self.timesteps)
        latents = torch.stack([e.latent for e in todo])
        image_of = torch.arange(len(todo)).repeat_interleave(num_steps)

        def batch(sl: slice):
            count = sl.stop - sl.start
            return latents[image_of[sl]], empty.states.expand(count, -1, -1), empty.mask.expand(count, -1)

        layers, errors = self._run_items(batch, len(todo))
        layers = layers.view(len(todo), num_steps, -1)
        errors = errors.view(len(todo), num_steps)
        for index, encoding in enumerate(todo):
            self._uncond[encoding.key] = (layers[index].clone(), errors[index].clone())

    def _run_items(self, batch: Callable[[slice], tuple], num_groups: int):
        """Run ``num_groups x K`` work items (group-major, timestep-minor) through the UNet in batches."""
        num_steps = len(self.timesteps)
        total = num_groups * num_steps
        step_of = torch.arange(num_steps).repeat(num_groups)
        layers = torch.empty(total, len(self.layer_names), device=self.model.device)
        errors = torch.empty(total, device=self.model.device)
        if self._compiled is not None:
            processors = self._compiled.installed()
        else:
            processors = scoring_processors(self.model.unet, self._recorder, self.adapter)
        with processors:
            for start in range(0, total, self.batch_size):
                sl = slice(start, min(start + self.batch_size, total))
                latents, states, masks = batch(sl)
                layers[sl], errors[sl] = self._unet_pass(latents, step_of[sl], states, masks)
                self._report(sl.stop - sl.start)
        return layers, errors

    def _unet_pass(self, latents, steps, states, masks):
        """One batched UNet evaluation at per-sample timesteps; returns layer scores [B, L] and ‖ε − ε̂‖₂ [B]."""
        count = latents.shape[0]
        if self._compiled is not None and count < self.batch_size:
            # One static shape per batch size: repeat the last item (its results are dropped below).
            fill = self.batch_size - count
            steps = torch.cat([steps, steps[-1:].expand(fill)])
            latents, states, masks = (
                torch.cat([t, t[-1:].expand(fill, *t.shape[1:])]) for t in (latents, states, masks)
            )
        signal, noise_scale, timesteps = self.noising(steps)
        noise = self.noise[steps.to(self.model.device)]
        if self.acceleration.uses_channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        if self._compiled is not None:
            layers, errors = self._compiled(latents, signal, noise_scale, noise, timesteps, states, masks)
        else:
            layers, errors = unet_pass(
                self.model, self._recorder, latents, signal, noise_scale, noise, timesteps, states, masks, self.adapter
            )
        self._evaluations += count
        return layers[:count], errors[:count]

    def _report(self, advance: int) -> None:
        if self.progress is not None:
            self.progress(advance)


def unet_pass(
    model: SD2Model,
    recorder,
    latents,
    signal,
    noise_scale,
    noise,
    timesteps,
    states,
    masks,
    adapter=None,
    condition=None,
    autocast: bool = True,
):
    """The scoring forward on one batch, differentiable (the trainer calls it with gradients on, the exporter
    traces it).

    Args:
        model: the frozen SD2 model; its UNet must carry the processors of :func:`scoring_processors`.
        recorder: the :class:`~dsdkit.attention.Recorder` those processors report to.
        latents: ``z0`` ``float32[B, C, h, w]``.
        signal, noise_scale: ``sqrt(ā_t)`` and ``sqrt(1 - ā_t)`` per sample, ``float32[B]``.
        noise: ``ε`` ``float32[B, C, h, w]``.
        timesteps: ``int64[B]``.
        states, masks: text states ``[B, T, D]`` and kept-token masks ``[B, T]``.
        adapter: optional adapter.
        condition: a conditioned adapter's per-sample condition; default: ``adapter.condition(latents)``.
        autocast: run fp16/bf16 models under autocast (off when exporting: the weights are already half).

    Returns:
        ``(layer_scores float32[B, L], ‖ε − ε̂(x_t, c)‖₂ float32[B])``.
    """
    signal, noise_scale = signal.view(-1, 1, 1, 1), noise_scale.view(-1, 1, 1, 1)
    noisy = signal * latents + noise_scale * noise
    recorder.reset(masks)
    if adapter is not None and adapter.conditioned:
        adapter.set_condition(adapter.condition(latents) if condition is None else condition)
    dtype = model.precision.torch_dtype
    # fp16/bf16: weights are stored in that precision and autocast runs the remaining fp32 ops (an adapter's fp32
    # factors, say) in it too; the scoring processors switch autocast off for their fp32 logits and pooling.
    enabled = autocast and dtype != torch.float32
    with torch.autocast(device_type=model.device.type, dtype=dtype, enabled=enabled):
        output = model.unet(noisy.to(dtype), timesteps, encoder_hidden_states=states.to(dtype)).sample.float()
    if model.prediction_type == "v_prediction":
        output = signal * output + noise_scale * noisy  # ε = sqrt(ā) v + sqrt(1 - ā) x_t
    error = (noise - output).flatten(1).norm(dim=1)
    return recorder.layer_scores(), error


def combine_terms(config: ScoringConfig, layers, errors, uncond_layers=None, uncond_errors=None):
    """:func:`dsdkit.runtime.scoring.combine_terms` with the switches taken from ``config``."""
    return combine(
        layers,
        errors,
        uncond_layers,
        uncond_errors,
        uncond_in_attention=config.uncond_in_attention,
        normalize_uncond=config.normalize is Normalization.uncond,
        denoise_term=config.denoise_term,
    )


def build_scorer(
    model=None,
    adapters=None,
    preset: str | None = None,
    overrides: dict | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    compile: str | None = None,
) -> Scorer:
    """A scorer from command-line style options: the model (or a loaded one), an optional adapter file, the
    scoring config (the adapter's own when no preset is given, else the preset), with knob ``overrides``, and an
    optional ``torch.compile`` mode (:class:`~dsdkit.acceleration.Acceleration`)."""
    from .adapters import check_scoring_matches, load_adapter
    from .models import load_model

    acceleration = Acceleration(compile=compile)  # a bad mode is refused before the model loads
    sd2 = model if isinstance(model, SD2Model) else load_model(model, device=device, dtype=dtype)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    adapter = None
    if adapters is not None:
        adapter, trained = load_adapter(adapters, sd2)
        base = trained if preset is None else ScoringConfig.from_preset(preset)
        config = base.replace(**overrides) if overrides else base
        check_scoring_matches(adapters, trained, config)
    else:
        config = ScoringConfig.from_preset(preset or "discffusion", **overrides)
    return Scorer(sd2, config, batch_size=batch_size, adapter=adapter, acceleration=acceleration)
