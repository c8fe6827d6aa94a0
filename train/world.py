"""Training the demo world model: a small text-to-image model of SD2's architecture, trained on :mod:`dsdkit.world`.

The recipe (:class:`WorldRecipe`, plain data written beside every checkpoint and into the final folder):

1. **VAE** (AutoencoderKL, SD2's block types, 8x down): L1 + MSE reconstruction of random crops plus a tiny KL
   term; then the scaling factor is set to 1 / std of the posterior means, so latents have unit variance as SD's
   0.18215 gives for real photographs.
2. Optionally (``text_pretrain_steps > 0``) **a contrastive text tower**, SD2's recipe in miniature: the text
   encoder (SD2's architecture) and a small convolutional image tower trained CLIP-style on the world's
   (image, caption) pairs (symmetric InfoNCE; captions that describe the same scene, paraphrases included, are
   all positives), so the text encoder is contrastively pretrained before the UNet ever sees it, as SD2's frozen
   OpenCLIP encoder is. With ``freeze_text_encoder`` it stays frozen for phase 3.
3. **UNet** (and the text encoder, unless frozen) from scratch: ε-prediction MSE on SD2's scaled-linear 1000-step
   schedule, t uniform, a fraction of captions replaced by the empty caption (so the unconditional pass means
   something), AdamW with linear warm-up and cosine decay, gradient clipping. Latents are the VAE's posterior
   means, encoded once, exactly as the scorer encodes images.

Every step's randomness (its batch, timesteps, noise and caption dropout) is a pure function of (seed, phase, step),
so a run killed at any point and resumed from its latest checkpoint (weights and optimizer moments, atomically
written) ends with bit-identical weights. The thread count is pinned: spinning OpenMP threads beside another
process make CPU training 10-100x slower.

The result is a plain diffusers SD2 folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) that :func:`dsdkit.pytorch.models.load_model` loads like real weights, with ``world_model.json``
beside it (the recipe, the training log and the measured metrics).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import world
from ..jobs.datasets import items_to_examples
from ..pytorch.models import write_model_declaration
from ..pytorch.noise import DiffusionProcess
from ..runtime.config import ScoringConfig
from ..runtime.errors import ConfigError, ModelError
from ..runtime.files import atomic_write_bytes, atomic_write_text, staged_folder
from ..runtime.records import record_from_dict, record_from_file
from ..runtime.threads import configure_threads
from ..runtime.tokenizer import CONTEXTS, ClipTokenizer, context_keep_mask
from .runs import PhaseProgress, RunFolder, begin_run, cosine_lr, resumed_ema, step_random

__all__ = ["WorldRecipe", "RECIPE_FILE", "train_world_model", "build_modules", "pin_threads"]

logger = logging.getLogger(__name__)

#: Written into the model folder: the recipe, the training log and the measured metrics.
RECIPE_FILE = "world_model.json"
#: Written into the run folder at the end of the contrastive phase: both towers (the checkpoints that hold them are
#: dropped once the diffusion phase checkpoints).
CONTRASTIVE_FILE = "contrastive.safetensors"
# A phase's index seeds its steps' randomness (so it never changes); checkpoints sort in the order phases run.
_PHASES = ("vae", "diffusion", "text")
_PHASE_ORDER = ("vae", "text", "diffusion")


@dataclass
class WorldRecipe:
    """Everything the demo model depends on (defaults: the shipped model's recipe)."""

    seed: int = 0
    scenes: int = world.TRAINING_SCENES
    resolution: int = world.RESOLUTION
    # VAE phase
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_channels: tuple[int, ...] = (32, 32, 32, 32)
    # UNet + text encoder phase
    steps: int = 3000
    batch_size: int = 64
    lr: float = 8e-4
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    unet_channels: tuple[int, ...] = (48, 48, 96, 96)
    unet_heads: tuple[int, ...] = (1, 1, 2, 2)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    norm_groups: int = 8
    # Contrastive text-tower phase (between the two; 0 steps: none, the shipped recipe)
    text_pretrain_steps: int = 0
    text_pretrain_batch_size: int = 256
    text_pretrain_lr: float = 1e-3
    text_pretrain_warmup_steps: int = 100
    image_tower_channels: tuple[int, ...] = (32, 64, 96, 128)
    contrastive_dim: int = 64
    freeze_text_encoder: bool = False  # in the diffusion phase
    # A pretrained CLIP's text tower as the text encoder (a CLIPModel folder, or "demo": the shipped mini-CLIP),
    # frozen in the diffusion phase: SD2's recipe (a frozen OpenCLIP text encoder) in miniature.
    text_tower: str | None = None
    # Which text positions the UNet's cross-attention may attend to ("all"; "words": BOS, EOS and padding masked;
    # "bos-words": EOS and padding masked, BOS kept as a caption-independent anchor). A property of the model,
    # written into its folder (dsdkit_model.json) and honoured by scoring, export and explain.
    context_tokens: str = "all"
    # Per training sample, the chance that each word token is dropped from the context (at least one stays).
    word_dropout: float = 0.0
    # bookkeeping
    checkpoint_every: int = 500
    weights_dtype: str = "fp16"  # of the final folder; checkpoints are always fp32

    def __post_init__(self):
        for name in ("vae_channels", "unet_channels", "unet_heads", "image_tower_channels"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.steps < 1 or self.vae_steps < 1 or self.batch_size < 1 or self.vae_batch_size < 1:
            raise ConfigError("world recipe: steps and batch sizes must be >= 1")
        if self.scenes < self.batch_size:
            raise ConfigError(f"world recipe: {self.scenes} scenes cannot fill a batch of {self.batch_size}")
        if self.checkpoint_every < 1 or self.warmup_steps < 0:
            raise ConfigError("world recipe: checkpoint_every must be >= 1 and warmup_steps >= 0")
        if self.weights_dtype not in ("fp16", "fp32"):
            raise ConfigError(f"world recipe: weights_dtype must be fp16 or fp32, got {self.weights_dtype!r}")
        if self.resolution % 2 ** (len(self.vae_channels) - 1) or self.vae_crop > self.resolution:
            raise ConfigError("world recipe: resolution must be a multiple of the VAE's downsampling, crop <= it")
        if self.text_pretrain_steps < 0 or self.text_pretrain_batch_size < 2:
            raise ConfigError("world recipe: text_pretrain_steps must be >= 0 and text_pretrain_batch_size >= 2")
        if self.text_pretrain_steps and self.resolution % 2 ** len(self.image_tower_channels):
            raise ConfigError("world recipe: resolution must be a multiple of the image tower's downsampling")
        if self.context_tokens not in CONTEXTS:
            raise ConfigError(f"world recipe: context_tokens must be one of {', '.join(CONTEXTS)}")
        if not 0.0 <= self.word_dropout < 1.0 or (self.word_dropout and self.context_tokens == "all"):
            raise ConfigError("world recipe: word_dropout is in [0, 1) and needs a masked context_tokens")
        if self.text_tower is not None and self.text_pretrain_steps:
            raise ConfigError(
                "world recipe: text_tower (a pretrained CLIP) and text_pretrain_steps exclude each other"
            )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldRecipe:
        return record_from_dict(cls, data, "world recipe")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WorldRecipe:
        return record_from_file(cls, path)

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


# Fields that may differ between a run and its resumption.
_RESUMABLE = frozenset({"checkpoint_every"})


def pin_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (default: ``OMP_NUM_THREADS``, else the CPUs this process may use: affinity and
    cgroup quota) and one inter-op thread: :func:`dsdkit.runtime.threads.configure_threads`, after torch loads."""
    import torch  # noqa: F401 - loaded first, so that the count is set on torch itself, not only in the environment

    return configure_threads(threads)


def build_modules(recipe: WorldRecipe):
    """Fresh (seeded) VAE, UNet and text encoder of the recipe's SD2-architecture shapes."""
    import torch

    from ..pytorch.tiny import sd2_text_encoder, sd2_unet, sd2_vae

    torch.manual_seed(recipe.seed)
    vae = sd2_vae(
        block_out_channels=list(recipe.vae_channels),
        layers_per_block=1,
        norm_num_groups=recipe.norm_groups,
        sample_size=recipe.resolution,
        scaling_factor=1.0,
    )
    torch.manual_seed(recipe.seed + 1)
    unet = sd2_unet(
        sample_size=recipe.latent_size,
        block_out_channels=list(recipe.unet_channels),
        attention_head_dim=list(recipe.unet_heads),
        layers_per_block=1,
        norm_num_groups=recipe.norm_groups,
        cross_attention_dim=recipe.text_hidden,
    )
    torch.manual_seed(recipe.seed + 2)
    text_encoder = sd2_text_encoder(
        hidden_size=recipe.text_hidden,
        intermediate_size=2 * recipe.text_hidden,
        projection_dim=recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
    )
    return vae, unet, text_encoder


def build_contrastive_towers(recipe: WorldRecipe):
    """The contrastive phase's other parts (seeded): a convolutional image tower (stride-2 convolutions down to a
    small grid, flattened, so that where things are survives into the embedding: a global pool would erase left
    and right), a projection of the text encoder's pooled output, and CLIP's learnable temperature."""
    import torch
    from torch import nn

    torch.manual_seed(recipe.seed + 3)
    layers: list[nn.Module] = []
    width = 3
    for channels in recipe.image_tower_channels:
        layers += [nn.Conv2d(width, channels, 3, stride=2, padding=1), nn.GroupNorm(8, channels), nn.SiLU()]
        width = channels
    grid = recipe.resolution // 2 ** len(recipe.image_tower_channels)
    layers += [nn.Flatten(), nn.Linear(width * grid * grid, recipe.contrastive_dim)]
    towers = nn.Module()
    towers.image = nn.Sequential(*layers)
    towers.text_projection = nn.Linear(recipe.text_hidden, recipe.contrastive_dim, bias=False)
    towers.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return towers


def contrastive_logits(towers, text_encoder, images, ids):
    """``[B_images, B_texts]`` temperature-scaled cosine similarities of the two towers' embeddings."""
    import torch

    image = torch.nn.functional.normalize(towers.image(images), dim=-1)
    pooled = text_encoder(input_ids=ids).pooler_output  # the EOS token's state, as CLIP pools
    text = torch.nn.functional.normalize(towers.text_projection(pooled), dim=-1)
    return towers.logit_scale.clamp(max=math.log(100)).exp() * image @ text.T


def _step_generator(seed: int, phase: str, step: int):
    """The numpy rng and torch generator of one step of ``phase`` (each phase's index seeds its steps)."""
    return step_random(seed, _PHASES.index(phase), step)


def _lr_at(recipe: WorldRecipe, step: int, phase: str = "diffusion") -> float:
    """Linear warm-up, then cosine decay to ``final_lr_fraction`` of the peak at the phase's last step."""
    if phase == "text":
        peak, total, warmup = recipe.text_pretrain_lr, recipe.text_pretrain_steps, recipe.text_pretrain_warmup_steps
    else:
        peak, total, warmup = recipe.lr, recipe.steps, recipe.warmup_steps
    return cosine_lr(peak, total, warmup, recipe.final_lr_fraction, step)


class _Run(RunFolder):
    """The world model's run folder: every checkpoint records the VAE's scaling factor with the weights."""

    def __init__(self, folder: Path):
        super().__init__(folder, _PHASE_ORDER)

    def save(self, phase: str, step: int, modules: dict, optimizer, log: list[dict]) -> Path:
        return super().save(
            phase, step, modules, optimizer, log, scaling_factor=float(modules["vae"].config.scaling_factor)
        )

    def load(self, path: Path, modules: dict, optimizer=None) -> tuple[int, list[dict]]:
        state = super().load(path, modules, optimizer)
        modules["vae"].register_to_config(scaling_factor=state["scaling_factor"])
        return int(state["step"]), list(state["log"])


@dataclass
class _Training:
    """One run's fixed parts: the recipe, its folder, the rendered data and the modules being trained."""

    recipe: WorldRecipe
    run: _Run
    data: _Data
    vae: Any
    unet: Any
    text_encoder: Any
    on_step: Callable[[str, int, int, float], None] | None = None

    def progress(self, phase: str, total: int, log: list[dict], save, start: int, decay: float) -> PhaseProgress:
        smoothed = resumed_ema(log, phase, start)
        return PhaseProgress(
            phase, total, self.recipe.checkpoint_every, log, save, self.on_step, decay=decay, smoothed=smoothed
        )


@dataclass
class _Data:
    pixels: np.ndarray  # uint8[N, H, W, 3]
    ids: np.ndarray  # int64[N, 77], each scene's training caption
    meanings: np.ndarray  # int64[N]: equal for scenes that every true caption of either describes


def _render_data(recipe: WorldRecipe, tokenizer) -> _Data:
    """The training scenes rendered, their captions tokenized, and which scenes mean the same."""
    pixels = np.empty((recipe.scenes, recipe.resolution, recipe.resolution, 3), dtype=np.uint8)
    ids = np.empty((recipe.scenes, 77), dtype=np.int64)
    meanings = np.empty(recipe.scenes, dtype=np.int64)
    cache: dict[str, np.ndarray] = {}
    meaning_ids: dict[frozenset, int] = {}
    for index, (scene, caption) in enumerate(world.training_scenes(recipe.seed, recipe.scenes, recipe.resolution)):
        pixels[index] = np.asarray(world.render(scene, recipe.resolution))
        if caption not in cache:
            cache[caption] = tokenizer.encode(caption).ids
        ids[index] = cache[caption]
        meanings[index] = meaning_ids.setdefault(scene.true_captions(), len(meaning_ids))
    return _Data(pixels, ids, meanings)


def _to_model_range(pixels) -> Any:
    """uint8 HWC -> float32 CHW in [-1, 1], the same arithmetic as ``runtime.images.preprocess_image``."""
    import torch

    array = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 127.5 - 1.0
    return array.permute(0, 3, 1, 2).contiguous()


def _train_vae(ctx: _Training, start: int) -> list[dict]:
    import torch

    recipe, vae, pixels, run = ctx.recipe, ctx.vae, ctx.data.pixels, ctx.run
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0, foreach=True)
    log: list[dict] = []
    if start > 0:
        _, log = run.load(run.latest()[2], {"vae": vae}, optimizer)
    vae.train()
    phase = ctx.progress(
        "vae", recipe.vae_steps, log, lambda done: run.save("vae", done, {"vae": vae}, optimizer, log), start, 0.98
    )
    for step in range(start, recipe.vae_steps):
        rng, generator = _step_generator(recipe.seed, "vae", step)
        index = rng.integers(0, len(pixels), recipe.vae_batch_size)
        crop = recipe.vae_crop
        tops = rng.integers(0, recipe.resolution - crop + 1, (recipe.vae_batch_size, 2))
        batch = np.stack([pixels[i, y : y + crop, x : x + crop] for i, (y, x) in zip(index, tops, strict=True)])
        images = _to_model_range(batch)
        posterior = vae.encode(images).latent_dist
        latent = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latent).sample
        loss = (reconstruction - images).abs().mean() + ((reconstruction - images) ** 2).mean()
        loss = loss + recipe.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        phase.end(step, loss)
    vae.eval()
    return log


