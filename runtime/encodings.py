"""What an engine computes once and what it returns: per-image and per-caption encodings, and per-timestep score
terms. Plain data, shared by the engine interface (:mod:`.engine`) and everything that ranks with it
(:mod:`.adaptive`), so that neither imports the other's module for its types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import ConfigError
from .scoring import sum_terms
from .tokenizer import TokenizedText

__all__ = ["ImageEncoding", "TextEncoding", "ScoreOutput", "ProgressCallback"]

#: ``progress(n)`` is called after each batch with the number of UNet (scorer-graph) evaluations it ran.
ProgressCallback = Callable[[int], None]


@dataclass
class ImageEncoding:
    """One image's cached work: ``z0`` and, for image-conditioned adapters of a bundle, their condition."""

    key: str  # sha1 of the preprocessed pixels: identical pixels share one encoding
    latent: Any  # the engine's array (a torch tensor on the Scorer, numpy on the Matcher)
    condition: Any = None


@dataclass
class TextEncoding:
    """One caption's cached work: token ids and roles, text states and the kept-token mask."""

    text: str
    tokens: TokenizedText
    states: Any
    mask: Any


@dataclass
class ScoreOutput:
    """Per-timestep terms of scored pairs (or of a matrix), and the scores they make.

    Attributes:
        attention_steps: ``float64[..., K, L]`` attention term per timestep and scored layer, after the config's
            unconditional mixing and normalisation (the leading axes are ``[P]`` for pairs, ``[N, M]`` for a matrix).
        denoise_steps: ``float64[..., K]`` the denoising term per timestep, or ``None`` when it is off.
        steps: the timestep indices (positions in the engine's :attr:`~Engine.timesteps`) of the K axis.
        timesteps: the timesteps ``t`` of those indices.
        layer_names: the scored cross-attention layers.
        truncated: per caption, word tokens dropped beyond the text encoder's context.
        unet_evaluations: UNet (scorer-graph) sample-evaluations this call ran; cached work is not counted.
        unconditional_evaluations: those of them that were the empty caption's (the unconditional pass).
    """

    attention_steps: np.ndarray
    denoise_steps: np.ndarray | None
    steps: list[int]
    timesteps: list[int]
    layer_names: list[str]
    truncated: list[int] = field(default_factory=list)
    unet_evaluations: int = 0
    unconditional_evaluations: int = 0
    attention_in_score: bool = True  # the config's attention_term: off, the score is the denoising term alone

    @property
    def per_step(self) -> np.ndarray:
        """``float64[..., K]``: each timestep's score (mean attention term over layers unless the config leaves it
        out, plus the denoising term)."""
        return np.array(sum_terms(self.attention_steps, self.denoise_steps, self.attention_in_score))  # a copy

    @property
    def scores(self) -> np.ndarray:
        """``float64[...]``: the DSD score, the mean of :attr:`per_step` over the timesteps held."""
        return self.per_step.mean(-1)

    @property
    def layer_scores(self) -> np.ndarray:
        """``float64[..., L]``: the attention term per layer, mean over the timesteps held."""
        return self.attention_steps.mean(-2)

    @property
    def denoise(self) -> np.ndarray | None:
        """``float64[...]``: the denoising term, mean over the timesteps held (``None`` when off)."""
        return None if self.denoise_steps is None else self.denoise_steps.mean(-1)

    def at(self, steps: Sequence[int]) -> ScoreOutput:
        """The terms of a subset of the timestep indices held (scores then average over that subset only)."""
        where = {s: i for i, s in enumerate(self.steps)}
        missing = [s for s in steps if s not in where]
        if missing:
            raise ConfigError(f"timestep indices {missing} were not scored (held: {self.steps})")
        index = [where[s] for s in steps]
        return replace(
            self,
            attention_steps=self.attention_steps[..., index, :],
            denoise_steps=None if self.denoise_steps is None else self.denoise_steps[..., index],
            steps=list(steps),
            timesteps=[self.timesteps[i] for i in index],
        )
