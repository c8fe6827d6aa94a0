"""The demo world's mini-CLIP: a Hugging Face ``CLIPModel`` trained contrastively on the world's training scenes.

SD2 conditions its UNet on a frozen, contrastively pretrained OpenCLIP text encoder. The demo model does the same in
miniature: this module trains a ``CLIPModel`` whose **text tower is the demo diffusion model's text-encoder
architecture** (SD2's CLIP text transformer shrunk: hidden 64, 2 layers, 2 heads, CLIP's 49,408-token vocabulary,
77 positions) and whose **vision tower is a small** ``CLIPVisionModel`` (a ViT over 8-px patches of the 64-px world
images), then writes a folder that ``transformers.CLIPModel``, ``CLIPTokenizer`` and ``CLIPImageProcessor`` load
offline. The diffusion model is then trained with that text tower frozen (``WorldRecipe.text_tower``), and the same
model serves as the shortlist stage of gallery search (``--shortlist demo``).

The loss is the world's symmetric InfoNCE with soft targets: every caption of the same meaning is a positive (a
relation and its converse describe one scene; a one-object world has few captions, so a batch holds many
duplicates, and counting them as negatives would teach the towers to tell identical captions apart). Data: the
world's training scenes only (:func:`dsdkit.world.training_scenes`, which never contains a held-out colour-shape
combination), rendered at the world's resolution.

Every step's batch is a pure function of (seed, step), checkpoints hold the weights and AdamW's moments (written
atomically), so a run killed at any point and resumed ends with bit-identical weights at the same thread count.
"""

from __future__ import annotations

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
from ..pytorch.clip import projected as _features
from ..runtime.errors import ConfigError, ModelError
from ..runtime.files import atomic_write_text, staged_folder
from ..runtime.records import record_from_dict, record_from_file
from .runs import PhaseProgress, RunFolder, begin_run, cosine_lr, resumed_ema, step_random

__all__ = ["ClipRecipe", "CLIP_RECIPE_FILE", "build_clip", "train_world_clip", "clip_accuracy", "load_world_clip"]

logger = logging.getLogger(__name__)

#: Written into the CLIP folder: the recipe, the training log and the measured accuracy.
CLIP_RECIPE_FILE = "world_clip.json"


