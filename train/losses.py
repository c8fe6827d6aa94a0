"""Training losses over DSD scores. Their few calibration parameters train with the adapter and are checkpointed,
but never change a ranking: they are not part of the adapter file."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CandidateLoss"]


class CandidateLoss(nn.Module):
    """Loss of one example from its candidates' scores.

    - ``ce``: softmax cross-entropy over the candidates of ``exp(log_scale) * s`` (the scale is learned, from 100:
      zero-shot DSD scores of different captions differ by ~1e-3 to 1e-1, so unscaled logits would barely move).
    - ``bce`` (paper Eq. 6): ``BCE(σ(a·s + b), y)`` per candidate (positive 1, others 0) or per labelled pair, with a
      learned affine calibration ``a = exp(log_a)`` (from 100) and ``b``, set on the first batch so that
      ``σ`` starts at 0.5 on average.
    - ``hinge`` (the authors'): ``max(0, max_{j≠+} s_j − s_+ + margin)``.
    """

    def __init__(self, kind: str, margin: float = 0.1):
        super().__init__()
        self.kind = kind
        self.margin = margin
        self.log_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.bias = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("bias_initialised", torch.tensor(0.0))

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * scores + self.bias

    def forward(self, scores: torch.Tensor, positive: int | None = None, label: int | None = None) -> torch.Tensor:
        """``scores``: ``[K]`` candidate scores (or ``[1]`` for a labelled pair)."""
        if self.kind == "bce":
            if not bool(self.bias_initialised):
                with torch.no_grad():
                    self.bias.copy_(-self.log_scale.exp() * scores.detach().mean())
                    self.bias_initialised.fill_(1.0)
            if positive is not None:
                targets = torch.zeros_like(scores)
                targets[positive] = 1.0
            else:
                targets = torch.full_like(scores, float(label))
            return nn.functional.binary_cross_entropy_with_logits(self.calibrated(scores), targets)
        if positive is None:
            raise ValueError(f"loss {self.kind} needs candidate sets; labelled pairs need the bce loss")
        if self.kind == "ce":
            logits = self.log_scale.exp() * scores
            return nn.functional.cross_entropy(logits[None], torch.tensor([positive], device=scores.device))
        negatives = torch.cat([scores[:positive], scores[positive + 1 :]])
        return torch.clamp(negatives.max() - scores[positive] + self.margin, min=0.0)

    def correct(self, scores: torch.Tensor, positive: int | None = None, label: int | None = None) -> bool:
        """Whether the example is right: the positive strictly beats every other candidate, or the calibrated
        pair probability is on the label's side of 0.5."""
        if positive is None:
            return bool((self.calibrated(scores.detach())[0] > 0) == bool(label))
        others = torch.cat([scores[:positive], scores[positive + 1 :]])
        return bool((scores[positive] > others).all())
