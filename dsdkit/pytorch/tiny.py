"""Random-weight models of the Stable Diffusion family (SD2 by default), for trying dsdkit offline and for tests.

``dsdkit tiny-model DIR`` writes a seeded model in SD2's diffusers folder layout (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``), so every command loads it through the
same code path as real weights. Same block types as SD2 (cross-attention in the down, mid and up paths, linear
projections in the transformer blocks, a 23-layer-style CLIP text encoder shrunk), random weights:
**its scores are meaningless**; the folder carries a marker file and every command that loads it says so.

Sizes:
- ``tiny`` (default): 16 cross-attention layers like SD2 (6 scored by the ``last`` layer set, as on SD2), 128 px.
- ``micro``: fewer layers and channels, for the fastest tests (10 cross-attention layers), 128 px.
- ``full``: the full SD2-2.1-base architecture (865.9 M UNet parameters, 512 px): for benchmarks, about 5 GB.

Architectures (:data:`ARCHITECTURES`), each at every size, differing where the real models differ:
- ``sd2`` (default): SD2-1-base. Linear projections in the transformer blocks, a GELU text encoder, padding with
  ``"!"``, ε-prediction.
- ``sd1``: SD1.x. Convolutional (1×1) projections, a fixed 8 heads per attention layer (SD1's config calls it
  ``attention_head_dim``), a quick-GELU text encoder (CLIP ViT-L's), padding with the end token; ``full`` has SD1.5's
  768-dim text states.
- ``sd2-v``: SD2-1 768-v. SD2's networks with v-prediction (the scheduler's ``prediction_type``).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from importlib import resources
from pathlib import Path

from ..runtime.errors import ConfigError, OutputError
from ..runtime.files import atomic_write_text, output_error, staged_folder
from ..runtime.tokenizer import bytes_to_unicode

__all__ = [
    "SIZES",
    "ARCHITECTURES",
    "SCHEDULER_CONFIG",
    "MODEL_INDEX",
    "write_tiny_model",
    "write_clip_tokenizer",
    "write_pipeline_folder",
]

logger = logging.getLogger(__name__)

#: The scheduler config of SD2-2.1-base (what every SD2-architecture model dsdkit writes uses).
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

# "groups" is GroupNorm's group count. SD2 normalises 320 channels in 32 groups (10 channels each); with the small
# models' 32 channels, 32 groups would be instance norm, which erases the per-channel statistics (a flat colour, say)
# that SD2 keeps. 8 groups keep several channels per group, as in SD2.
SIZES = {
    "micro": {
        "groups": 8,
        "unet": dict(
            sample_size=16,
            block_out_channels=[32, 32, 64, 64],
            attention_head_dim=[1, 1, 2, 2],
            cross_attention_dim=32,
            layers_per_block=1,
        ),
        "vae": dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=128),
        "text": dict(
            hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2, num_attention_heads=2
        ),
    },
    "tiny": {
        "groups": 8,
        "unet": dict(
            sample_size=16,
            block_out_channels=[32, 64, 128, 128],
            attention_head_dim=[1, 2, 4, 4],
            cross_attention_dim=64,
            layers_per_block=2,
        ),
        "vae": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=128),
        "text": dict(
            hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2, num_attention_heads=2
        ),
    },
    "full": {
        "groups": 32,
        "unet": dict(
            sample_size=64,
            block_out_channels=[320, 640, 1280, 1280],
            attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024,
            layers_per_block=2,
        ),
        "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512),
        "text": dict(
            hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23, num_attention_heads=16
        ),
    },
}


#: What differs between the architectures ``dsdkit tiny-model --arch`` writes (see the module docstring): the UNet's
#: projections and heads, the text encoder's activation (and, at full size, SD1.5's text widths), the padding token
#: and the prediction type.
ARCHITECTURES = {
    "sd2": {"unet": {}, "text": {}, "pad_token": "!", "prediction_type": "epsilon"},
    "sd1": {
        "unet": {"use_linear_projection": False, "attention_head_dim": 8},
        "text": {"hidden_act": "quick_gelu"},
        "full_text": dict(
            hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12, num_attention_heads=12
        ),
        "full_unet": {"cross_attention_dim": 768},
        "pad_token": "<|endoftext|>",
        "prediction_type": "epsilon",
    },
    "sd2-v": {"unet": {}, "text": {}, "pad_token": "!", "prediction_type": "v_prediction"},
}


#: ``model_index.json`` of an SD2 pipeline folder without safety checker.
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_clip_tokenizer(folder: str | os.PathLike, pad_token: str = "!") -> Path:
    """Write an SD2-style ``tokenizer/`` folder (vocab.json, merges.txt, tokenizer_config.json, special tokens).

    The vocabulary is CLIP's (49,408 entries, ids in OpenAI's order), rebuilt from the BPE merges file shipped in
    ``dsdkit/assets`` exactly as OpenAI's ``SimpleTokenizer`` builds it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    bpe_file = resources.files("dsdkit.assets").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe_file.open("rb") as raw, gzip.open(raw) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab_list = base + [token + "</w>" for token in base] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        **specials,
    }
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(specials, indent=2))
    return folder