@dataclass
class ClipRecipe:
    """Everything the demo mini-CLIP depends on (defaults: the shipped one's recipe)."""

    seed: int = 0
    scenes: int = world.TRAINING_SCENES
    resolution: int = world.RESOLUTION
    # Text tower: the demo diffusion model's text encoder (WorldRecipe.text_hidden/_layers/_heads must match).
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    # Vision tower: a ViT over patch_size-px patches (position embeddings keep where things are: left and right).
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_heads: int = 2
    projection_dim: int = 64
    # Optimisation
    steps: int = 1500
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # A text tower trained elsewhere (a world run's contrastive.safetensors: its text encoder and text projection),
    # kept frozen: the vision tower is fitted to it. None: both towers train from scratch.
    text_tower_init: str | None = None
    # Bookkeeping
    checkpoint_every: int = 250
    weights_dtype: str = "fp16"  # of the final folder; checkpoints are fp32

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 2 or self.checkpoint_every < 1 or self.warmup_steps < 0:
            raise ConfigError("clip recipe: steps >= 1, batch_size >= 2, checkpoint_every >= 1, warmup_steps >= 0")
        if self.scenes < self.batch_size:
            raise ConfigError(f"clip recipe: {self.scenes} scenes cannot fill a batch of {self.batch_size}")
        if self.resolution % self.patch_size:
            raise ConfigError("clip recipe: resolution must be a multiple of patch_size")
        if self.weights_dtype not in ("fp16", "fp32"):
            raise ConfigError(f"clip recipe: weights_dtype must be fp16 or fp32, got {self.weights_dtype!r}")
        for hidden, heads, name in (
            (self.text_hidden, self.text_heads, "text"),
            (self.vision_hidden, self.vision_heads, "vision"),
        ):
            if hidden % heads:
                raise ConfigError(f"clip recipe: {name}_hidden must be a multiple of {name}_heads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipRecipe:
        return record_from_dict(cls, data, "clip recipe")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ClipRecipe:
        return record_from_file(cls, path)


# Fields that may differ between a run and its resumption.
_RESUMABLE = frozenset({"checkpoint_every"})


def build_clip(recipe: ClipRecipe):
    """A fresh (seeded) ``CLIPModel``: SD2's text-encoder architecture at the recipe's size, a small ViT."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_size=recipe.text_hidden,
            intermediate_size=2 * recipe.text_hidden,
            projection_dim=recipe.projection_dim,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=recipe.text_heads,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=recipe.resolution,
            patch_size=recipe.patch_size,
            num_channels=3,
            hidden_size=recipe.vision_hidden,
            intermediate_size=4 * recipe.vision_hidden,
            projection_dim=recipe.projection_dim,
            num_hidden_layers=recipe.vision_layers,
            num_attention_heads=recipe.vision_heads,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=recipe.projection_dim,
    )
    torch.manual_seed(recipe.seed + 7)
    return CLIPModel(config)


def image_processor_config(resolution: int) -> dict[str, Any]:
    """``preprocessor_config.json`` of the mini-CLIP: shortest side to the resolution, centre crop, pixels to
    [-1, 1] (mean and std 0.5: the same range the diffusion model's VAE sees)."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": resolution},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": resolution, "width": resolution},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def clip_logits(model, pixels, ids):
    """``[B_images, B_texts]`` temperature-scaled cosine similarities; captions are encoded once per distinct
    caption in the batch (the gradient is the same; the text tower's cost drops to the batch's distinct captions)."""
    import torch

    image = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)
    distinct, inverse = torch.unique(ids, dim=0, return_inverse=True)
    text = torch.nn.functional.normalize(_features(model.get_text_features(input_ids=distinct)), dim=-1)[inverse]
    return model.logit_scale.clamp(max=math.log(100)).exp() * image @ text.T


def _lr_at(recipe: ClipRecipe, step: int) -> float:
    return cosine_lr(recipe.lr, recipe.steps, recipe.warmup_steps, recipe.final_lr_fraction, step)


#: The CLIP's one phase, and the index that seeds its steps' randomness (the world model's phases use 0-2).
PHASE, PHASE_INDEX = "clip", 7


def _load_text_tower(model, source: str) -> dict[str, str]:
    """Copy a world run's contrastive text tower (``contrastive.safetensors``: its text encoder and the text
    projection) into the CLIP and freeze the text encoder; returns the record (file, sha256)."""
    from safetensors.torch import load_file

    from ..runtime.bundle import sha256_file

    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"text_tower_init {source}: no such file; pass a world run's contrastive.safetensors")
    tensors = load_file(str(path))
    tower = {k.removeprefix("text_encoder."): v for k, v in tensors.items() if k.startswith("text_encoder.")}
    try:
        model.text_model.load_state_dict(tower)
        projection = tensors.get("contrastive.text_projection.weight")
        if projection is not None:
            model.text_projection.load_state_dict({"weight": projection})
    except RuntimeError:
        raise ConfigError(
            f"text_tower_init {source}: not the text-tower architecture of this recipe (text_hidden, text_layers, "
            "text_heads, projection_dim)"
        ) from None
    model.text_model.requires_grad_(False)
    return {"file": path.name, "sha256": sha256_file(path)}


def _training_data(recipe: ClipRecipe, tokenizer):
    """Rendered training scenes (uint8 NHWC), one caption's ids per scene, and a meaning id per scene (equal for
    scenes that every true caption of either describes)."""
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
    return pixels, ids, meanings


def to_model_range(pixels):
    """uint8 NHWC -> float32 NCHW in [-1, 1] (what the image processor's rescale and normalisation give)."""
    import torch

    array = torch.from_numpy(np.ascontiguousarray(pixels)).float() / 127.5 - 1.0
    return array.permute(0, 3, 1, 2).contiguous()


