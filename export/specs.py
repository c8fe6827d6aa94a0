"""One export spec per graph: names, dtypes, shapes with the dynamic batch axis, dummy inputs, the TensorRT
min/opt/max profile, and the parity tolerance of every output (optimum's OnnxConfig + TensorRT demo's profiles).

Graphs (inputs -> outputs):

- ``text_encoder``: ``input_ids int64[B, 77]`` -> ``states float32[B, 77, D]``
- ``image_encoder``: ``pixels float32[B, 3, R, R]`` -> ``latents float32[B, C, h, w]`` (+ ``condition float32[B, r]``
  for kv-prompt)
- ``scorer``: ``latents``, ``states``, ``token_mask float32[B, 77]``, ``timestep int64[B]``, ``noise_index int64[B]``
  (+ ``condition``) -> ``attention float32[B]``, ``layer_scores float32[B, L]``, ``noise_error float32[B]``

The scorer holds the noise schedule for all 1000 timesteps and a seeded noise bank as constants; ``timestep`` and
``noise_index`` select from them, so one graph serves any number of timesteps S up to the bank's size. The
unconditional pass is the same scorer graph fed the empty caption's states (no second copy of the UNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TensorSpec", "ExportSpec", "graph_specs", "clip_specs", "BATCH", "CLIP_GRAPHS"]

#: The shortlist's graphs (``dsdkit export --shortlist``): a CLIP model's image and text towers.
CLIP_GRAPHS = ("clip_image_encoder", "clip_text_encoder")

BATCH = "batch"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "int64"
    shape: tuple  # ints, with BATCH for the dynamic first axis

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else d for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class ExportSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # output name -> (atol, rtol) for the fp32 graph against fp32 PyTorch
    tolerance: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dummy_inputs(self, batch: int, make) -> tuple:
        """Example inputs; ``make(spec, shape)`` builds one tensor (so the spec stays free of torch)."""
        return tuple(make(t, t.concrete(batch)) for t in self.inputs)

    def profile(self, batch: tuple[int, int, int]) -> dict[str, dict[str, list[int]]]:
        """TensorRT optimisation profile: ``{input: {"min", "opt", "max"}}`` over the batch axis."""
        return {
            t.name: {key: list(t.concrete(b)) for key, b in zip(("min", "opt", "max"), batch, strict=True)}
            for t in self.inputs
        }

    def to_dict(self, file: str, batch: tuple[int, int, int]) -> dict[str, Any]:
        return {
            "file": file,
            "inputs": {t.name: t.to_dict() for t in self.inputs},
            "outputs": {t.name: t.to_dict() for t in self.outputs},
            "dynamic_axes": {t.name: {"0": BATCH} for t in self.inputs + self.outputs},
            "profile": self.profile(batch),
            "tolerance": {name: {"atol": a, "rtol": r} for name, (a, r) in self.tolerance.items()},
        }


def clip_specs(image_size: int, text_length: int, dimension: int) -> dict[str, ExportSpec]:
    """The shortlist's two graphs: L2-normalised embeddings of images (the CLIP processor's pixels) and captions."""
    embeddings = TensorSpec("embeddings", "float32", (BATCH, dimension))
    return {
        "clip_image_encoder": ExportSpec(
            "clip_image_encoder",
            [TensorSpec("pixels", "float32", (BATCH, 3, image_size, image_size))],
            [embeddings],
            tolerance={"embeddings": (1e-4, 1e-4)},
        ),
        "clip_text_encoder": ExportSpec(
            "clip_text_encoder",
            [TensorSpec("input_ids", "int64", (BATCH, text_length))],
            [embeddings],
            tolerance={"embeddings": (1e-4, 1e-4)},
        ),
    }


def graph_specs(model, resolution: int, num_layers: int, condition_size: int | None) -> dict[str, ExportSpec]:
    """The three graphs' specs for ``model`` (an :class:`~dsdkit.pytorch.models.SD2Model`)."""
    hidden = int(model.text_encoder.config.hidden_size)
    length = model.tokenizer.max_length
    latent_size = resolution // model.vae_scale_factor
    latents = TensorSpec("latents", "float32", (BATCH, model.latent_channels, latent_size, latent_size))
    condition = [TensorSpec("condition", "float32", (BATCH, condition_size))] if condition_size else []
    states = TensorSpec("states", "float32", (BATCH, length, hidden))
    return {
        "text_encoder": ExportSpec(
            "text_encoder",
            [TensorSpec("input_ids", "int64", (BATCH, length))],
            [states],
            tolerance={"states": (1e-4, 1e-4)},
        ),
        "image_encoder": ExportSpec(
            "image_encoder",
            [TensorSpec("pixels", "float32", (BATCH, 3, resolution, resolution))],
            [latents, *condition],
            # The VAE encoder is deep and GroupNorm amplifies fp32 rounding on smooth image regions; latents have unit
            # variance, so 1e-3 is 0.1% of their scale (an export mistake shows up as O(1) differences).
            tolerance={"latents": (1e-3, 1e-3), "condition": (1e-3, 1e-3)},
        ),
        "scorer": ExportSpec(
            "scorer",
            [
                latents,
                states,
                TensorSpec("token_mask", "float32", (BATCH, length)),
                TensorSpec("timestep", "int64", (BATCH,)),
                TensorSpec("noise_index", "int64", (BATCH,)),
                *condition,
            ],
            [
                TensorSpec("attention", "float32", (BATCH,)),
                TensorSpec("layer_scores", "float32", (BATCH, num_layers)),
                TensorSpec("noise_error", "float32", (BATCH,)),
            ],
            tolerance={"attention": (1e-5, 1e-5), "layer_scores": (1e-5, 1e-5), "noise_error": (1e-4, 1e-5)},
        ),
    }