def _train_text_tower(ctx: _Training, towers, start: int) -> list[dict]:
    """The contrastive phase: symmetric InfoNCE over a batch of scenes and their captions, every caption of the
    same meaning a positive (a one-object world has 15 captions, so a batch holds many duplicates: counting them
    as negatives would teach the towers to tell identical captions apart)."""
    import torch

    recipe, run, data, text_encoder = ctx.recipe, ctx.run, ctx.data, ctx.text_encoder
    parameters = list(text_encoder.parameters()) + list(towers.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=recipe.text_pretrain_lr, weight_decay=0.01, foreach=True)
    modules = {"vae": ctx.vae, "text_encoder": text_encoder, "contrastive": towers}
    latest = run.latest()
    if start > 0:
        _, log = run.load(latest[2], modules, optimizer)
    else:
        _, log = run.load(latest[2], {"vae": ctx.vae}, None)  # the log so far (and the final VAE, as the next phase)
    text_encoder.train()
    towers.train()
    total = recipe.text_pretrain_steps
    phase = ctx.progress("text", total, log, lambda done: run.save("text", done, modules, optimizer, log), start, 0.98)
    meanings = torch.from_numpy(data.meanings)
    ids_all = torch.from_numpy(data.ids)
    for step in range(start, total):
        rng, _ = _step_generator(recipe.seed, "text", step)
        index = torch.from_numpy(rng.integers(0, len(data.ids), recipe.text_pretrain_batch_size))
        images = _to_model_range(data.pixels[index.numpy()])
        logits = contrastive_logits(towers, text_encoder, images, ids_all[index])
        same = (meanings[index][:, None] == meanings[index][None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)  # symmetric: the same soft targets serve both directions
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
        )
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(recipe, step, "text")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
        optimizer.step()
        with torch.no_grad():  # in-batch retrieval: is the image's best caption one of its own meaning?
            hit = float(same[torch.arange(len(index)), logits.argmax(dim=1)].mean())
        phase.end(step, loss, {"lr": _lr_at(recipe, step, "text"), "batch_retrieval_top1": round(hit, 4)})
    text_encoder.eval()
    towers.eval()
    return log