def train_world_clip(
    output: str | os.PathLike,
    recipe: ClipRecipe | None = None,
    resume: bool = False,
    threads: int | None = None,
    on_step: Callable[[str, int, int, float], None] | None = None,
    evaluate_items: int = 200,
) -> Path:
    """Train the mini-CLIP into ``output/`` (the run folder); returns the CLIP folder ``output/clip``.

    Args:
        output: run folder (``recipe.json``, ``checkpoints/``, ``latest.json``); the model in ``clip/``.
        recipe: the recipe (default: the shipped one's). On ``resume`` it must equal the run's own.
        resume: continue from the latest checkpoint (bit-identical to an uninterrupted run at the same threads).
        threads: torch threads (default: the CPUs this process may use).
        on_step: progress callback ``(phase, step, total, smoothed_loss)``.
        evaluate_items: benchmark items per subset for the towers-alone accuracy written beside the model (0: skip).
    """
    import torch

    from ..pytorch.tiny import write_clip_tokenizer
    from ..runtime.tokenizer import ClipTokenizer
    from .world import pin_threads

    recipe = recipe or ClipRecipe()
    folder = Path(output)
    used_threads = pin_threads(threads)
    begin_run(folder, recipe, resume, _RESUMABLE, "CLIP")
    started = time.perf_counter()
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "vocab.json").is_file():
        write_clip_tokenizer(tokenizer_dir)
    data = _training_data(recipe, ClipTokenizer.from_folder(tokenizer_dir))
    model = build_clip(recipe)
    frozen_text = None if recipe.text_tower_init is None else _load_text_tower(model, recipe.text_tower_init)
    run = RunFolder(folder, (PHASE,))
    latest = run.latest() if resume else None
    log = _train(recipe, model, data, run, latest, on_step)
    info = {
        "about": "The dsdkit demo mini-CLIP: a CLIPModel trained contrastively by `dsdkit world clip` on the "
        "synthetic world of dsdkit.world (coloured shapes). Its text tower is the demo diffusion model's frozen "
        "text encoder. It says nothing about real images.",
        "recipe": recipe.to_dict(),
        "training": {
            "threads": used_threads,
            "torch": torch.__version__,
            "wall_s_this_session": round(time.perf_counter() - started, 1),
            "resumed_from": None if latest is None else latest[1],
            "text_tower_init": frozen_text,
            "log": log,
            "parameters": {
                "text": sum(p.numel() for p in model.text_model.parameters()),
                "vision": sum(p.numel() for p in model.vision_model.parameters()),
                "all": sum(p.numel() for p in model.parameters()),
            },
        },
    }
    clip_folder = folder / "clip"
    write_clip_folder(clip_folder, model, recipe, info)
    if evaluate_items > 0:
        info["metrics"] = clip_accuracy(clip_folder, per_subset=evaluate_items)
        atomic_write_text(clip_folder / CLIP_RECIPE_FILE, json.dumps(info, indent=1) + "\n")
    logger.info("wrote the mini-CLIP to %s", clip_folder)
    return clip_folder


