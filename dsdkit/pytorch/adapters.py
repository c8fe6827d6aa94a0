"""Few-shot adapters on a frozen SD2 UNet: input-conditioned K/V prompts (the paper's method) and LoRA.

Both are zero-initialised: an untrained adapter adds exact zeros, so it reproduces zero-shot scores bit for bit,
yet gradients reach every trainable tensor from the first step.

``kv-prompt`` (default; paper Eq. 5, made concrete as conditional prompt learning):
    on each scored cross-attention layer, the key and value projections become
    ``W' = W + B · diag(p + m_θ(x)) · A`` (rank r = 8), with ``A`` random, ``B`` zero, the static prompt ``p``
    initialised to ones, and ``m_θ(x)`` an image-conditioned part from a small meta-network shared by all layers:
    ``Linear(256 -> 128) - ReLU - Linear(128 -> r)`` on the image feature ``z0`` average-pooled to 4 x 8 x 8.
    At export ``B · diag(p) · A`` folds into ``W``; ``B · diag(m_θ(x)) · A`` stays as a few small ops.

``lora`` (what the authors' released checkpoints contain):
    rank-r LoRA on to_q / to_k / to_v / to_out of every attention (attn1 and attn2):
    ``W' = W + up · down``, ``down ~ N(0, 1/r²)``, ``up = 0``. Folding is an exact weight merge.

Adapters are saved as safetensors with a JSON header (kind, rank, layers, base-model identity, scoring config,
dsdkit version) and are refused when loaded onto another base model or scoring config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runtime.config import PINNED_KNOBS, ScoringConfig, resolve_scoring
from ..runtime.errors import ConfigError, ModelError
from ..runtime.files import atomic_write_bytes
from ..runtime.schemas import adapter_header
from ..runtime.version import __version__
from .attention import select_layers

__all__ = [
    "AdapterKind",
    "AdapterConfig",
    "Adapter",
    "KVPromptAdapter",
    "LoRAAdapter",
    "FoldedAdapter",
    "FoldedConditionedAdapter",
    "create_adapter",
    "image_feature",
    "save_adapter",
    "adapter_file_bytes",
    "load_adapter",
    "read_adapter_header",
    "read_tensors_safely",
    "import_discffusion_lora",
    "ADAPTER_FORMAT",
]

ADAPTER_FORMAT = "dsdkit-adapter/1"
_PROJECTIONS = ("q", "k", "v", "out")


class AdapterKind(str, Enum):
    kv_prompt = "kv-prompt"
    lora = "lora"


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an adapter (its weights live in the safetensors file)."""

    kind: AdapterKind = AdapterKind.kv_prompt
    rank: int | None = None  # None: 8 for kv-prompt, 4 for lora (the authors' rank)
    feature_grid: int = 8  # kv-prompt: z0 average-pooled to C x grid x grid
    hidden: int = 128  # kv-prompt: meta-network width
    init_seed: int = 0

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", AdapterKind(getattr(self.kind, "value", self.kind)))
        except ValueError:
            raise ConfigError(f"unknown adapter kind {self.kind!r}; choose kv-prompt or lora") from None
        if self.rank is None:
            object.__setattr__(self, "rank", 8 if self.kind is AdapterKind.kv_prompt else 4)
        if self.rank < 1 or self.feature_grid < 1 or self.hidden < 1:
            raise ConfigError("adapter rank, feature_grid and hidden must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: getattr(getattr(self, f.name), "value", getattr(self, f.name)) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}})


def image_feature(latents: torch.Tensor, grid: int) -> torch.Tensor:
    """The kv-prompt image feature: ``z0`` ``[B, C, h, w]`` average-pooled to ``[B, C * grid * grid]``."""
    return torch.nn.functional.adaptive_avg_pool2d(latents.float(), grid).flatten(1)


def _key(name: str) -> str:
    return name.replace(".", "__")


@dataclass
class FoldedAdapter:
    """An adapter as plain weight deltas plus, for kv-prompt, the image-conditioned ops (for export).

    Attributes:
        weight_deltas: ``{"<module>.to_k": ΔW}``: add ``ΔW`` to that linear layer's weight (exact for LoRA; the
            static part ``B · diag(p) · A`` for kv-prompt).
        conditioned: kv-prompt only: ``{"<module>.to_k": (A [r, in], B [out, r])}``, applied at run time as
            ``B · diag(m_θ(x)) · A``.
        meta_network: kv-prompt only: the meta-network's state dict (``Linear - ReLU - Linear``).
        feature_grid: kv-prompt only: pooling grid of the image feature.
    """

    weight_deltas: dict[str, torch.Tensor]
    conditioned: dict[str, tuple[torch.Tensor, torch.Tensor]]
    meta_network: dict[str, torch.Tensor] | None
    feature_grid: int | None


class Adapter(nn.Module):
    """Base class: per-projection deltas for the attention processors of :mod:`dsdkit.pytorch.attention`."""

    kind: AdapterKind

    def __init__(self, config: AdapterConfig, layer_names: list[str]):
        super().__init__()
        self.config = config
        self.layer_names = list(layer_names)

    @property
    def conditioned(self) -> bool:
        """Whether the adapter needs a per-sample image condition (:meth:`condition`, passed to :meth:`delta`)."""
        return False

    def condition(self, latents: torch.Tensor) -> torch.Tensor:
        """The per-sample image condition computed from ``z0`` ``[B, C, h, w]`` (kv-prompt: ``m_θ(x)``, ``[B, r]``)."""
        raise NotImplementedError(f"{type(self).__name__} is not image-conditioned")

    def delta(
        self, module: str, projection: str, inputs: torch.Tensor, condition: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """What to add to ``<module>.to_<projection>(inputs)``, or ``None`` when this adapter does not touch it.

        ``condition`` is the batch's per-sample image condition (from :meth:`condition`) for conditioned adapters;
        it is an argument, not adapter state, so one adapter can serve concurrent forwards.
        """
        raise NotImplementedError

    def fold(self) -> FoldedAdapter:
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flat_state(self) -> dict[str, torch.Tensor]:
        """Tensors under readable names (``<module>.<proj>.<factor>``), as saved in the safetensors file."""
        raise NotImplementedError

    def load_flat_state(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = self.flat_state()
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or unexpected:
            raise ModelError(
                f"adapter tensors do not fit this model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        with torch.no_grad():
            for name, target in expected.items():
                if tensors[name].shape != target.shape:
                    raise ModelError(
                        f"adapter tensor {name} has shape {tuple(tensors[name].shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(tensors[name])


class KVPromptAdapter(Adapter):
    """Input-conditioned key/value prompts on the scored cross-attention layers (see the module docstring)."""

    kind = AdapterKind.kv_prompt

    def __init__(self, config: AdapterConfig, layers: dict[str, tuple[int, int]], latent_channels: int):
        super().__init__(config, list(layers))
        generator = torch.Generator().manual_seed(config.init_seed)
        rank = config.rank
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.p = nn.ParameterDict()
        for name, (in_features, out_features) in layers.items():
            for projection in ("k", "v"):
                key = f"{_key(name)}__{projection}"
                # A maps text states to r numbers of unit scale; B = 0 makes the adapter a no-op at init.
                self.A[key] = nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features**0.5)
                self.B[key] = nn.Parameter(torch.zeros(out_features, rank))
                self.p[key] = nn.Parameter(torch.ones(rank))
        feature_size = latent_channels * config.feature_grid**2
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global generator: seed it locally
            torch.manual_seed(config.init_seed + 1)
            self.meta = nn.Sequential(
                nn.Linear(feature_size, config.hidden), nn.ReLU(), nn.Linear(config.hidden, rank)
            )

    @property
    def conditioned(self) -> bool:
        return True

    def condition(self, latents):
        return self.meta(image_feature(latents, self.config.feature_grid))

    def delta(self, module, projection, inputs, condition=None):
        if projection not in ("k", "v"):
            return None
        key = f"{_key(module)}__{projection}"
        if key not in self.A:
            return None
        if condition is None:
            raise RuntimeError("kv-prompt adapter: delta() needs the batch's condition(z0)")
        scale = self.p[key] + condition  # [B, r]: static prompt plus the image-conditioned part
        low = torch.matmul(inputs, self.A[key].to(inputs.dtype).t()) * scale.to(inputs.dtype)[:, None, :]
        return torch.matmul(low, self.B[key].to(inputs.dtype).t())

    def fold(self) -> FoldedAdapter:
        deltas, conditioned = {}, {}
        for key in self.A:
            module, projection = key.rsplit("__", 1)
            name = f"{module.replace('__', '.')}.to_{projection}"
            A, B, p = self.A[key].detach(), self.B[key].detach(), self.p[key].detach()
            deltas[name] = B @ torch.diag(p) @ A
            conditioned[name] = (A.clone(), B.clone())
        return FoldedAdapter(
            deltas,
            conditioned,
            {k: v.detach().clone() for k, v in self.meta.state_dict().items()},
            self.config.feature_grid,
        )

    def flat_state(self):
        out = {}
        for key in self.A:
            module, projection = key.rsplit("__", 1)
            prefix = f"{module.replace('__', '.')}.{projection}"
            out[f"{prefix}.A"], out[f"{prefix}.B"], out[f"{prefix}.p"] = self.A[key], self.B[key], self.p[key]
        for name, tensor in self.meta.state_dict(keep_vars=True).items():
            out[f"meta.{name}"] = tensor
        return out


class FoldedConditionedAdapter(Adapter):
    """The image-conditioned remainder of a folded kv-prompt adapter, for export: ``B · diag(m) · A`` on K/V, where
    ``m = m_θ(x)`` arrives ready-made (the image graph computes it) and the static ``B · diag(p) · A`` has been
    merged into the weights."""

    kind = AdapterKind.kv_prompt

    def __init__(self, folded: FoldedAdapter, config: AdapterConfig):
        super().__init__(config, sorted({name.rsplit(".", 1)[0] for name in folded.conditioned}))
        self.factors = {name: (A, B) for name, (A, B) in folded.conditioned.items()}

    @property
    def conditioned(self) -> bool:
        return True

    def delta(self, module, projection, inputs, condition=None):
        factors = self.factors.get(f"{module}.to_{projection}")
        if factors is None:
            return None
        A, B = (f.to(inputs.device, inputs.dtype) for f in factors)
        low = torch.matmul(inputs, A.t()) * condition.to(inputs.dtype)[:, None, :]
        return torch.matmul(low, B.t())


class LoRAAdapter(Adapter):
    """Rank-r LoRA on to_q / to_k / to_v / to_out of every attention module (attn1 and attn2)."""

    kind = AdapterKind.lora

    def __init__(self, config: AdapterConfig, modules: dict[str, dict[str, tuple[int, int]]]):
        super().__init__(config, list(modules))
        generator = torch.Generator().manual_seed(config.init_seed)
        rank = config.rank
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for name, projections in modules.items():
            for projection, (in_features, out_features) in projections.items():
                key = f"{_key(name)}__{projection}"
                self.down[key] = nn.Parameter(torch.randn(rank, in_features, generator=generator) / rank)
                self.up[key] = nn.Parameter(torch.zeros(out_features, rank))

    def delta(self, module, projection, inputs, condition=None):
        key = f"{_key(module)}__{projection}"
        if key not in self.down:
            return None
        low = torch.matmul(inputs, self.down[key].to(inputs.dtype).t())
        return torch.matmul(low, self.up[key].to(inputs.dtype).t())

    def fold(self) -> FoldedAdapter:
        deltas = {}
        for key in self.down:
            module, projection = key.rsplit("__", 1)
            deltas[f"{module.replace('__', '.')}.to_{projection}"] = (self.up[key] @ self.down[key]).detach()
        return FoldedAdapter(deltas, {}, None, None)

    def flat_state(self):
        out = {}
        for key in self.down:
            module, projection = key.rsplit("__", 1)
            prefix = f"{module.replace('__', '.')}.{projection}"
            out[f"{prefix}.down"], out[f"{prefix}.up"] = self.down[key], self.up[key]
        return out


def _linear_shape(layer: nn.Linear) -> tuple[int, int]:
    return layer.in_features, layer.out_features


def create_adapter(model, scoring: ScoringConfig, config: AdapterConfig | None = None) -> Adapter:
    """A fresh (zero-initialised) adapter for ``model`` and the scoring config's layers."""
    config = config or AdapterConfig()
    unet = model.unet
    if config.kind is AdapterKind.kv_prompt:
        layers = {}
        for name in select_layers(unet, scoring.layers):
            attention = unet.get_submodule(name)
            layers[name] = (attention.to_k.in_features, attention.to_k.out_features)
        adapter: Adapter = KVPromptAdapter(config, layers, model.latent_channels)
    else:
        modules = {}
        for processor_name in unet.attn_processors:
            name = processor_name.removesuffix(".processor")
            attention = unet.get_submodule(name)
            modules[name] = {
                "q": _linear_shape(attention.to_q),
                "k": _linear_shape(attention.to_k),
                "v": _linear_shape(attention.to_v),
                "out": _linear_shape(attention.to_out[0]),
            }
        adapter = LoRAAdapter(config, modules)
    return adapter.to(model.device)


# -- files ----------------------------------------------------------------------------------------------------


def _header(adapter: Adapter, model_identity: str, scoring: ScoringConfig, extra: dict[str, Any] | None) -> dict:
    return {
        "format": ADAPTER_FORMAT,
        "kind": adapter.kind.value,
        "adapter": adapter.config.to_dict(),
        "layers": adapter.layer_names,
        "base_model": model_identity,
        "scoring": scoring.to_dict(),
        "dsdkit_version": __version__,
        "parameters": adapter.num_parameters(),
        **(extra or {}),
    }


def adapter_file_bytes(
    adapter: Adapter, model_identity: str, scoring: ScoringConfig, extra: dict | None = None
) -> bytes:
    """The bytes of ``adapter``'s file (safetensors with a JSON header), without writing anything."""
    from safetensors.torch import save

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter.flat_state().items()}
    header = _header(adapter, model_identity, scoring, extra)
    return save(tensors, metadata={"dsdkit": json.dumps(header)})


def save_adapter(
    adapter: Adapter, path: str | os.PathLike, model_identity: str, scoring: ScoringConfig, extra: dict | None = None
) -> Path:
    """Write ``adapter`` as safetensors with a JSON header, atomically (a full disk is an ``OutputError``; the file
    under ``path`` before, if any, is left as it was)."""

    atomic_write_bytes(path, adapter_file_bytes(adapter, model_identity, scoring, extra))
    return Path(path)


def read_adapter_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an adapter file (reads only the safetensors header, not the tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelError(
            f"{path}: not a safetensors adapter file ({type(exc).__name__}); re-save or re-train it"
        ) from None
    if "dsdkit" not in metadata:
        raise ModelError(
            f"{path}: safetensors file without a dsdkit adapter header; convert it with `dsdkit adapters`"
        )
    try:
        header = json.loads(metadata["dsdkit"])
    except json.JSONDecodeError:
        raise ModelError(f"{path}: the adapter header is not valid JSON; the file is damaged") from None
    found = header.get("format") if isinstance(header, dict) else None
    if found != ADAPTER_FORMAT:
        raise ModelError(f"{path}: adapter format {found!r} is not {ADAPTER_FORMAT!r}")
    return adapter_header(header, str(path))


#: Knobs that define what a score *is* (:data:`dsdkit.runtime.config.PINNED_KNOBS`): an adapter is trained for one
#: setting of them and refused with another. The others (timesteps, S, the denoising term, normalisation,
#: resizing) are free.
SCORE_DEFINING_KNOBS = PINNED_KNOBS


def check_scoring_matches(path: str | os.PathLike, trained: ScoringConfig, scoring: ScoringConfig) -> None:
    """Refuse to score with an adapter under another definition of the score than it was trained with: the rule
    of :func:`~dsdkit.runtime.config.resolve_scoring`, with ``scoring`` as the explicit knobs over the adapter's
    header.

    Raises:
        ConfigError: one line naming the adapter file, the pinned knobs that differ, and the values it needs.
    """
    resolve_scoring(None, trained, scoring.to_dict(), source=str(path))


def load_adapter(
    path: str | os.PathLike, model, scoring: ScoringConfig | None = None, check_base_model: bool = True
) -> tuple[Adapter, ScoringConfig]:
    """Load an adapter file onto ``model``.

    Returns the adapter and the scoring config it was trained with. ``scoring``, when given, must agree with that
    config on everything the adapter depends on (its layers), or the adapter is refused.

    Raises:
        ModelError: the file is damaged, or was trained on another base model.
        ConfigError: ``scoring`` selects other layers than the adapter was made for.
    """
    from safetensors.torch import load_file

    header = read_adapter_header(path)
    if check_base_model and header.get("base_model") != model.identity():
        raise ModelError(
            f"{path} was trained on another base model (UNet hash {str(header.get('base_model'))[:12]}..., this "
            f"model's is {model.identity()[:12]}...); use the model it was trained on or retrain the adapter"
        )
    trained = ScoringConfig.from_dict(header["scoring"])
    if scoring is not None:
        check_scoring_matches(path, trained, scoring)
    adapter = create_adapter(model, scoring or trained, AdapterConfig.from_dict(header["adapter"]))
    if adapter.layer_names != header["layers"]:
        raise ModelError(f"{path}: the adapter's layers do not exist in this UNet; it belongs to another architecture")
    adapter.load_flat_state({k: v.to(model.device) for k, v in load_file(str(path)).items()})
    return adapter, trained


# -- the authors' released LoRA checkpoints -----------------------------------------------------------------------

_DISCFFUSION_KEY = re.compile(
    r"^(?P<module>.+)\.processor\.(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<factor>down|up)\.weight$"
)


def read_tensors_safely(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or from a PyTorch ``.bin`` through torch's weights-only unpickler,
    which rebuilds tensors and plain containers and refuses anything else (no pickled code runs)."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if blocked is None:  # not a refusal: the bytes are simply not a checkpoint
            raise ModelError(f"{path}: not a readable PyTorch checkpoint (damaged or another format)") from None
        raise ModelError(
            f"{path}: refused: the file references {blocked[1]}, not just tensors; dsdkit never executes pickled "
            "code. Only load checkpoints you trust, converted to safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, wrong format, ...
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ModelError(f"{path}: expected a flat dict of tensors (a LoRA state dict)")
    return tensors


def import_discffusion_lora(path: str | os.PathLike, model, scoring: ScoringConfig | None = None) -> LoRAAdapter:
    """Convert the authors' ``pytorch_model.bin`` (rank-4 LoRA on every attention's q/k/v/out, keys
    ``{block}.attentions.{i}.transformer_blocks.0.{attn1|attn2}.processor.{to_q|to_k|to_v|to_out}_lora.{down|up}.weight``)
    into a :class:`LoRAAdapter` for ``model``."""
    tensors = read_tensors_safely(path)
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        match = _DISCFFUSION_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        projection = match["projection"].removeprefix("to_")
        mapped[f"{match['module']}.{projection}.{match['factor']}"] = value.float()
    if unknown:
        raise ModelError(f"{path}: {len(unknown)} key(s) are not Discffusion LoRA weights (e.g. {unknown[0]})")
    downs = [v for k, v in mapped.items() if k.endswith(".down")]
    if not downs:
        raise ModelError(f"{path}: no LoRA weights found")
    rank = downs[0].shape[0]
    adapter = create_adapter(model, scoring or ScoringConfig(), AdapterConfig(kind=AdapterKind.lora, rank=rank))
    adapter.load_flat_state({k: v.to(model.device) for k, v in mapped.items()})
    return adapter