def _save_contrastive(run: _Run, text_encoder, towers, recipe: WorldRecipe) -> None:
    """Both towers of the finished contrastive phase, for studying them apart from the diffusion model."""
    from safetensors.torch import save

    tensors = {f"text_encoder.{k}": v.contiguous() for k, v in text_encoder.state_dict().items()}
    tensors |= {f"contrastive.{k}": v.contiguous() for k, v in towers.state_dict().items()}
    atomic_write_bytes(run.folder / CONTRASTIVE_FILE, save(tensors, metadata={"recipe": json.dumps(recipe.to_dict())}))


@dataclass
class _Encoded:
    latents: Any  # float32[N, 4, h, w], scaled
    scaling_factor: float
    reconstruction_l1: float


def _encode_latents(vae, pixels, batch: int = 256, scale: float | None = None) -> _Encoded:
    """Posterior means of every training image; sets the VAE's scaling factor to 1 / their std (or keeps ``scale``:
    a model continued from its weights keeps the factor its UNet was trained with)."""
    import torch

    means = []
    l1_sum, l1_count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            images = _to_model_range(pixels[start : start + batch])
            mean = vae.encode(images).latent_dist.mean
            means.append(mean)
            if start < 1024:  # reconstruction quality on the first 1,024 images, at full resolution
                l1_sum += float((vae.decode(mean).sample - images).abs().mean()) * len(images)
                l1_count += len(images)
    latents = torch.cat(means)
    scale = round(1.0 / float(latents.std()), 6) if scale is None else scale
    vae.register_to_config(scaling_factor=scale)
    return _Encoded(latents * scale, scale, l1_sum / max(1, l1_count))