def _train(recipe: ClipRecipe, model, data, run: RunFolder, latest, on_step) -> list[dict]:
    """The contrastive training loop, from the latest checkpoint when there is one."""
    import torch

    pixels, ids, meanings = data
    trained = [p for p in model.parameters() if p.requires_grad]  # a text tower fitted elsewhere stays frozen
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay, foreach=True)
    modules = {"clip": model}
    start, log = 0, []
    if latest is not None:
        state = run.load(latest[2], modules, optimizer)
        start, log = int(state["step"]), list(state["log"])
    phase = PhaseProgress(
        PHASE,
        recipe.steps,
        recipe.checkpoint_every,
        log,
        lambda done: run.save(PHASE, done, modules, optimizer, log),
        on_step,
        smoothed=resumed_ema(log, PHASE, start),
    )
    model.train()
    meanings_t, ids_t = torch.from_numpy(meanings), torch.from_numpy(ids)
    for step in range(start, recipe.steps):
        rng, _ = step_random(recipe.seed, PHASE_INDEX, step)
        index = torch.from_numpy(rng.integers(0, recipe.scenes, recipe.batch_size))
        logits = clip_logits(model, to_model_range(pixels[index.numpy()]), ids_t[index])
        same = (meanings_t[index][:, None] == meanings_t[index][None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
        )
        lr = _lr_at(recipe, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, recipe.grad_clip)
        optimizer.step()

        def batch_retrieval(logits=logits, same=same, lr=lr):
            with torch.no_grad():  # in-batch retrieval: is the image's best caption one of its own meaning?
                hit = float(same[torch.arange(len(same)), logits.argmax(dim=1)].mean())
            return {"lr": lr, "batch_retrieval_top1": round(hit, 4)}

        phase.end(step, loss, batch_retrieval)
    model.eval()
    return log


CLIP_CARD = """---
license: mit
library_name: transformers
tags: [dsdkit, clip, synthetic-data]
---
# dsdkit demo mini-CLIP

A small `CLIPModel` trained contrastively by `dsdkit world clip` on the synthetic world of `dsdkit.world` (one or two
flat-coloured circles, squares and triangles; captions such as "a red circle left of a blue square"). Its text
tower has the demo diffusion model's text-encoder architecture and is that model's frozen text encoder, as SD2's
diffusion model is conditioned on a frozen OpenCLIP text encoder. It loads with `CLIPModel.from_pretrained`,
`CLIPTokenizer.from_pretrained` and `CLIPImageProcessor.from_pretrained` on this folder, offline.
`world_clip.json` holds the recipe, the training log and measured accuracy. It says nothing about real images.
"""


def write_clip_folder(folder: Path, model, recipe: ClipRecipe, info: dict) -> None:
    """The final CLIP folder (weights in the recipe's dtype, tokenizer, image processor), written atomically."""
    import copy

    import torch
    from transformers.utils import logging as transformers_logging

    from ..pytorch.tiny import write_clip_tokenizer

    transformers_logging.disable_progress_bar()
    dtype = torch.float16 if recipe.weights_dtype == "fp16" else torch.float32
    with staged_folder(folder) as staging:
        copy.deepcopy(model).to(dtype).save_pretrained(staging, safe_serialization=True)
        write_clip_tokenizer(staging)
        (staging / "preprocessor_config.json").write_text(
            json.dumps(image_processor_config(recipe.resolution), indent=2) + "\n", encoding="utf-8"
        )
        (staging / CLIP_RECIPE_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(CLIP_CARD, encoding="utf-8")


def load_world_clip(folder: str | os.PathLike):
    """A CLIP folder as an fp32 ``CLIPModel`` in eval mode (``transformers``' own loader, offline)."""
    import torch
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: not a CLIPModel folder ({str(exc).splitlines()[0]})") from None


#: The benchmark subsets the towers-alone check reports (two candidates each).
TOWER_SUBSETS = (
    "colour",
    "shape",
    "binding",
    "relation",
    "order",
    "heldout-colour",
    "heldout-shape",
    "heldout-relation",
    "heldout-order",
)


def clip_accuracy(folder: str | os.PathLike, per_subset: int = 200, seed: int = 0, subsets=TOWER_SUBSETS) -> dict:
    """The CLIP towers alone on the world benchmark's two-candidate items (cosine similarity of the image and each
    caption; ties count as wrong): does the text tower tell the captions apart?"""
    import torch

    from ..runtime.tokenizer import ClipTokenizer

    model = load_world_clip(folder)
    tokenizer = ClipTokenizer.from_folder(folder)
    out: dict[str, Any] = {"items_per_subset": per_subset, "benchmark_seed": seed}
    with torch.inference_mode():
        for subset in subsets:
            items = world.benchmark_items(seed=seed, per_subset=per_subset, subsets=[subset])
            pixels = np.stack([np.asarray(world.render(item.scenes[0])) for item in items])
            image = torch.nn.functional.normalize(
                _features(model.get_image_features(pixel_values=to_model_range(pixels))), dim=-1
            )
            captions = sorted({c for item in items for c in item.captions})
            row = {c: i for i, c in enumerate(captions)}
            ids = torch.from_numpy(np.stack([tokenizer.encode(c).ids for c in captions]).astype(np.int64))
            text = torch.nn.functional.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1)
            right = 0
            for k, item in enumerate(items):
                similarity = (text[[row[c] for c in item.captions]] @ image[k]).numpy()
                right += int(similarity.argmax() == item.positive and similarity.max() > similarity.min())
            out[subset] = {"top1": right / len(items), "n": len(items)}
    return out
