"""`dsdkit world train`: a short seeded run end to end, exact resume after real SIGKILLs, a loss that falls."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

# Tens of steps on a hundred scenes: the full recipe's code path (both phases, checkpoints) in seconds per run.
SHORT_RECIPE = dict(
    scenes=128, vae_steps=12, vae_batch_size=8, steps=16, batch_size=8, checkpoint_every=4, warmup_steps=4
)

KILLED_RUN = """
import os, signal, sys
from dsdkit.train.world import WorldRecipe, train_world_model

kill_at = sys.argv[3]

def on_step(phase, step, total, loss):
    if f"{phase}:{step}" == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

train_world_model(sys.argv[1], WorldRecipe.from_file(sys.argv[2]), resume=True, threads=1, on_step=on_step)
"""


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dsdkit.cli", *args], capture_output=True, text=True, timeout=600)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(run):
    model = run / "model"
    names = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    final = {name: _digest(model / name) for name in names}
    checkpoint = json.loads((run / "latest.json").read_text())["path"]
    final["fp32 checkpoint"] = _digest(run / checkpoint / "weights.safetensors")
    return final


def _recipe_file(tmp_path_factory, fields: dict):
    return _recipe_file_at(tmp_path_factory.mktemp("recipe") / "recipe.json", fields)


def _recipe_file_at(path, fields: dict):
    path.write_text(json.dumps(fields))
    return path


def _trained(tmp_path_factory, recipe):
    run = tmp_path_factory.mktemp("world") / "run"
    done = _cli("world", "train", str(run), "--recipe", str(recipe), "--threads", "1", "--eval-items", "0")
    assert done.returncode == 0, done.stderr
    return run


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return _recipe_file(tmp_path_factory, SHORT_RECIPE)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, recipe):
    return _trained(tmp_path_factory, recipe)


def test_short_run_writes_a_loadable_model_and_its_loss_falls(uninterrupted):
    from dsdkit.train.world import RECIPE_FILE

    from dsdkit.pytorch.models import load_model

    info = json.loads((uninterrupted / "model" / RECIPE_FILE).read_text())
    assert info["recipe"]["steps"] == 16 and info["training"]["threads"] == 1
    log = info["training"]["log"]
    for phase in ("vae", "diffusion"):
        losses = [entry["loss_ema"] for entry in log if entry["phase"] == phase]
        assert len(losses) >= 3 and losses[-1] < losses[0], (phase, losses)
    model = load_model(uninterrupted / "model", device="cpu")
    assert not model.is_test_model
    assert model.resolution == 64 and model.scaling_factor == info["training"]["scaling_factor"]


def test_resume_after_sigkills_is_bit_identical(uninterrupted, recipe, tmp_path):
    """Killed in the VAE phase, resumed and killed again in the diffusion phase, resumed to the end: the same
    weights, byte for byte, as the uninterrupted run (the final fp16 folder and the last fp32 checkpoint)."""
    run = tmp_path / "run"
    for kill_at in ("vae:6", "diffusion:9"):
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_RUN, str(run), str(recipe), kill_at], capture_output=True, timeout=600
        )
        assert killed.returncode == -9, killed.stderr
        assert not (run / "model").exists()
    resumed = _cli("world", "train", str(run), "--resume", "--threads", "1", "--eval-items", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert _weights(run) == _weights(uninterrupted)


def test_an_existing_run_needs_resume_and_the_same_recipe(uninterrupted, recipe):
    again = _cli("world", "train", str(uninterrupted), "--recipe", str(recipe))
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    other = _cli("world", "train", str(uninterrupted), "--resume", "--steps", "17")
    assert other.returncode == 2 and "different recipe (steps)" in other.stderr, other.stderr


# The same short run with the contrastive text-tower phase first and the text encoder frozen after it.
PRETRAINED_RECIPE = dict(
    SHORT_RECIPE, text_pretrain_steps=8, text_pretrain_batch_size=16, text_pretrain_warmup_steps=2
) | {"freeze_text_encoder": True}


@pytest.fixture(scope="module")
def pretrained_recipe(tmp_path_factory):
    return _recipe_file(tmp_path_factory, PRETRAINED_RECIPE)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pretrained_recipe):
    return _trained(tmp_path_factory, pretrained_recipe)


def test_contrastive_phase_trains_the_text_encoder_which_then_stays_frozen(pretrained):
    import torch
    from dsdkit.train.world import CONTRASTIVE_FILE, RECIPE_FILE, WorldRecipe, build_modules
    from safetensors.torch import load_file

    info = json.loads((pretrained / "model" / RECIPE_FILE).read_text())
    text_log = [entry for entry in info["training"]["log"] if entry["phase"] == "text"]
    assert [entry["step"] for entry in text_log] == [4, 8]
    assert all(0 <= entry["batch_retrieval_top1"] <= 1 for entry in text_log)
    towers = load_file(str(pretrained / CONTRASTIVE_FILE))
    final = load_file(str(pretrained / "model" / "text_encoder" / "model.safetensors"))
    fresh = build_modules(WorldRecipe(**PRETRAINED_RECIPE))[2].state_dict()
    key = next(name for name in fresh if name.endswith("layers.0.self_attn.q_proj.weight"))
    pretrained_weight = towers[f"text_encoder.{key}"]
    # The contrastive phase moved the encoder; the diffusion phase did not (the folder holds it in fp16).
    assert not torch.equal(pretrained_weight, fresh[key])
    for name, value in final.items():
        assert torch.equal(value, towers[f"text_encoder.{name}"].to(value.dtype)), name
    assert any(name.startswith("contrastive.image.") for name in towers) and "contrastive.logit_scale" in towers


def test_resume_in_the_contrastive_phase_is_bit_identical(pretrained, pretrained_recipe, tmp_path):
    """Killed after the contrastive phase's first checkpoint, resumed to the end: the towers' optimizer state comes
    back from the checkpoint, and the weights equal the uninterrupted run's byte for byte."""
    run = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(run), str(pretrained_recipe), "text:6"],
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr
    assert json.loads((run / "latest.json").read_text())["phase"] == "text"
    resumed = _cli("world", "train", str(run), "--resume", "--threads", "1", "--eval-items", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert _weights(run) == _weights(pretrained)


def test_init_from_continues_a_trained_model_and_refuses_another_architecture(uninterrupted, tmp_path):
    """--init-from with a zero learning rate: the continued model is the source model itself (all three modules,
    byte for byte, and its latent scaling factor), and the run records where it started; a recipe of another
    architecture is refused, naming the module, before any step."""
    import torch
    from dsdkit.train.world import RECIPE_FILE
    from safetensors.torch import load_file

    source = uninterrupted / "model"
    zero_lr = _recipe_file_at(tmp_path / "zero.json", {**SHORT_RECIPE, "steps": 2, "lr": 0.0})
    run = tmp_path / "continued"
    done = _cli(
        "world",
        "train",
        str(run),
        "--recipe",
        str(zero_lr),
        "--init-from",
        str(source),
        "--threads",
        "1",
        "--eval-items",
        "0",
    )
    assert done.returncode == 0, done.stderr
    names = [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ]
    for name in names:
        continued, original = load_file(str(run / "model" / name)), load_file(str(source / name))
        assert continued.keys() == original.keys(), name
        assert all(torch.equal(continued[k], original[k]) for k in original), name
    info = json.loads((run / "model" / RECIPE_FILE).read_text())
    source_info = json.loads((source / RECIPE_FILE).read_text())
    assert info["training"]["initialised_from"]["model"] == str(source)
    assert info["training"]["scaling_factor"] == source_info["training"]["scaling_factor"]
    assert [e["phase"] for e in info["training"]["log"]] == ["diffusion"]  # no VAE phase was run

    # The refusal happens before any step: called directly (no second process, no torch import to pay again).
    from dsdkit.runtime.errors import ConfigError
    from dsdkit.train.world import WorldRecipe, _initialise_from, _Run, build_modules

    narrower = WorldRecipe(**{**SHORT_RECIPE, "unet_channels": [32, 32, 64, 64]})
    (tmp_path / "refused").mkdir()
    with pytest.raises(ConfigError, match="its unet is not the architecture this recipe builds"):
        _initialise_from(source, _Run(tmp_path / "refused"), narrower, *build_modules(narrower))
    assert not (tmp_path / "refused" / "latest.json").exists()