def _caption_table(ctx: _Training, empty_ids):
    """A frozen encoder maps each distinct caption to fixed states: the few hundred captions encoded once. Returns
    ``(states per distinct caption, each scene's row, the empty caption's row, context masks or None)``."""
    import torch

    ids_all, empty = torch.from_numpy(ctx.data.ids), torch.from_numpy(empty_ids)
    ctx.text_encoder.requires_grad_(False)
    distinct, caption_of = torch.unique(torch.cat([ids_all, empty[None, :]]), dim=0, return_inverse=True)
    with torch.no_grad():
        table = ctx.text_encoder(input_ids=distinct).last_hidden_state
    masks = _context_masks(ctx.recipe, distinct.numpy(), ctx.text_encoder.config.eos_token_id)
    return table, caption_of[:-1], caption_of[-1], masks


def _conditioning(ctx: _Training, frozen, index, drop, rng, empty_ids):
    """A batch's text states and cross-attention context mask (``None``: all positions)."""
    import torch

    if frozen is not None:
        table, scene_rows, empty_row, masks = frozen
        rows = torch.where(drop, empty_row, scene_rows[index])
        context, words = (None, None) if masks is None else (masks[0][rows], masks[1][rows])
        states = table[rows]
    else:
        empty = torch.from_numpy(empty_ids)
        batch_ids = torch.where(drop[:, None], empty[None, :], torch.from_numpy(ctx.data.ids)[index])
        states = ctx.text_encoder(input_ids=batch_ids).last_hidden_state
        masks = _context_masks(ctx.recipe, batch_ids.numpy(), ctx.text_encoder.config.eos_token_id)
        context, words = (None, None) if masks is None else masks
    if context is not None and ctx.recipe.word_dropout:
        context = _drop_words(context, words, ctx.recipe.word_dropout, rng)
    return states, context


