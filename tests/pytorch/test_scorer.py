"""Scorer properties: batch invariance, determinism, caching, normalisation, knobs, prediction types."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from dsdkit.runtime.config import ScoringConfig
from dsdkit.runtime.errors import ConfigError, InputError

from dsdkit.pytorch.scorer import Scorer
from tests.conftest import one_torch_thread

CAPTIONS = ["a red circle", "a blue square", "a green triangle on the grass"]


class UNetBatchSpy:
    """Records the batch size of every UNet forward."""

    def __init__(self, unet):
        self.sizes: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.sizes.append(args[0].shape[0]))

    def close(self):
        self.handle.remove()


def test_batch_invariance_alone_together_reversed(tiny_model, shape_images):
    config = ScoringConfig.from_preset("discffusion", num_timesteps=2)
    pairs = [(0, 0), (0, 1), (1, 2), (2, 0), (2, 2), (3, 1), (3, 2)]  # 7 distinct pairs
    images, texts = shape_images, CAPTIONS

    alone = []
    for pair in pairs:
        scorer = Scorer(tiny_model, config, batch_size=1)
        alone.append(scorer.score_pairs(images, texts, [pair]).scores[0])

    together_scorer = Scorer(tiny_model, config, batch_size=len(pairs) * 2)
    together_scorer.encode_images(images)
    together_scorer._ensure_unconditional(together_scorer.encode_images(images), together_scorer.step_indices(), None)
    spy = UNetBatchSpy(tiny_model.unet)
    try:
        together = together_scorer.score_pairs(images, texts, pairs).scores
    finally:
        spy.close()
    assert spy.sizes == [len(pairs) * 2], "all 7 pairs x 2 timesteps must run as one UNet batch"

    reversed_scores = Scorer(tiny_model, config, batch_size=5).score_pairs(images, texts, pairs[::-1]).scores[::-1]
    np.testing.assert_allclose(together, np.array(alone), rtol=1e-6, atol=0)
    np.testing.assert_allclose(reversed_scores, np.array(alone), rtol=1e-6, atol=0)
    assert np.ptp(alone) > 1e-5  # distinct pairs give distinct scores


@pytest.mark.parametrize("preset", ["discffusion", "paper"])
def test_two_runs_are_bit_identical(tiny_model, shape_images, preset):
    config = ScoringConfig.from_preset(preset, num_timesteps=2, noise_levels=(0.4, 0.8))
    first = Scorer(tiny_model, config, batch_size=4).score(shape_images[:3], CAPTIONS)
    second = Scorer(tiny_model, config, batch_size=4).score(shape_images[:3], CAPTIONS)
    np.testing.assert_array_equal(first, second)


def test_per_image_and_per_caption_work_is_done_once(tiny_model, shape_images):
    config = ScoringConfig.from_preset("discffusion", num_timesteps=2)
    scorer = Scorer(tiny_model, config, batch_size=4)
    calls = {"text": 0, "vae": 0}
    handles = [
        tiny_model.text_encoder.register_forward_pre_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
        tiny_model.vae.encoder.register_forward_pre_hook(lambda *a, **k: calls.__setitem__("vae", calls["vae"] + 1)),
    ]
    try:
        images = shape_images[:3] + [shape_images[0]]  # a duplicate image
        captions = CAPTIONS[:2] + [CAPTIONS[0]]  # a duplicate caption
        out = scorer.score_matrix(images, captions)
        # unique: 3 images x 2 captions; unconditional pass once per (image, timestep): 3*2 + 3*2*2.
        assert out.unet_evaluations == 3 * 2 + 3 * 2 * 2
        assert out.scores.shape == (4, 3)
        np.testing.assert_array_equal(out.scores[3], out.scores[0])
        np.testing.assert_array_equal(out.scores[:, 2], out.scores[:, 0])
        again = scorer.score_matrix(images[:2], captions[:1])
        assert again.unet_evaluations == 2 * 2  # unconditional terms cached: only the new pairs run
        np.testing.assert_array_equal(again.scores[:, 0], out.scores[:2, 0])
    finally:
        for handle in handles:
            handle.remove()
    assert calls["vae"] == 1  # one batch holding the 3 unique images
    assert calls["text"] == 2  # the 2 unique captions (one batch) and the empty caption


def test_normalisation_and_uncond_rows_are_consistent(tiny_model, shape_images):
    base = ScoringConfig.from_preset("discffusion", num_timesteps=2, denoise_term=False)
    plain = Scorer(tiny_model, base).score_matrix(shape_images[:3], CAPTIONS)
    normalised = Scorer(tiny_model, base.replace(normalize="uncond")).score_matrix(shape_images[:3], CAPTIONS)
    mixed = Scorer(tiny_model, base.replace(uncond_in_attention=True)).score_matrix(shape_images[:3], CAPTIONS)
    empty_score = plain.layer_scores - normalised.layer_scores  # [N, M, L]: the empty caption's, per image
    # The empty caption's score depends on the image only...
    np.testing.assert_allclose(empty_score, np.repeat(empty_score[:, :1], len(CAPTIONS), axis=1), atol=1e-6)
    assert np.ptp(empty_score[:, 0].mean(-1)) > 1e-5
    # ...and B3 averages the conditional and unconditional rows.
    np.testing.assert_allclose(mixed.layer_scores, 0.5 * (plain.layer_scores + empty_score), atol=1e-6)
    np.testing.assert_allclose(plain.scores, plain.layer_scores.mean(-1), atol=1e-9)


def test_denoise_term_is_added_and_switchable(tiny_model, shape_images):
    with_term = Scorer(tiny_model, ScoringConfig(num_timesteps=2)).score_matrix(shape_images[:2], CAPTIONS[:2])
    without = Scorer(tiny_model, ScoringConfig(num_timesteps=2, denoise_term=False)).score_matrix(
        shape_images[:2], CAPTIONS[:2]
    )
    assert without.denoise is None
    np.testing.assert_allclose(with_term.scores, without.scores + with_term.denoise, atol=1e-6)
    assert np.abs(with_term.denoise).max() > 0


def test_the_attention_term_can_be_left_out_of_the_score(tiny_model, shape_images):
    """`attention_term` off: the score is the denoising term alone (Diffusion Classifier's score), checked against
    two other runs (the full score minus the attention-only score); the attention terms are still computed and
    reported; off without the denoising term is refused."""
    images, captions = shape_images[:2], CAPTIONS[:3]
    full = Scorer(tiny_model, ScoringConfig(num_timesteps=2)).score_matrix(images, captions)
    attention_only = Scorer(tiny_model, ScoringConfig(num_timesteps=2, denoise_term=False)).score_matrix(
        images, captions
    )
    alone = Scorer(tiny_model, ScoringConfig(num_timesteps=2, attention_term=False)).score_matrix(images, captions)
    np.testing.assert_allclose(alone.scores, full.scores - attention_only.scores, atol=1e-6)
    np.testing.assert_allclose(alone.layer_scores, full.layer_scores, atol=1e-9)
    assert np.abs(attention_only.scores).max() > 1e-3  # the term left out counts in the full score
    # Adaptive ranking runs other batches than exhaustive scoring: compare on one thread, where fp32 kernels do not
    # split their sums by thread count (two threads moved one denoising term, a difference of two norms, by 1.9e-6).
    with one_torch_thread():
        exhaustive = Scorer(tiny_model, ScoringConfig(num_timesteps=2, attention_term=False)).score_matrix(
            images, captions
        )
        ranked = Scorer(tiny_model, ScoringConfig(num_timesteps=2, attention_term=False)).rank_matrix(
            images, captions, top_k=1, schedule="keep=2,1:steps=1,all"
        )
    np.testing.assert_allclose(ranked.scores[ranked.exact], exhaustive.scores[ranked.exact], atol=1e-6)
    with pytest.raises(ConfigError, match="without a term"):
        ScoringConfig(attention_term=False, denoise_term=False)


def test_truncation_is_counted(tiny_model, shape_images):
    long_caption = " ".join(["red"] * 100)
    out = Scorer(tiny_model, ScoringConfig(num_timesteps=1)).score_matrix(shape_images[:1], [long_caption, "red"])
    assert out.truncated == [25, 0]


def test_bad_captions_and_configs_are_input_errors(tiny_model, shape_images):
    scorer = Scorer(tiny_model, ScoringConfig(num_timesteps=1))
    with pytest.raises(InputError, match="empty"):
        scorer.score(shape_images[:1], ["   "])
    with pytest.raises(ConfigError, match="tokens=words"):
        Scorer(tiny_model, ScoringConfig(tokens="words", normalize="uncond"))
    with pytest.raises(ConfigError, match="multiple of 64"):
        ScoringConfig(resolution=100)


def test_v_prediction_models_score_epsilon(tiny_model_dir, tmp_path, shape_images):
    """For v-prediction models the denoising term uses ε̂ = sqrt(ā) v̂ + sqrt(1 - ā) x_t."""
    from dsdkit.pytorch.models import load_model

    folder = tmp_path / "vpred"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config_path.read_text())
    scheduler["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(scheduler))
    model = load_model(folder, device="cpu")
    scorer = Scorer(model, ScoringConfig(num_timesteps=1))
    out = scorer.score_matrix(shape_images[:1], CAPTIONS[:1])

    (t,) = scorer.timesteps
    abar = torch.tensor(model.schedule.alphas_cumprod[t], dtype=torch.float64)
    z0 = scorer.encode_images(shape_images[:1])[0].latent[None].double()
    noise = scorer.noise[0][None].double()
    x_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    states = {c: scorer.encode_texts([c])[0].states[None] for c in CAPTIONS[:1]}
    with torch.no_grad():
        v_cond = model.unet(x_t.float(), torch.tensor([t]), encoder_hidden_states=states[CAPTIONS[0]]).sample
        v_empty = model.unet(
            x_t.float(), torch.tensor([t]), encoder_hidden_states=scorer.empty_caption.states[None]
        ).sample
    eps = lambda v: abar.sqrt() * v.double() + (1 - abar).sqrt() * x_t  # noqa: E731
    expected = float((noise - eps(v_empty)).norm() - (noise - eps(v_cond)).norm())
    assert out.denoise[0, 0] == pytest.approx(expected, abs=1e-4)
