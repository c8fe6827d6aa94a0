"""Scoring config presets/validation and the timestep tables, noise schedule and noise bank."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dsdkit.runtime.config import PRESETS, HeadWeighting, LayerSet, Pooling, ScoringConfig, TokenSet
from dsdkit.runtime.errors import ConfigError

from dsdkit.pytorch.noise import DiffusionProcess, discffusion_timesteps, noise_bank, noise_level_timesteps


def authors_timesteps(sampling_time_steps: int) -> list[int]:
    """Literal transcription of the authors' selection (pipeline_dsd.py with num_inference_steps=50, strength=0.8)."""
    num_inference_steps, strength = 50, 0.8
    t_start = num_inference_steps - int(num_inference_steps * strength)
    rate = int(1000 / sampling_time_steps)
    timesteps = [999 - i for i in range(t_start, 990, rate)]
    return timesteps[::-1]


@pytest.mark.parametrize(
    "steps, count, first, last",
    [(10, 10, 89, 989), (30, 30, 32, 989), (40, 40, 14, 989), (50, 49, 29, 989), (200, 196, 14, 989)],
)
def test_discffusion_table_equals_the_authors(steps, count, first, last):
    table = discffusion_timesteps(steps)
    assert table == authors_timesteps(steps)
    assert (len(table), table[0], table[-1]) == (count, first, last)  # the authors' table


def test_paper_noise_levels():
    assert noise_level_timesteps((0.2, 0.4, 0.6, 0.8)) == [200, 400, 599, 799]


def test_alphas_equal_diffusers_scheduler():
    from diffusers import DDPMScheduler

    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    ours = DiffusionProcess.from_scheduler_config(config).alphas_cumprod
    theirs = DDPMScheduler(**config).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)


def test_noise_bank_entries_do_not_depend_on_its_length():
    short, long = noise_bank(7, 2, (4, 8, 8)), noise_bank(7, 5, (4, 8, 8))
    torch.testing.assert_close(long[:2], short, rtol=0, atol=0)
    assert not torch.equal(noise_bank(8, 2, (4, 8, 8)), short)


def test_presets_match_the_design_table():
    discffusion, paper = PRESETS["discffusion"], PRESETS["paper"]
    assert (discffusion.pooling, discffusion.lse_lambda, discffusion.tokens, discffusion.layers) == (
        Pooling.text_lse,
        1.0,
        TokenSet.all,
        LayerSet.last,
    )
    assert (
        discffusion.heads is HeadWeighting.uniform and discffusion.denoise_term and not discffusion.uncond_in_attention
    )
    assert discffusion.num_timesteps == 30
    assert (paper.pooling, paper.lse_lambda, paper.tokens, paper.layers, paper.heads) == (
        Pooling.image_lse,
        5.0,
        TokenSet.words_eos,
        LayerSet.all,
        HeadWeighting.dynamic,
    )
    assert not paper.denoise_term and paper.noise_levels == (0.2, 0.4, 0.6, 0.8)


def test_overrides_round_trip_and_validation():
    config = ScoringConfig.from_preset("paper", lse_lambda=2.0, denoise_term=None, normalize="uncond")
    assert config.lse_lambda == 2.0 and not config.denoise_term
    assert ScoringConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ConfigError, match="unknown preset"):
        ScoringConfig.from_preset("fast")
    with pytest.raises(ConfigError, match="`pooling` 'max' is not one of"):
        ScoringConfig(pooling="max")
    with pytest.raises(ConfigError, match="image-lse"):
        ScoringConfig(heads="dynamic")
    with pytest.raises(ConfigError, match="`noise_levels`: levels must lie in"):
        ScoringConfig(timesteps="noise-levels", noise_levels=(0.0, 1.5))
    with pytest.raises(ConfigError, match="unknown field"):
        ScoringConfig.from_dict({"bogus": 1})
