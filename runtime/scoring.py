"""How the per-timestep terms of a pair become its DSD score: one implementation for every backend.

Works on numpy arrays (the runtime) and torch tensors (the PyTorch scorer and the trainer) alike.
"""

from __future__ import annotations

from .config import Normalization, ScoringConfig

__all__ = ["combine_terms", "sum_terms"]


def combine_terms(config: ScoringConfig, layers, errors, uncond_layers=None, uncond_errors=None):
    """Combine per-timestep terms into per-timestep scores, with the switches of ``config``.

    Args:
        layers: ``[P, K, L]`` attention term per pair, timestep and scored layer (conditional pass).
        errors: ``[P, K]`` ``‖ε − ε̂(x_t, c)‖₂``.
        uncond_layers, uncond_errors: the same for the empty caption on each pair's image (needed when
            ``config.needs_unconditional_pass``).

    ``uncond_in_attention`` averages the conditional and unconditional attention terms (the authors' bug B3),
    ``normalize=uncond`` subtracts the empty caption's attention term, ``denoise_term`` adds
    ``‖ε − ε̂(x_t, ∅)‖₂ − ‖ε − ε̂(x_t, c)‖₂``, and ``attention_term`` off leaves the attention term out of the score
    (it is still returned, for layer scores and maps).

    Returns:
        ``(per_step [P, K], attention [P, K, L], denoise [P, K] or None)``; a pair's score is the mean of its
        ``per_step`` over the timesteps it is scored at.
    """
    attention = layers
    if config.uncond_in_attention:
        attention = 0.5 * (attention + uncond_layers)
    if config.normalize is Normalization.uncond:
        attention = attention - uncond_layers
    denoise = uncond_errors - errors if config.denoise_term else None
    return sum_terms(attention, denoise, config.attention_term), attention, denoise


def sum_terms(attention, denoise, attention_term: bool = True):
    """Per-timestep scores from the terms: the attention term's mean over layers (unless ``attention_term`` is off)
    plus the denoising term (when there is one). NumPy arrays or torch tensors; the one place the terms are added,
    for :func:`combine_terms` and :attr:`~dsdkit.runtime.encodings.ScoreOutput.per_step`."""
    if not attention_term:
        return denoise  # the config refuses attention_term off without the denoising term
    pooled = attention.mean(-1)
    return pooled if denoise is None else pooled + denoise
