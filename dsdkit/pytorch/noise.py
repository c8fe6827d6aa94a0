"""Timesteps, the noise schedule and the fixed, seeded noise bank.

Every pair is noised with the same ε_k at the k-th timestep, so paired comparisons share their noise and a score
never depends on what else is being scored. The bank is drawn on the CPU from a seeded generator, one entry at a
time, so entry k is the same whatever the number of timesteps, the batch or the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..runtime.errors import ModelError
from ..runtime.timesteps import discffusion_timesteps, noise_level_timesteps

# The timestep tables live in runtime/timesteps.py (a config's own: ScoringConfig.timestep_table); re-exported here.
__all__ = ["discffusion_timesteps", "noise_level_timesteps", "DiffusionProcess", "noise_bank"]


@dataclass(frozen=True)
class DiffusionProcess:
    """The DDPM forward process of a model's scheduler config: ``x_t = sqrt(ā_t) z0 + sqrt(1 - ā_t) ε``."""

    alphas_cumprod: np.ndarray  # float64[num_train_timesteps]

    @classmethod
    def from_scheduler_config(cls, config: dict) -> DiffusionProcess:
        """ā from ``scheduler_config.json`` (``scaled_linear`` for SD2; ``linear`` also supported)."""
        steps = int(config.get("num_train_timesteps", 1000))
        beta_start = float(config.get("beta_start", 0.00085))
        beta_end = float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
        else:
            raise ModelError(
                f"scheduler beta_schedule {kind!r} is not supported; SD2 uses 'scaled_linear' "
                "(check scheduler_config.json)"
            )
        return cls(np.cumprod(1.0 - betas))

    def coefficients(self, timesteps: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(sqrt(ā_t), sqrt(1 - ā_t))`` for each timestep, float64."""
        abar = self.alphas_cumprod[np.asarray(timesteps, dtype=np.int64)]
        return np.sqrt(abar), np.sqrt(1.0 - abar)


def noise_bank(seed: int, count: int, latent_shape: tuple[int, int, int]):
    """``count`` standard-normal latents ``float32[count, C, H, W]``; entry k depends only on (seed, k, shape)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.stack([torch.randn(latent_shape, generator=generator, dtype=torch.float32) for _ in range(count)])


def __getattr__(name: str):
    # Renamed classes answer their old names, with a DeprecationWarning (dsdkit/_moved.py).
    from .._moved import renamed_attribute

    return renamed_attribute("dsdkit.pytorch.noise", name, globals())