def sd2_unet(**shape):
    """A fresh UNet with SD2's block types (3 cross-attention down blocks + 1 plain, a cross-attention mid block,
    1 plain + 3 cross-attention up blocks, linear projections); ``shape`` sets sizes (``sample_size``,
    ``block_out_channels``, ``attention_head_dim``, ``cross_attention_dim``, ``layers_per_block``,
    ``norm_num_groups``). Weights come from torch's global generator: seed it first."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        downsample_padding=1,
        act_fn="silu",
        norm_eps=1e-5,
        upcast_attention=False,
        **{"use_linear_projection": True, **shape},
    )


def sd2_vae(**shape):
    """A fresh AutoencoderKL with SD2's block types, one down/up block per entry of ``block_out_channels``
    (``layers_per_block``, ``sample_size``, ``norm_num_groups``, ``scaling_factor`` in ``shape``)."""
    from diffusers import AutoencoderKL

    levels = len(shape["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=4,
        act_fn="silu",
        **shape,
    )


def sd2_text_encoder(**shape):
    """A fresh CLIP text encoder over CLIP's 49,408-token vocabulary and 77 positions, like SD2's (``hidden_size``,
    ``intermediate_size``, ``projection_dim``, ``num_hidden_layers``, ``num_attention_heads`` in ``shape``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            **{"hidden_act": "gelu", **shape},
        )
    )


def write_pipeline_folder(
    folder: Path, unet, vae, text_encoder, pad_token: str = "!", prediction_type: str = "epsilon"
) -> None:
    """Write the SD2 diffusers layout into an existing (staging) folder: the three modules' weights as they are,
    the CLIP tokenizer (padding with ``pad_token``), SD2's scheduler config (with ``prediction_type``) and
    ``model_index.json``."""
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_clip_tokenizer(folder / "tokenizer", pad_token=pad_token)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER_CONFIG, "prediction_type": prediction_type}, indent=2), encoding="utf-8"
    )
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2), encoding="utf-8")


def _calibrate_latent_scale(vae, seed: int) -> None:
    """Set the VAE's scaling factor so latents have unit standard deviation, as SD's 0.18215 does for real images.

    A random VAE's latents are tiny (std ~0.03); with SD's factor the image would vanish under the noise of every
    timestep and no adapter could learn anything from it. Calibrated on seeded synthetic images (flat colours,
    gradients, noise) at the VAE's sample size.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    size = int(vae.config.sample_size)
    images = [np.broadcast_to(rng.uniform(-1, 1, (3, 1, 1)), (3, size, size)) for _ in range(4)]
    ramp = np.linspace(-1, 1, size)
    images += [
        np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), -ramp[None, :].repeat(size, 0)])
    ]
    images += [rng.uniform(-1, 1, (3, size, size)) for _ in range(3)]
    batch = torch.tensor(np.stack(images), dtype=torch.float32)
    with torch.no_grad():
        std = float(vae.encode(batch).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 6))


def write_tiny_model(
    folder: str | os.PathLike, size: str = "tiny", seed: int = 0, overwrite: bool = False, arch: str = "sd2"
) -> Path:
    """Write a seeded random-weight model of the Stable Diffusion family to ``folder``.

    Args:
        folder: where to write; must be absent or empty unless ``overwrite``.
        size: ``"micro"``, ``"tiny"`` (default) or ``"full"``; see the module docstring.
        seed: weights are a pure function of (size, arch, seed, library versions).
        overwrite: replace an existing dsdkit test model in ``folder``.
        arch: ``"sd2"`` (default), ``"sd1"`` or ``"sd2-v"`` (:data:`ARCHITECTURES`).

    The model is written into a temporary folder beside ``folder`` and renamed into place when complete, so an
    interrupted run or a full disk (an ``OutputError``) never leaves a partial model that looks loadable.
    """
    if size not in SIZES:
        raise ConfigError(f"unknown tiny-model size {size!r}; choose one of {', '.join(SIZES)}")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown tiny-model architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    folder = Path(folder)
    from .models import TEST_MODEL_MARKER

    if folder.exists() and any(folder.iterdir()) and not (overwrite and (folder / TEST_MODEL_MARKER).is_file()):
        raise OutputError(
            f"{folder} exists and is not empty; choose a new folder "
            "(or pass `overwrite` for a folder made by dsdkit tiny-model)"
        )
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    spec, family = SIZES[size], ARCHITECTURES[arch]
    unet_shape = {**spec["unet"], **family["unet"], **(family.get("full_unet", {}) if size == "full" else {})}
    text_shape = {**spec["text"], **family["text"], **(family.get("full_text", {}) if size == "full" else {})}
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    torch.manual_seed(seed)
    unet = sd2_unet(norm_num_groups=spec["groups"], **unet_shape)
    torch.manual_seed(seed + 1)
    vae = sd2_vae(norm_num_groups=spec["groups"], scaling_factor=0.18215, **spec["vae"])
    _calibrate_latent_scale(vae, seed)
    torch.manual_seed(seed + 2)
    text_encoder = sd2_text_encoder(**text_shape)
    with staged_folder(folder) as staging:
        write_pipeline_folder(
            staging, unet, vae, text_encoder, pad_token=family["pad_token"], prediction_type=family["prediction_type"]
        )
        marker = {
            "random_weights": True,
            "size": size,
            "arch": arch,
            "seed": seed,
            "note": f"Random-weight model with the {arch} architecture, written by `dsdkit tiny-model` for "
            "offline trials and tests. Its scores are meaningless. Use real weights for real matching.",
        }
        (staging / TEST_MODEL_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        (staging / "README.md").write_text(
            f"# dsdkit test model ({arch}, {size}, seed {seed})\n\n{marker['note']}\n", encoding="utf-8"
        )
    logger.info("wrote a random-weight %s %s model to %s (scores are meaningless)", size, arch, folder)
    return folder
