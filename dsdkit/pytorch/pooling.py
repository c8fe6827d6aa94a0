"""Pooling one cross-attention layer's maps into one score per pair (pure tensor ops, exportable).

Notation for one layer, one pair: ``L`` = ``QKᵀ/√d`` (n image tokens x 77 text tokens, per head h),
``P = softmax_j(L)`` (the attention the UNet really uses), ``m_j`` = 1 for the text positions the token set keeps.

- ``text-lse`` (authors' code): ``f_h = mean_i (1/λ) log Σ_j m_j exp(λ L_ij)``.
- ``image-lse`` (paper Eq. 3-4): ``S_j = (1/λ) log Σ_i exp(λ P_ij)``; ``f_h = Σ_j m_j S_j / Σ_j m_j``.
- heads ``uniform``: layer score ``mean_h f_h``.
- heads ``dynamic`` (paper Eq. 7, closed form): with ``f = mean_h f_h``,
  ``Attr_h = P_h ⊙ ∂f/∂P_h`` and ``∂S_j/∂P_ij = softmax_i(λ P_:j)``, so
  ``Σ_ij Attr_h = (1 / (H Σm)) Σ_j m_j Σ_i P_ij softmax_i(λ P_:j)_i``; ``w_h = Σ_ij Attr_h / Σ_h' Σ_ij Attr_h'``;
  layer score ``Σ_h w_h f_h``. All terms are positive, so the weights are well defined.

Everything is computed in fp32 whatever the UNet's precision (the "fp32 islands" of the export).
"""

from __future__ import annotations

import torch

from ..runtime.config import HeadWeighting, Pooling, ScoringConfig, TokenSet
from ..runtime.tokenizer import token_mask as runtime_token_mask

__all__ = ["token_mask", "text_lse", "image_lse", "dynamic_head_weights", "pool_layer"]


def token_mask(roles: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """float32 mask ``[..., T]``: 1 where the token set keeps a position (see :func:`runtime.tokenizer.token_mask`)."""
    return torch.from_numpy(runtime_token_mask(roles.cpu().numpy(), TokenSet(tokens).value)).to(roles.device)


def text_lse(logits: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """``[B, H, n, T]`` logits, ``[B, T]`` mask -> ``[B, H]`` per-head ``mean_i (1/λ) LSE_j λ L_ij`` over kept j."""
    # log(0) = -inf drops a position from the LogSumExp exactly; logsumexp is stable for any finite logits.
    log_mask = torch.log(mask)[:, None, None, :]
    lse = torch.logsumexp(lam * logits + log_mask, dim=-1) / lam
    return lse.mean(dim=-1)


def image_lse(probs: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """``[B, H, n, T]`` probabilities -> ``[B, H]`` per-head mean over kept j of ``(1/λ) LSE_i λ P_ij``."""
    per_token = torch.logsumexp(lam * probs, dim=2) / lam  # [B, H, T]
    return (per_token * mask[:, None, :]).sum(dim=-1) / mask.sum(dim=-1)[:, None]


def dynamic_head_weights(probs: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """``[B, H]`` head weights of paper Eq. 7 for image-lse pooling, in closed form (see the module docstring)."""
    sharpened = torch.softmax(lam * probs, dim=2)  # ∂S_j/∂P_ij, a softmax over image tokens i
    attribution = (probs * sharpened).sum(dim=2)  # [B, H, T]
    # The common factor 1/(H Σm) of ∂f/∂P cancels in the normalisation below.
    per_head = (attribution * mask[:, None, :]).sum(dim=-1)
    return per_head / per_head.sum(dim=-1, keepdim=True)


def pool_layer(logits: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, config: ScoringConfig):
    """One layer's score per pair.

    Args:
        logits: ``float32[B, H, n, T]`` scaled logits ``QKᵀ/√d``.
        probs: ``float32[B, H, n, T]`` ``softmax_j(logits)``.
        mask: ``float32[B, T]`` kept text positions.
        config: pooling, λ and head weighting.

    Returns:
        ``(score [B], per_head [B, H], head_weights [B, H])``.
    """
    lam = float(config.lse_lambda)
    if config.pooling is Pooling.text_lse:
        per_head = text_lse(logits, mask, lam)
    else:
        per_head = image_lse(probs, mask, lam)
    if config.heads is HeadWeighting.dynamic:
        weights = dynamic_head_weights(probs, mask, lam)
    else:
        weights = torch.full_like(per_head, 1.0 / per_head.shape[-1])
    return (weights * per_head).sum(dim=-1), per_head, weights
