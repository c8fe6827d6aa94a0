"""Timestep tables (torch-free, shared by the PyTorch scorer and the bundle runtime)."""

from __future__ import annotations

__all__ = ["discffusion_timesteps", "noise_level_timesteps"]


def discffusion_timesteps(num_steps: int) -> list[int]:
    """The authors' timestep table, made explicit (their pipeline's strength-0.8 start of a 50-step schedule).

    ``idx_k = 10 + k * floor(1000 / S)`` for k = 0, 1, ... while ``idx_k < 990``; ``t_k = 999 - idx_k``; sorted
    ascending. S=10 gives 89, 189, ..., 989; S=30 gives 30 steps from 32; S=50 gives 49 steps.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    rate = 1000 // num_steps
    indices = []
    index = 10
    while index < 990:
        indices.append(index)
        index += rate
    return sorted(999 - i for i in indices)


def noise_level_timesteps(levels: tuple[float, ...]) -> list[int]:
    """Timesteps for noise levels in (0, 1]: ``t = round(level * 999)``, ascending (paper: 0.2, 0.4, 0.6, 0.8)."""
    return sorted(int(round(level * 999)) for level in levels)