def _train_diffusion(ctx: _Training, encoded: _Encoded, empty_ids, start: int, log: list[dict]) -> list[dict]:
    import torch

    from ..pytorch.tiny import SCHEDULER_CONFIG

    recipe, run, unet, text_encoder = ctx.recipe, ctx.run, ctx.unet, ctx.text_encoder
    frozen = recipe.freeze_text_encoder or recipe.text_tower is not None
    parameters = list(unet.parameters()) + ([] if frozen else list(text_encoder.parameters()))
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay, foreach=True)
    modules = {"vae": ctx.vae, "unet": unet, "text_encoder": text_encoder}
    if start > 0:
        _, log = run.load(run.latest()[2], modules, optimizer)
    unet.train()
    text_encoder.train(not frozen)
    abar = torch.tensor(DiffusionProcess.from_scheduler_config(SCHEDULER_CONFIG).alphas_cumprod, dtype=torch.float32)
    table = _caption_table(ctx, empty_ids) if frozen else None
    save = lambda done: run.save("diffusion", done, modules, optimizer, log)  # noqa: E731 - one line
    phase = ctx.progress("diffusion", recipe.steps, log, save, start, 0.99)
    for step in range(start, recipe.steps):
        rng, generator = _step_generator(recipe.seed, "diffusion", step)
        index = torch.from_numpy(rng.integers(0, len(ctx.data.ids), recipe.batch_size))
        drop = torch.from_numpy(rng.random(recipe.batch_size) < recipe.caption_dropout)
        latents = encoded.latents[index]
        timesteps = torch.randint(0, len(abar), (recipe.batch_size,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = abar[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(recipe, step)
        states, context = _conditioning(ctx, table, index, drop, rng, empty_ids)
        prediction = unet(noisy, timesteps, encoder_hidden_states=states, encoder_attention_mask=context).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
        optimizer.step()
        phase.end(step, loss, {"lr": _lr_at(recipe, step)})
    unet.eval()
    text_encoder.eval()
    return log


def _context_masks(recipe: WorldRecipe, ids: np.ndarray, eos_id: int):
    """``(keep float32[N, T], words bool[N, T])`` of tokenized captions under the recipe's ``context_tokens``
    (``None`` for ``all``): what the UNet's cross-attention may attend to, by position."""
    import torch

    from ..runtime.tokenizer import ROLE_WORD, roles_from_ids

    if recipe.context_tokens == "all":
        return None
    roles = roles_from_ids(ids, eos_id)
    keep = torch.from_numpy(context_keep_mask(roles, recipe.context_tokens))
    return keep, torch.from_numpy(roles == ROLE_WORD)


def _drop_words(keep, words, rate: float, rng: np.random.Generator):
    """Drop each word token from the context with probability ``rate`` (drawn from the step's rng); a caption
    keeps at least one of its words (a random one), so its context never falls back to the whole caption."""
    import torch

    dropped = torch.from_numpy(rng.random(tuple(words.shape)) < rate) & words
    emptied = (words & ~dropped).sum(dim=1) == 0
    rescue = torch.from_numpy(rng.random(tuple(words.shape))).masked_fill(~words, -1.0).argmax(dim=1)
    rows = torch.nonzero(emptied & words.any(dim=1)).flatten()
    dropped[rows, rescue[rows]] = False
    return keep.masked_fill(dropped, 0.0)


#: The model card written into every world model (its front matter is what `dsdkit export` records as licence).
MODEL_CARD = """---
license: mit
library_name: diffusers
tags: [dsdkit, stable-diffusion-2-architecture, synthetic-data]
---
# dsdkit demo world model

A small text-to-image model with Stable Diffusion 2's architecture (SD2 block types, a CLIP text encoder, an
AutoencoderKL), trained from scratch by `dsdkit world train` on the synthetic world of `dsdkit.world`: one or two
flat-coloured circles, squares and triangles on a light background, with captions such as "a red circle left of a
blue square". `world_model.json` holds the recipe, the training log and measured accuracy.

It exists so that dsdkit's matcher can be tried offline with scores that mean something, and so that the method
can be measured on a world whose truth is known. It says nothing about accuracy on real images, and it cannot draw
anything outside its world. Weights: MIT, like dsdkit; trained on generated data only.
"""


def _write_model(folder: Path, recipe: WorldRecipe, vae, unet, text_encoder, info: dict) -> None:
    """The final diffusers SD2 folder (weights in the recipe's dtype), written into place atomically."""

    import torch
    from diffusers.utils import logging as diffusers_logging

    from ..pytorch.tiny import write_pipeline_folder

    # Saving prints a progress bar per shard and a hint about fp32 modules (there are none in these models).
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    dtype = torch.float16 if recipe.weights_dtype == "fp16" else torch.float32
    with staged_folder(folder) as staging:
        write_pipeline_folder(staging, *(copy.deepcopy(module).to(dtype) for module in (unet, vae, text_encoder)))
        (staging / RECIPE_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(MODEL_CARD, encoding="utf-8")
        if recipe.context_tokens != "all":
            write_model_declaration(staging, context_tokens=recipe.context_tokens)


def load_text_tower(source: str | os.PathLike, text_encoder) -> dict:
    """Copy a CLIP folder's text tower into ``text_encoder`` (which must be its architecture); returns the record
    written into the model (which CLIP, the sha256 of its weights file)."""
    from safetensors.torch import load_file

    from ..pytorch.clip import resolve_clip_folder
    from ..runtime.bundle import sha256_file

    folder = resolve_clip_folder(source)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{folder}: no model.safetensors; pass a CLIPModel folder written by `dsdkit world clip`")
    # CLIPModel keeps the text tower under "text_model."; CLIPTextModel (transformers 5) saves it without a prefix.
    tower = {
        k.removeprefix("text_model."): v for k, v in load_file(str(weights)).items() if k.startswith("text_model.")
    }
    try:
        text_encoder.load_state_dict(tower)
    except RuntimeError:
        raise ConfigError(
            f"text_tower {source}: its text tower is not the architecture this recipe builds; set text_hidden, "
            "text_layers and text_heads to the CLIP's"
        ) from None
    text_encoder.requires_grad_(False)
    return {"clip": str(source), "weights_sha256": sha256_file(weights)}


#: Beside a run continued from a trained model: which model, so a resumed run and the final model say so.
INIT_FILE = "init.json"


def _initialise_from(source, run: _Run, recipe: WorldRecipe, vae, unet, text_encoder) -> dict:
    """Load a trained world model's VAE, UNet and text encoder into this run's modules (the recipe must describe
    the same architecture) and write them as the run's VAE checkpoint, so the diffusion phase starts from them and a
    killed run resumes as any other."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..pytorch.models import resolve_model_folder

    if recipe.text_pretrain_steps:
        raise ConfigError("`init_from` continues the diffusion phase of a trained model: set text_pretrain_steps 0")
    folder = resolve_model_folder(source)
    try:
        loaded = {
            "vae": AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32),
            "unet": UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32),
        }
    except (OSError, ValueError) as exc:
        raise ModelError(f"`init_from` {source}: not a world-model folder ({str(exc).splitlines()[0]})") from None
    modules = {"vae": vae, "unet": unet, "text_encoder": text_encoder}
    for name, module in modules.items():
        try:
            module.load_state_dict(loaded[name].state_dict())
        except RuntimeError:
            raise ConfigError(
                f"`init_from` {source}: its {name} is not the architecture this recipe builds; pass the recipe it "
                "was trained with (its world_model.json) and change only the training fields"
            ) from None
    scale = float(loaded["vae"].config.scaling_factor)
    vae.register_to_config(scaling_factor=scale)
    record = {"model": str(source), "folder_name": folder.name, "scaling_factor": scale}
    info_file = folder / RECIPE_FILE
    if info_file.is_file():
        record["its_recipe"] = json.loads(info_file.read_text(encoding="utf-8")).get("recipe")
    atomic_write_text(run.folder / INIT_FILE, json.dumps(record, indent=1) + "\n")
    # No optimizer state to keep: the diffusion phase starts its own, as a fresh run's does.
    run.save("vae", recipe.vae_steps, modules, torch.optim.AdamW(vae.parameters()), [])
    return record


def train_world_model(
    output: str | os.PathLike,
    recipe: WorldRecipe | None = None,
    resume: bool = False,
    threads: int | None = None,
    evaluate: Callable[[Path], dict] | None = None,
    on_step: Callable[[str, int, int, float], None] | None = None,
    init_from: str | os.PathLike | None = None,
) -> Path:
    """Train the demo world model into ``output/`` (the run folder); returns the model folder ``output/model``.

    Args:
        output: run folder: ``recipe.json``, ``checkpoints/``, ``latest.json``; the final model in ``model/``.
        recipe: the recipe (default: the shipped model's). On ``resume`` it must equal the run's own.
        resume: continue from the run's latest checkpoint (bit-identical to an uninterrupted run).
        threads: torch threads (default: the CPUs this process may use).
        evaluate: called with the written model folder; its metrics go into ``world_model.json``.
        on_step: progress callback ``(phase, step, total, smoothed_loss)``.
        init_from: continue a trained world model (a folder or ``"demo"``): its VAE (and its scaling factor), UNet
            and text encoder are the start, the VAE phase is skipped, and the recipe's ``steps`` are further
            diffusion steps with a fresh optimizer and the recipe's schedule. Recorded in ``init.json`` and the
            model's ``world_model.json``; a resumed run takes it from there.
    """
    from ..pytorch.tiny import write_clip_tokenizer

    recipe = recipe or WorldRecipe()
    folder = Path(output)
    run = _Run(folder)
    used_threads = pin_threads(threads)  # first: a bad --threads must not leave a recipe.json behind
    begin_run(folder, recipe, resume, _RESUMABLE, "world-model")
    latest = run.latest() if resume else None
    started = time.perf_counter()
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file():
        write_clip_tokenizer(tokenizer_dir)
    tokenizer = ClipTokenizer.from_folder(tokenizer_dir)
    ctx = _Training(recipe, run, _render_data(recipe, tokenizer), *build_modules(recipe), on_step=on_step)
    text_tower = None if recipe.text_tower is None else load_text_tower(recipe.text_tower, ctx.text_encoder)
    initialised = None
    if init_from is not None and latest is None:
        initialised = _initialise_from(init_from, run, recipe, ctx.vae, ctx.unet, ctx.text_encoder)
    elif (folder / INIT_FILE).is_file():
        initialised = json.loads((folder / INIT_FILE).read_text(encoding="utf-8"))
    empty_ids = tokenizer.encode_empty().ids.astype(np.int64)
    encoded, log = _run_phases(ctx, initialised, empty_ids)
    training = {
        "threads": used_threads,
        "wall_s_this_session": round(time.perf_counter() - started, 1),
        "resumed_from": None if latest is None else f"{latest[0]}-{latest[1]}",
        "initialised_from": initialised,
        "text_tower": text_tower,
        "vae_reconstruction_l1": round(encoded.reconstruction_l1, 5),
        "scaling_factor": encoded.scaling_factor,
        "log": log,
    }
    return _finish_model(ctx, folder / "model", training, evaluate)


def _run_phases(ctx: _Training, initialised: dict | None, empty_ids) -> tuple[_Encoded, list[dict]]:
    """The VAE, the optional contrastive text tower and the diffusion phase, each from where the run stands."""
    recipe, run, folder = ctx.recipe, ctx.run, ctx.run.folder
    progress = run.latest()
    # Phase 1, the VAE (skipped when the run already reached a later phase).
    vae_start = 0 if progress is None else (progress[1] if progress[0] == "vae" else recipe.vae_steps)
    if vae_start < recipe.vae_steps:
        _train_vae(ctx, vae_start)
    # Phase 2 (optional), the contrastive text tower.
    if recipe.text_pretrain_steps:
        now = run.latest()
        text_start = {"vae": 0, "text": now[1]}.get(now[0], recipe.text_pretrain_steps)
        # Also when a run was killed between the phase's last checkpoint and writing the towers' file.
        unwritten = now[0] == "text" and not (folder / CONTRASTIVE_FILE).is_file()
        if text_start < recipe.text_pretrain_steps or unwritten:
            towers = build_contrastive_towers(recipe)
            _train_text_tower(ctx, towers, text_start)
            _save_contrastive(run, ctx.text_encoder, towers, recipe)
    # Phase 3. The VAE (and a pretrained text encoder) are final from here on; fresh and resumed runs both take
    # their weights from the latest checkpoint, so they encode bit-identical latents and captions.
    now = run.latest()
    diffusion_start = now[1] if now[0] == "diffusion" else 0
    if initialised is not None and diffusion_start == 0:
        start_modules = {"vae": ctx.vae, "unet": ctx.unet, "text_encoder": ctx.text_encoder}  # the continued model's
    else:
        start_modules = {"vae": ctx.vae, "text_encoder": ctx.text_encoder} if now[0] == "text" else {"vae": ctx.vae}
    _, log = run.load(now[2], start_modules, None)
    ctx.vae.eval()
    scale = None if initialised is None else initialised["scaling_factor"]
    encoded = _encode_latents(ctx.vae, ctx.data.pixels, scale=scale)
    return encoded, _train_diffusion(ctx, encoded, empty_ids, diffusion_start, log)


def _finish_model(ctx: _Training, model_folder: Path, training: dict, evaluate) -> Path:
    """Write the model folder with its record (recipe, training log, metrics of ``evaluate``)."""
    import torch

    modules = (("unet", ctx.unet), ("text_encoder", ctx.text_encoder), ("vae", ctx.vae))
    training["torch"] = torch.__version__
    training["parameters"] = {name: sum(p.numel() for p in module.parameters()) for name, module in modules}
    info = {
        "about": "The dsdkit demo world model: an SD2-architecture text-to-image model trained from scratch by "
        "`dsdkit world train` on the synthetic world of dsdkit.world (coloured shapes). It says nothing about "
        "real images.",
        "recipe": ctx.recipe.to_dict(),
        "training": training,
    }
    _write_model(model_folder, ctx.recipe, ctx.vae, ctx.unet, ctx.text_encoder, info)
    if evaluate is not None:
        info["metrics"] = evaluate(model_folder)
        atomic_write_text(model_folder / RECIPE_FILE, json.dumps(info, indent=1) + "\n")
    logger.info("wrote the world model to %s", model_folder)
    return model_folder


#: The subsets :func:`measure_world_model` reports after training (two candidates each).
QUICK_SUBSETS = ("colour", "shape", "binding", "relation", "order")


def measure_world_model(
    model_folder: str | os.PathLike,
    per_subset: int = 100,
    num_timesteps: int = 10,
    subsets: tuple[str, ...] = QUICK_SUBSETS,
    batch_size: int = 64,
    attention_term: bool = True,
) -> dict:
    """Zero-shot accuracy of the ``discffusion`` score (S = ``num_timesteps``; both terms, or the denoising term
    alone with ``attention_term=False``, whatever the model declares) on the first ``per_subset`` benchmark items of
    each of ``subsets`` (the items ``dsdkit demo-data`` writes, whose layouts the model's training data does not
    contain): the quick check written into ``world_model.json``. Ties count as wrong."""
    from ..jobs.evaluation import compute_metrics, score_examples
    from ..pytorch.models import load_model
    from ..pytorch.scorer import Scorer

    model = load_model(model_folder, device="cpu", dtype="fp32")
    # Keep the items out of the training data this model was trained on (its recipe, if it says).
    recipe_file = Path(model.folder) / RECIPE_FILE
    recipe = json.loads(recipe_file.read_text(encoding="utf-8"))["recipe"] if recipe_file.is_file() else {}
    seed, count = recipe.get("seed", world.TRAINING_SEED), recipe.get("scenes", world.TRAINING_SCENES)
    scorer = Scorer(
        model,
        ScoringConfig.from_preset("discffusion", num_timesteps=num_timesteps, attention_term=attention_term),
        batch_size=batch_size,
    )
    started = time.perf_counter()
    items = world.benchmark_items(per_subset=per_subset, subsets=subsets, training_seed=seed, training_count=count)
    examples = items_to_examples(items, model.resolution)
    metrics = compute_metrics("jsonl", examples, score_examples(scorer, examples))
    return {
        "zero_shot_accuracy": {subset: metrics[f"top1/{subset}"] for subset in subsets},
        "items_per_subset": per_subset,
        "num_timesteps": num_timesteps,
        "score": f"discffusion ({'attention + denoising term' if attention_term else 'denoising term alone'})",
        "eval_s": round(time.perf_counter() - started, 1),
    }
