"""Loading SD2 models: folders, hub ids offline, broken folders, test-model marking, identity."""

from __future__ import annotations

import json
import shutil

import pytest
from dsdkit.runtime.errors import ConfigError, ModelError

from dsdkit.pytorch.models import DEFAULT_MODEL, load_model


def test_hub_id_without_weights_says_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        load_model(DEFAULT_MODEL, device="cpu")
    message = str(info.value)
    assert DEFAULT_MODEL in message and "hub cache" in message and "`model` DIR" in message
    assert "\n" not in message and "--model" not in message  # the CLI says --model DIR (as_flags)


def test_neither_folder_nor_hub_id():
    with pytest.raises(ModelError, match="no such folder, and not a hub id"):
        load_model("./definitely/not/here/model", device="cpu")


def test_incomplete_folder_names_missing_parts(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match=r"missing vae/"):
        load_model(broken, device="cpu")


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="does not unpickle"):
        load_model(folder, device="cpu")


def test_sdxl_folder_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "text_encoder_2").mkdir()
    with pytest.raises(ModelError, match="SDXL"):
        load_model(folder, device="cpu")


def test_mismatched_components_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 1024
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="does not match"):
        load_model(folder, device="cpu")


def test_precision_and_device_checks():
    with pytest.raises(ConfigError, match="unknown dtype"):
        load_model("x/y", dtype="fp8")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        load_model("x/y", device="cpu", dtype="fp16")


def test_tiny_model_is_marked_and_sized(tiny_model):
    assert tiny_model.is_test_model
    assert tiny_model.resolution == 128 and tiny_model.vae_scale_factor == 8
    assert len(tiny_model.identity()) == 64
    assert tiny_model.tokenizer.max_length == 77
