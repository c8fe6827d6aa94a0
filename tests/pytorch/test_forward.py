"""The scoring forward: processors installed once and stateless, per-call state only, the default attention
without a call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dsdkit.runtime.config import ScoringConfig

from dsdkit.pytorch.forward import DSDAttnProcessor, ScoringForward
from dsdkit.pytorch.scorer import Scorer

CAPTIONS = ["a red circle", "a blue square"]


@pytest.fixture()
def own_model(tiny_model_dir):
    """A model of its own: these tests swap processors, which must not leak into the session's shared model."""
    from dsdkit.pytorch.models import load_model

    return load_model(tiny_model_dir, device="cpu", dtype="fp32")


def batch(scorer, images):
    latents = torch.stack([e.latent for e in scorer.encode_images(images)])
    text = scorer.encode_texts(CAPTIONS[:1])[0]
    count = latents.shape[0]
    steps = torch.zeros(count, dtype=torch.long)
    states = text.states.expand(count, -1, -1)
    return latents, scorer.noising(steps), states, text.mask.expand(count, -1)


def test_processors_are_installed_once_and_keep_no_state(own_model, shape_images):
    scorer = Scorer(own_model, ScoringConfig(num_timesteps=2))
    processors = own_model.unet.attn_processors
    assert all(isinstance(p, DSDAttnProcessor) for p in processors.values())
    before = {name: (id(p), dict(vars(p))) for name, p in processors.items()}
    scorer.score(shape_images[:2], CAPTIONS)
    Scorer(own_model, ScoringConfig.from_preset("paper", noise_levels=(0.5,))).score(shape_images[:1], CAPTIONS)
    after = {name: (id(p), dict(vars(p))) for name, p in own_model.unet.attn_processors.items()}
    assert after == before, "scoring must neither reinstall nor change the processors"


def test_without_a_call_the_unet_is_diffusers_default_attention(own_model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    states = torch.randn(2, 77, own_model.text_encoder.config.hidden_size, generator=generator)
    timesteps = torch.tensor([10, 500])
    ScoringForward(own_model, ScoringConfig())  # installs dsdkit's processors
    with torch.no_grad():
        ours = own_model.unet(sample, timesteps, encoder_hidden_states=states).sample
        own_model.unet.set_attn_processor(AttnProcessor2_0())
        stock = own_model.unet(sample, timesteps, encoder_hidden_states=states).sample
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


def test_interleaved_forwards_with_different_adapters_do_not_interfere(own_model, shape_images):
    from tests.conftest import perturbed_adapter

    config = ScoringConfig(num_timesteps=1)
    scorer = Scorer(own_model, config)
    inputs = batch(scorer, shape_images[:2])
    lora = perturbed_adapter(own_model, config, "lora", seed=1, scale=0.2)
    plain, adapted = ScoringForward(own_model, config), ScoringForward(own_model, config, lora)
    with torch.no_grad():
        alone = [f(*inputs)[0].clone() for f in (plain, adapted)]
        interleaved = [(plain(*inputs)[0], adapted(*inputs)[0], plain(*inputs)[0]) for _ in range(2)]
    assert (alone[0] - alone[1]).abs().max() > 1e-4, (
        "the adapter must change the scores for this test to mean anything"
    )
    for first, second, third in interleaved:
        torch.testing.assert_close(first, alone[0], rtol=0, atol=0)
        torch.testing.assert_close(second, alone[1], rtol=0, atol=0)
        torch.testing.assert_close(third, alone[0], rtol=0, atol=0)


def test_a_replaced_processor_is_an_error_not_a_silent_score(own_model, shape_images):
    from diffusers.models.attention_processor import AttnProcessor2_0
    from dsdkit.runtime.errors import ModelError

    scorer = Scorer(own_model, ScoringConfig(num_timesteps=1))
    inputs = batch(scorer, shape_images[:1])
    own_model.unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad(), pytest.raises(ModelError, match="scored layers did not run"):
        scorer.forward(*inputs)


def test_trace_keeps_maps_and_head_weights_per_call(own_model, shape_images):
    config = ScoringConfig.from_preset("paper", noise_levels=(0.5,))
    scorer = Scorer(own_model, config)
    inputs = batch(scorer, shape_images[:2])
    with torch.no_grad():
        layers, errors, call = scorer.forward.trace(*inputs, keep_maps=True)
        plain_layers, plain_errors = scorer.forward(*inputs)
    assert sorted(call.maps) == list(range(len(scorer.layer_names)))
    for index, probs in call.maps.items():
        assert probs.shape[0] == 2 and probs.shape[-1] == 77
        np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-5)  # head means of softmax rows
        weights = call.head_weights[index]
        np.testing.assert_allclose(weights.sum(-1).numpy(), 1.0, rtol=1e-5)
    torch.testing.assert_close(layers, plain_layers, rtol=0, atol=0)
    torch.testing.assert_close(errors, plain_errors, rtol=0, atol=0)
