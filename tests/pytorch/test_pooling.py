"""Pooling math: LogSumExp stability, token masks, and Eq. 7 head weights (closed form vs autograd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dsdkit.runtime.config import HeadWeighting, Pooling, ScoringConfig, TokenSet
from dsdkit.runtime.tokenizer import ROLE_BOS, ROLE_EOS, ROLE_PAD, ROLE_WORD

from dsdkit.pytorch.pooling import dynamic_head_weights, image_lse, pool_layer, text_lse, token_mask


def roles_for(num_words: int, length: int = 77) -> torch.Tensor:
    roles = torch.full((length,), ROLE_PAD)
    roles[0] = ROLE_BOS
    roles[1 : 1 + num_words] = ROLE_WORD
    roles[1 + num_words] = ROLE_EOS
    return roles


def test_token_masks_keep_exactly_the_intended_positions():
    roles = roles_for(3)
    assert token_mask(roles, TokenSet.all).sum() == 77
    assert torch.nonzero(token_mask(roles, TokenSet.words_eos)).flatten().tolist() == [1, 2, 3, 4]
    assert torch.nonzero(token_mask(roles, TokenSet.words)).flatten().tolist() == [1, 2, 3]


def test_masked_positions_do_not_influence_the_score():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 77)
    mask = token_mask(torch.stack([roles_for(3), roles_for(6)]), TokenSet.words_eos)
    probs = logits.softmax(-1)
    base_text = text_lse(logits, mask, 1.0)
    base_image = image_lse(probs, mask, 5.0)
    # Changing only masked positions leaves both poolings unchanged...
    noisy = logits + 50.0 * (1 - mask)[:, None, None, :] * torch.randn_like(logits)
    torch.testing.assert_close(text_lse(noisy, mask, 1.0), base_text, rtol=0, atol=0)
    noisy_probs = probs + (1 - mask)[:, None, None, :] * torch.rand_like(probs)
    torch.testing.assert_close(image_lse(noisy_probs, mask, 5.0), base_image, rtol=0, atol=0)
    # ...while changing one kept position changes them.
    bumped = logits.clone()
    bumped[..., 2] += 3.0
    assert not torch.allclose(text_lse(bumped, mask, 1.0), base_text)


def test_text_lse_matches_direct_formula_and_is_stable_for_large_logits():
    torch.manual_seed(1)
    logits = torch.randn(1, 2, 4, 77, dtype=torch.float64)
    mask = torch.ones(1, 77, dtype=torch.float64)
    direct = torch.log(torch.exp(logits).sum(-1)).mean(-1)
    torch.testing.assert_close(text_lse(logits, mask, 1.0), direct)
    huge = logits.float() * 1e4 + 5e4  # exp() of these overflows float32 and float64
    out = text_lse(huge, mask.float(), 1.0)
    assert torch.isfinite(out).all()
    # LSE of large values approaches the max; check against the shifted closed form.
    expected = (huge.max(-1).values + torch.log(torch.exp(huge - huge.max(-1, keepdim=True).values).sum(-1))).mean(-1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    lam_out = text_lse(huge, mask.float(), 5.0)
    assert torch.isfinite(lam_out).all()


def test_image_lse_is_stable_with_large_lambda():
    probs = torch.softmax(torch.randn(1, 2, 64, 77) * 10, dim=-1)
    out = image_lse(probs, torch.ones(1, 77), 1e4)
    assert torch.isfinite(out).all()
    # With λ -> ∞, (1/λ) LSE_i λ P_ij -> max_i P_ij.
    torch.testing.assert_close(out, probs.max(dim=2).values.mean(-1), rtol=1e-3, atol=1e-3)


def autograd_weights(probs: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 7 with autograd: f = mean_h f_h, Attr_h = P_h * ∂f/∂P_h, weights = Σ Attr_h / Σ_h Σ Attr_h."""
    out = []
    for b in range(probs.shape[0]):
        leaf = probs[b].detach().double().requires_grad_(True)  # [H, n, T]
        per_token = torch.logsumexp(lam * leaf, dim=1) / lam
        f_h = (per_token * mask[b].double()).sum(-1) / mask[b].double().sum()
        (grad,) = torch.autograd.grad(f_h.mean(), leaf)
        attribution = (leaf * grad).sum(dim=(1, 2))
        out.append(attribution / attribution.sum())
    return torch.stack(out)


def test_closed_form_head_weights_equal_autograd_on_real_attention(tiny_model, shape_images):
    """Capture real cross-attention maps of the tiny model and compare both formulations of Eq. 7."""
    from dsdkit.pytorch.forward import ForwardCall
    from dsdkit.pytorch.scorer import Scorer

    captured = []
    original = ForwardCall.record

    def spy(self, index, logits, probs):
        captured.append((index, probs.detach().clone(), self.mask.clone()))
        return original(self, index, logits, probs)

    config = ScoringConfig.from_preset("paper", noise_levels=(0.5,))
    scorer = Scorer(tiny_model, config, batch_size=4)
    ForwardCall.record = spy
    try:
        scorer.score_pairs(shape_images[:2], ["a red circle", "a blue square on a wooden table"], [(0, 0), (1, 1)])
    finally:
        ForwardCall.record = original
    multi_head = [(i, p, m) for i, p, m in captured if p.shape[1] > 1]
    assert multi_head, "the tiny model must have multi-head cross-attention layers"
    for _, probs, mask in multi_head:
        closed = dynamic_head_weights(probs, mask, config.lse_lambda)
        torch.testing.assert_close(
            closed.double(), autograd_weights(probs, mask, config.lse_lambda), rtol=1e-5, atol=1e-7
        )
        heads = probs.shape[1]
        # Not uniform...
        assert (closed - 1.0 / heads).abs().max() > 1e-4
        # ...and different between the two pairs of the batch.
        assert (closed[0] - closed[1]).abs().max() > 1e-5
    # pool_layer uses them: the layer score is the weighted sum of the per-head scores.
    _, probs, mask = multi_head[-1]
    score, per_head, weights = pool_layer(torch.log(probs), probs, mask, config)
    torch.testing.assert_close(score, (weights * per_head).sum(-1))


@pytest.mark.parametrize("pooling", [Pooling.text_lse, Pooling.image_lse])
def test_uniform_heads_are_the_plain_mean(pooling):
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 6, 77)
    probs = logits.softmax(-1)
    mask = torch.ones(3, 77)
    config = ScoringConfig(pooling=pooling, heads=HeadWeighting.uniform, lse_lambda=2.0)
    score, per_head, _ = pool_layer(logits, probs, mask, config)
    torch.testing.assert_close(score, per_head.mean(-1))
    np.testing.assert_array_equal(per_head.shape, (3, 4))
