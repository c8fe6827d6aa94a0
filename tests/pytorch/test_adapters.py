"""Adapters: exact no-op at init, gradient flow, folding, files, base-model checks, the authors' LoRA import."""

from __future__ import annotations

import copy
import os
import types

import numpy as np
import pytest
import torch
from dsdkit.runtime.config import ScoringConfig
from dsdkit.runtime.errors import ConfigError, ModelError

from dsdkit.pytorch.adapters import (
    AdapterConfig,
    create_adapter,
    image_feature,
    import_discffusion_lora,
    load_adapter,
    read_adapter_header,
    save_adapter,
)
from dsdkit.pytorch.forward import ScoringForward
from dsdkit.pytorch.scorer import Scorer

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]
KINDS = ["kv-prompt", "lora"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", ["discffusion", "paper"])
def test_zero_initialised_adapters_are_bit_identical_to_the_bare_model(tiny_model, shape_images, kind, preset):
    config = ScoringConfig.from_preset(preset, num_timesteps=2, noise_levels=(0.3, 0.6))
    adapter = create_adapter(tiny_model, config, AdapterConfig(kind=kind))
    bare = Scorer(tiny_model, config, batch_size=4).score_matrix(shape_images[:2], CAPTIONS)
    adapted = Scorer(tiny_model, config, batch_size=4, adapter=adapter).score_matrix(shape_images[:2], CAPTIONS)
    np.testing.assert_array_equal(adapted.scores, bare.scores)
    np.testing.assert_array_equal(adapted.layer_scores, bare.layer_scores)


def one_backward(model, adapter, config, images):
    scorer = Scorer(model, config)
    latents = torch.stack([e.latent for e in scorer.encode_images(images)]).clone()
    text = scorer.encode_texts(CAPTIONS[:1])[0]
    count = latents.shape[0]
    noising = scorer.noising(torch.zeros(count, dtype=torch.long))
    layers, errors = ScoringForward(model, config, adapter)(
        latents, noising, text.states.clone().expand(count, -1, -1), text.mask.clone().expand(count, -1)
    )
    (layers.mean() - errors.mean() * 1e-3).backward()


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_adapter_tensor(tiny_model, shape_images, kind):
    config = ScoringConfig.from_preset("discffusion", num_timesteps=1)
    adapter = create_adapter(tiny_model, config, AdapterConfig(kind=kind))
    one_backward(tiny_model, adapter, config, shape_images[:2])
    # At init only the zero factor (B / up) can have a gradient: the other factors are multiplied by it.
    zero_factor = adapter.B if kind == "kv-prompt" else adapter.up
    for name, parameter in zero_factor.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    with torch.no_grad():
        for parameter in adapter.parameters():
            if parameter.grad is not None:
                parameter -= 1e-2 * parameter.grad.sign()
            parameter.grad = None
    one_backward(tiny_model, adapter, config, shape_images[:2])
    silent = [n for n, p in adapter.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not silent, f"no gradient reached {silent[:5]}"


def test_kv_prompt_fold_reproduces_the_deltas(tiny_model):
    config = ScoringConfig()
    adapter = create_adapter(tiny_model, config, AdapterConfig(kind="kv-prompt"))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    folded = adapter.fold()
    meta = torch.nn.Sequential(
        torch.nn.Linear(*folded.meta_network["0.weight"].shape[::-1]),
        torch.nn.ReLU(),
        torch.nn.Linear(*folded.meta_network["2.weight"].shape[::-1]),
    )
    meta.load_state_dict(folded.meta_network)
    latents = torch.randn(2, 4, 16, 16)
    features = image_feature(latents, folded.feature_grid)
    condition = adapter.condition(latents)
    name = adapter.layer_names[0]
    layer = tiny_model.unet.get_submodule(name).to_k
    context = torch.randn(2, 77, layer.in_features)
    with torch.no_grad():
        expected = layer(context) + adapter.delta(name, "k", context, condition)
        A, B = folded.conditioned[f"{name}.to_k"]
        static = torch.nn.functional.linear(context, layer.weight + folded.weight_deltas[f"{name}.to_k"], layer.bias)
        dynamic = ((context @ A.T) * meta(features)[:, None, :]) @ B.T
    torch.testing.assert_close(static + dynamic, expected, rtol=1e-5, atol=1e-5)


def test_kv_prompt_size_on_full_sd2_is_under_a_million():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from dsdkit.pytorch.tiny import SIZES

    with init_empty_weights():
        unet = UNet2DConditionModel(
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            use_linear_projection=True,
            **SIZES["full"]["unet"],
        )
    model = types.SimpleNamespace(unet=unet, latent_channels=4, device=torch.device("cpu"))
    for layers in ("last", "all"):
        adapter = create_adapter(model, ScoringConfig(layers=layers), AdapterConfig(kind="kv-prompt"))
        assert adapter.num_parameters() < 1_000_000
    lora = create_adapter(model, ScoringConfig(), AdapterConfig(kind="lora"))
    assert lora.num_parameters() == 829_952  # the authors' released checkpoint (its key count and shapes)


def test_save_load_round_trip_and_refusals(tiny_model, shape_images, tmp_path):
    config = ScoringConfig(num_timesteps=1)
    adapter = create_adapter(tiny_model, config, AdapterConfig(kind="kv-prompt"))
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(0.05)
    path = save_adapter(adapter, tmp_path / "a.safetensors", tiny_model.identity(), config)
    header = read_adapter_header(path)
    assert header["kind"] == "kv-prompt" and header["base_model"] == tiny_model.identity()
    assert header["scoring"]["layers"] == "last" and header["layers"] == adapter.layer_names
    loaded, trained = load_adapter(path, tiny_model)
    assert trained == config
    before = Scorer(tiny_model, config, adapter=adapter).score(shape_images[:1], CAPTIONS[:2])
    after = Scorer(tiny_model, config, adapter=loaded).score(shape_images[:1], CAPTIONS[:2])
    np.testing.assert_array_equal(before, after)
    other = copy.copy(tiny_model)
    other._identity = "0" * 64
    with pytest.raises(ModelError, match="another base model"):
        load_adapter(path, other)
    with pytest.raises(ConfigError, match="pins layers=last, but this run asks for layers=all"):
        load_adapter(path, tiny_model, ScoringConfig(layers="all"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelError, match="not a safetensors adapter"):
        read_adapter_header(broken)


def authors_state_dict(model, rank=4, seed=0):
    """A LoRA state dict in the authors' key layout with random (trained-looking) values."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for processor in model.unet.attn_processors:
        module = model.unet.get_submodule(processor.removesuffix(".processor"))
        for projection, layer in (
            ("to_q", module.to_q),
            ("to_k", module.to_k),
            ("to_v", module.to_v),
            ("to_out", module.to_out[0]),
        ):
            prefix = f"{processor}.{projection}_lora"
            state[f"{prefix}.down.weight"] = torch.randn(rank, layer.in_features, generator=generator) / rank
            state[f"{prefix}.up.weight"] = 0.05 * torch.randn(layer.out_features, rank, generator=generator)
    return state


def test_discffusion_import_matches_lora_merged_by_hand(tiny_model, tiny_model_dir, shape_images, tmp_path):
    from dsdkit.pytorch.models import load_model

    state = authors_state_dict(tiny_model)
    bin_path = tmp_path / "pytorch_model.bin"
    torch.save(state, bin_path)
    adapter = import_discffusion_lora(bin_path, tiny_model)
    assert adapter.config.rank == 4 and len(adapter.layer_names) == 32
    config = ScoringConfig(num_timesteps=2)
    ours = Scorer(tiny_model, config, adapter=adapter).score(shape_images[:2], CAPTIONS)

    merged = load_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        for key, down in state.items():
            if not key.endswith(".down.weight"):
                continue
            module_name, projection = key.split(".processor.")
            projection = projection.split("_lora")[0]
            module = merged.unet.get_submodule(module_name)
            layer = module.to_out[0] if projection == "to_out" else getattr(module, projection)
            layer.weight += state[key.replace(".down.", ".up.")] @ down
    by_hand = Scorer(merged, config).score(shape_images[:2], CAPTIONS)
    bare = Scorer(tiny_model, config).score(shape_images[:2], CAPTIONS)
    np.testing.assert_allclose(ours, by_hand, rtol=0, atol=1e-5)
    assert np.abs(ours - bare).max() > 1e-3  # the LoRA really changes the scores


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch lora-pwned",))


def test_a_checkpoint_that_runs_code_is_refused(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "pytorch_model.bin"
    torch.save(
        {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": _Payload()}, path
    )
    with pytest.raises(ModelError, match="never executes pickled code"):
        import_discffusion_lora(path, tiny_model)
    assert not (tmp_path / "lora-pwned").exists()
