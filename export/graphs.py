"""The torch modules that are exported: thin wrappers over the scorer's own code path (no re-implementation).

Adapters are folded before export: LoRA and the static part of kv-prompt (``B · diag(p) · A``) are merged into a
copy of the UNet's weights; kv-prompt's image-conditioned part ``B · diag(m_θ(x)) · A`` stays as a few ops in the
scorer, fed by ``condition = m_θ(x)``, which the image encoder computes.

``precision="fp16"`` exports the scorer with fp16 weights and activations and fp32 islands where scores are made:
the scoring processors compute ``QKᵀ/√d``, the softmax and the LogSumExp pooling in fp32, and the layer means, the
noise error and the outputs are fp32 (see :mod:`dsdkit.pytorch.forward`).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..pytorch.adapters import Adapter, AdapterConfig, FoldedConditionedAdapter, image_feature
from ..pytorch.forward import Noising, ScoringForward
from ..pytorch.models import Precision, SD2Model

__all__ = ["TextEncoderGraph", "ImageEncoderGraph", "ScorerGraph", "ClipImageGraph", "ClipTextGraph", "fold_adapter"]


class ClipImageGraph(nn.Module):
    """A CLIP model's image tower: processed pixels -> L2-normalised embeddings (the shortlist's)."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixels):
        from ..pytorch.clip import projected

        return torch.nn.functional.normalize(projected(self.clip.get_image_features(pixel_values=pixels)), dim=-1)


class ClipTextGraph(nn.Module):
    """A CLIP model's text tower: token ids -> L2-normalised embeddings."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids):
        from ..pytorch.clip import projected

        return torch.nn.functional.normalize(projected(self.clip.get_text_features(input_ids=input_ids)), dim=-1)


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids).last_hidden_state


class ImageEncoderGraph(nn.Module):
    """Pixels in [-1, 1] -> ``z0`` (VAE posterior mean x scaling factor) and, for kv-prompt, ``m_θ(x)``."""

    def __init__(self, vae, scaling_factor: float, meta: nn.Module | None = None, feature_grid: int | None = None):
        super().__init__()
        self.vae = vae
        self.scaling_factor = scaling_factor
        self.meta = meta
        self.feature_grid = feature_grid

    def forward(self, pixels):
        latents = self.vae.encode(pixels).latent_dist.mean * self.scaling_factor
        if self.meta is None:
            return latents
        return latents, self.meta(_exportable_feature(latents, self.feature_grid))


def _exportable_feature(latents, grid: int):
    """:func:`dsdkit.pytorch.adapters.image_feature` as a fixed-window average pool when the latent side divides
    evenly (the same averages; the TorchScript exporter cannot export adaptive pooling over a dynamic batch)."""
    side = latents.shape[-1]
    if latents.shape[-2] == side and side % grid == 0:
        return torch.nn.functional.avg_pool2d(latents.float(), side // grid).flatten(1)
    return image_feature(latents, grid)


def fold_adapter(
    model: SD2Model, adapter: Adapter | None, precision: Precision
) -> tuple[SD2Model, Adapter | None, nn.Module | None]:
    """A model whose UNet carries the adapter's foldable part (a copy when anything changes), the adapter's
    remaining image-conditioned part, and the meta-network for the image graph."""
    folded = adapter.fold() if adapter is not None else None
    changes = bool(folded and folded.weight_deltas) or precision is not model.precision
    unet = copy.deepcopy(model.unet) if changes else model.unet
    if folded is not None:
        with torch.no_grad():
            for name, delta in folded.weight_deltas.items():
                layer = unet.get_submodule(name + ".0" if name.endswith("to_out") else name)
                layer.weight += delta.to(layer.weight.device, layer.weight.dtype)
    if precision is not model.precision:
        unet = unet.to(precision.torch_dtype)
    remainder, meta = None, None
    if folded is not None and folded.conditioned:
        remainder = FoldedConditionedAdapter(folded, AdapterConfig.from_dict(adapter.config.to_dict()))
        meta = copy.deepcopy(adapter.meta).float()
    return dataclasses.replace(model, unet=unet, precision=precision), remainder, meta


class ScorerGraph(nn.Module):
    """One timestep of DSD for a batch of pairs; the noise schedule and the noise bank are constants."""

    def __init__(
        self, model: SD2Model, layer_names: list[str], config, noise_bank: torch.Tensor, adapter: Adapter | None = None
    ):
        super().__init__()
        self.model = model
        self.unet = model.unet
        self.adapter = adapter
        self.scoring_forward = ScoringForward(model, config, adapter, layer_names)
        abar = torch.tensor(model.schedule.alphas_cumprod, dtype=torch.float64)
        self.register_buffer("signal", abar.sqrt().float())
        self.register_buffer("noise_scale", (1.0 - abar).sqrt().float())
        self.register_buffer("noise_bank", noise_bank.float())

    def forward(self, latents, states, token_mask, timestep, noise_index, condition=None):
        noising = Noising(self.signal[timestep], self.noise_scale[timestep], self.noise_bank[noise_index], timestep)
        layers, error = self.scoring_forward(latents, noising, states, token_mask, condition=condition, autocast=False)
        return layers.mean(dim=-1), layers, error
