"""`dsdkit world clip`: a Hugging Face CLIPModel folder that transformers loads offline, resumable bit for bit,
whose text tower becomes a world model's frozen text encoder byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

#: A few seconds: tiny towers, few scenes, few steps (the shipped recipe's shapes for the text tower).
TINY = {
    "scenes": 96,
    "batch_size": 16,
    "steps": 6,
    "checkpoint_every": 3,
    "vision_hidden": 32,
    "vision_layers": 1,
    "projection_dim": 32,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dsdkit.train.clip import ClipRecipe, train_world_clip

    run = tmp_path_factory.mktemp("clip") / "run"
    return run, train_world_clip(run, ClipRecipe(**TINY), threads=1, evaluate_items=4)


def test_the_folder_loads_with_transformers_offline(trained):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from dsdkit import world

    _, folder = trained
    model = CLIPModel.from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = CLIPImageProcessor.from_pretrained(folder)
    image = world.render(world.benchmark_items(per_subset=1, subsets=["colour"])[0].scenes[0])
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    # The processor's arithmetic is the trainer's: pixels / 127.5 - 1 at the world's resolution.
    expected = torch.from_numpy(np.array(image)).float().permute(2, 0, 1)[None] / 127.5 - 1
    assert torch.allclose(pixels, expected, atol=1e-6)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    assert ids[0, :5].tolist() == [49406, 320, 736, 7117, 49407] and ids[0, 5] == 0  # SD2's pad "!" = 0
    out = model(input_ids=ids, pixel_values=pixels)
    assert out.logits_per_image.shape == (1, 1)
    info = json.loads((folder / "world_clip.json").read_text())
    assert info["recipe"]["steps"] == TINY["steps"] and set(info["metrics"]) >= {"colour", "relation"}


def test_resume_is_bit_identical(trained, tmp_path):
    """A run killed after its first checkpoint and resumed ends with the uninterrupted run's weights."""
    from dsdkit.train.clip import ClipRecipe, train_world_clip
    from safetensors.torch import load_file

    class Killed(Exception):
        pass

    def kill_after_first_checkpoint(phase, step, total, loss):
        if step == TINY["checkpoint_every"] + 1:
            raise Killed

    _, folder = trained
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train_world_clip(run, ClipRecipe(**TINY), threads=1, on_step=kill_after_first_checkpoint, evaluate_items=0)
    assert json.loads((run / "latest.json").read_text())["step"] == TINY["checkpoint_every"]
    resumed = train_world_clip(run, ClipRecipe(**TINY), resume=True, threads=1, evaluate_items=0)
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_world_model_takes_the_text_tower_byte_for_byte(trained, tmp_path):
    from dsdkit.train.world import WorldRecipe, train_world_model
    from safetensors.torch import load_file

    _, clip = trained
    recipe = WorldRecipe(
        scenes=64, vae_steps=2, steps=2, batch_size=8, vae_batch_size=8, checkpoint_every=2, text_tower=str(clip)
    )
    model = train_world_model(tmp_path / "world", recipe, threads=1)
    encoder = load_file(str(model / "text_encoder" / "model.safetensors"))
    tower = load_file(str(clip / "model.safetensors"))
    assert encoder and all(
        torch.equal(v.view(torch.int16), tower[f"text_model.{k}"].view(torch.int16)) for k, v in encoder.items()
    )
    recorded = json.loads((model / "world_model.json").read_text())["training"]["text_tower"]
    assert recorded["clip"] == str(clip) and len(recorded["weights_sha256"]) == 64


def test_a_tower_of_another_architecture_is_refused(trained, tmp_path):
    from dsdkit.runtime.errors import ConfigError
    from dsdkit.train.world import WorldRecipe, build_modules, load_text_tower

    _, clip = trained
    wider = WorldRecipe(text_hidden=32, text_heads=2)
    with pytest.raises(ConfigError, match="not the architecture"):
        load_text_tower(clip, build_modules(wider)[2])
