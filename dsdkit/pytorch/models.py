"""Loading an SD2-architecture model: a hub id or a local diffusers folder, on a chosen device and dtype.

Only safetensors weights are read (never pickles), nothing executes code shipped in a model folder, and with
``HF_HUB_OFFLINE=1`` nothing touches the network. When no weights can be found the error says what was tried and
how to get them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..runtime.config import ModelDeclaration
from ..runtime.errors import ConfigError, ModelError
from ..runtime.files import atomic_write_text
from ..runtime.tokenizer import ClipTokenizer
from ..world.demo import DEMO_MODEL, demo_model_folder, verify_demo_model
from .noise import DiffusionProcess

__all__ = [
    "DEFAULT_MODEL",
    "DEMO_MODEL",
    "Precision",
    "SD2Model",
    "load_model",
    "check_model_folder",
    "resolve_model_folder",
    "TEST_MODEL_MARKER",
    "MODEL_DECLARATION",
    "read_model_declaration",
    "declared_model",
    "write_model_declaration",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
#: File written by `dsdkit tiny-model` into the folders it makes: their weights are random, their scores meaningless.
TEST_MODEL_MARKER = "dsdkit_test_model.json"
#: What a model folder declares about how it must be scored (optional; written by `dsdkit world train`):
#: ``{"format": "dsdkit-model/1", "context_tokens": "words", "scoring": {"attention_term": false}}``
#: (:class:`~dsdkit.runtime.config.ModelDeclaration`).
MODEL_DECLARATION = "dsdkit_model.json"
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*.json",
    "tokenizer/merges.txt",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]
# Scorers built from several threads at once all ask for the model's identity: hash the weights once, not once per
# thread (gigabytes for SD2). One lock for every model; each model hashes once per process.
_IDENTITY_LOCK = threading.Lock()
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


def resolve_model_folder(model: str | os.PathLike) -> Path:
    """A local folder holding the model: the shipped demo model for ``"demo"``, ``model`` itself, or the hub
    cache's snapshot of the hub id ``model``. (A local folder named ``demo`` is reached as ``./demo``.)"""
    if str(model) == DEMO_MODEL:
        folder = demo_model_folder()
        verify_demo_model(folder)  # 16 MB of hashing: cheap, and a damaged install is named instead of misscoring
        return folder
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"model {path} is a file; pass the diffusers model folder (the one with unet/, vae/, ...)"
            )
        if _is_bundle(path):
            raise ModelError(
                f"{path} is a dsdkit bundle (from `dsdkit export`), not a model folder: score it with `bundle` {path}"
            )
        return path
    name = str(model)
    if not _HUB_ID.match(name):
        raise ModelError(
            f"model {name!r}: no such folder, and not a hub id of the form owner/name; pass a diffusers SD2 folder, "
            f"a hub id such as {DEFAULT_MODEL}, or demo (the shipped demo model)"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    how_to = (
        f"to get the weights, run `hf download {name} --local-dir DIR` on a machine with network access (accept the "
        "model's licence on its hub page first) and pass `model` DIR (or try `model` demo, the shipped demo "
        "model, which runs offline)"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(
            f"model {name}: huggingface_hub is not installed, so hub ids cannot be resolved; {how_to}"
        ) from None
    try:
        folder = snapshot_download(name, allow_patterns=_HUB_PATTERNS, local_files_only=offline)
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one actionable line
        where = "the local hub cache (HF_HUB_OFFLINE=1)" if offline else "the local hub cache and the hub"
        reason = type(exc).__name__
        raise ModelError(
            f"model {name}: tried the folder ./{name} (absent) and {where}: not found ({reason}); {how_to}"
        ) from None
    return Path(folder)


def _is_bundle(folder: Path) -> bool:
    """Whether ``folder`` holds an exported bundle (its manifest names the bundle format), not model weights."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith("dsdkit-bundle/")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} is missing; the model folder is incomplete (re-download it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} is unreadable ({exc}); re-download the model folder") from None


#: The keys a model declaration may hold.
_DECLARED = {"format", "context_tokens", "scoring"}


def write_model_declaration(
    folder: Path, context_tokens: str = "all", scoring: dict[str, Any] | None = None
) -> ModelDeclaration:
    """Declare in a model folder how it is scored: a masked cross-attention context (``runtime.tokenizer.CONTEXTS``)
    and knob values it recommends (:class:`~dsdkit.runtime.config.ModelDeclaration`, validated first)."""
    declaration = ModelDeclaration(context_tokens=context_tokens, scoring=dict(scoring or {}))
    content = {"format": "dsdkit-model/1", **declaration.to_dict()}
    atomic_write_text(Path(folder) / MODEL_DECLARATION, json.dumps(content, indent=1) + "\n")
    return declaration


def read_model_declaration(folder: Path) -> ModelDeclaration:
    """The folder's declaration (context ``all`` and no recommended knobs when it has none), validated."""
    path = Path(folder) / MODEL_DECLARATION
    if not path.is_file():
        return ModelDeclaration()
    data = _read_json(path)
    if not isinstance(data, dict) or data.get("format") != "dsdkit-model/1" or set(data) - _DECLARED:
        raise ModelError(
            f"{path}: not a dsdkit model declaration (format dsdkit-model/1 with {', '.join(sorted(_DECLARED))}); "
            "re-download the model folder"
        )
    try:
        return ModelDeclaration(context_tokens=data.get("context_tokens", "all"), scoring=data.get("scoring", {}))
    except ConfigError as exc:
        raise ModelError(f"{path}: {exc}; re-download the model folder") from None


def declared_model(model: str | os.PathLike | None) -> ModelDeclaration:
    """What a model declares, read before it loads (so a conflicting ``tokens`` knob is refused first): ``demo`` and
    local folders are read; a hub id that is not downloaded declares nothing (``load_model`` names the problem)."""
    if model is None:
        return ModelDeclaration()
    try:
        folder = resolve_model_folder(model)
    except ModelError:
        return ModelDeclaration()
    return read_model_declaration(folder)


def check_model_folder(folder: Path) -> None:
    """Refuse, in one line, a folder that is not a complete diffusers SD2 model (an SDXL one, a missing component
    or weights file) before anything is loaded from it."""
    missing = [c for c in _COMPONENTS if not (folder / c).is_dir()]
    if (
        (folder / "text_encoder_2").is_dir()
        or (folder / "unet" / "config.json").is_file()
        and _read_json(folder / "unet" / "config.json").get("addition_embed_type")
    ):
        raise ModelError(
            f"{folder} looks like an SDXL model (second text encoder / added embeddings); dsdkit scores "
            "SD2-architecture models such as stabilityai/stable-diffusion-2-1-base"
        )
    if missing:
        raise ModelError(
            f"{folder} is not a complete diffusers SD2 folder: missing {', '.join(missing)}/ (expected "
            f"{', '.join(c + '/' for c in _COMPONENTS)})"
        )
    for component, weights in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        sub = folder / component
        if not (sub / weights).is_file() and not any(sub.glob("*.safetensors")):
            pickles = sorted(p.name for p in sub.glob("*.bin"))
            hint = (
                f" (found {', '.join(pickles)}: dsdkit does not unpickle weights; convert them to safetensors)"
                if pickles
                else ""
            )
            raise ModelError(f"{sub}: no safetensors weights{hint}")


@dataclass
class SD2Model:
    """The frozen parts of an SD2-architecture model that DSD scoring uses, placed on one device.

    The UNet runs in ``precision``; the VAE encoder and the text encoder run once per image / caption and stay in
    fp32 so cached encodings are the same whatever the UNet's precision.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: ClipTokenizer
    schedule: DiffusionProcess
    source: str
    folder: Path
    device: Any
    precision: Precision
    prediction_type: str = "epsilon"
    is_test_model: bool = False
    #: How the folder declares it is scored: its cross-attention context and recommended knobs.
    declaration: ModelDeclaration = field(default_factory=ModelDeclaration)
    _identity: str | None = field(default=None, repr=False)

    def scoring_config(self, preset: str | None = None, **knobs: Any):
        """The scoring config ``dsdkit match --model`` runs this model with for ``preset`` and ``knobs``
        (:func:`~dsdkit.runtime.config.resolve_scoring` under the model's declaration: the demo model's recommended
        score, the denoising term alone, unless ``attention_term=True``). ``ScoringConfig.from_preset`` is the
        preset exactly, whatever the model recommends."""
        from ..runtime.config import resolve_scoring

        return resolve_scoring(preset, None, knobs, model=self.declaration)

    @property
    def context_tokens(self) -> str:
        """What the UNet's cross-attention attends to (``runtime.tokenizer.CONTEXTS``), declared by the folder."""
        return self.declaration.context_tokens

    @property
    def resolution(self) -> int:
        """Native image resolution: the UNet's latent size times the VAE's downsampling factor (512 for SD2-base)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def identity(self) -> str:
        """sha256 of the UNet's config and weights: which base model adapters and bundles belong to."""
        if self._identity is None:
            with _IDENTITY_LOCK:
                if self._identity is None:
                    self._identity = self._hash_unet()
        return self._identity

    def _hash_unet(self) -> str:
        digest = hashlib.sha256()
        unet_dir = self.folder / "unet"
        digest.update((unet_dir / "config.json").read_bytes())
        for path in sorted(unet_dir.glob("*.safetensors")):
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "resolution": self.resolution,
            "precision": self.precision.value,
            "device": str(self.device),
            "prediction_type": self.prediction_type,
            "test_model_random_weights": self.is_test_model,
            "context_tokens": self.context_tokens,
        }


def _resolve_device(device: str | None, precision: Precision):
    import torch

    name = (device or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asked for, but torch sees no CUDA GPU; pass cpu as `device`", field="device"
        )
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if resolved.type == "cpu" and precision is Precision.fp16:
        raise ConfigError(
            "fp16 needs a CUDA GPU (CPU kernels for fp16 are slow or missing); pass fp32 or bf16 as `dtype`",
            field="dtype",
        )
    return resolved


def _check_configs(folder: Path, scheduler_config: dict) -> str:
    """The model's prediction type, after refusing configs dsdkit cannot score (and warning on those it was not
    validated on)."""
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelError(
            f"{folder}: scheduler prediction_type {prediction_type!r} is not supported "
            "(expected 'epsilon' or 'v_prediction')"
        )
    unet_config = _read_json(folder / "unet" / "config.json")
    text_config = _read_json(folder / "text_encoder" / "config.json")
    if unet_config.get("cross_attention_dim") != text_config.get("hidden_size"):
        raise ModelError(
            f"{folder}: UNet cross_attention_dim {unet_config.get('cross_attention_dim')} does not match the text "
            f"encoder's hidden_size {text_config.get('hidden_size')}; the folder mixes components of different models"
        )
    logger.info("%s: %s", folder, describe_architecture(unet_config, text_config, prediction_type))
    return prediction_type


def describe_architecture(unet_config: dict, text_config: dict, prediction_type: str) -> str:
    """Which member of the family a folder's configs describe, in words (SD1.x: convolutional projections in the
    transformer blocks; SD2: linear ones; v-prediction: SD2-1 768-v). All are scored the same way: v-prediction
    outputs are converted to ε first (``ε̂ = sqrt(ā) v̂ + sqrt(1 − ā) x_t``)."""
    family = "SD2" if unet_config.get("use_linear_projection") else "SD1.x"
    states = text_config.get("hidden_size")
    size = unet_config.get("sample_size")
    pixels = f"{size * 8} px" if isinstance(size, int) else "? px"
    target = "v-prediction" if prediction_type == "v_prediction" else "ε-prediction"
    return f"{family}-architecture UNet, {states}-dim text states, {target}, {pixels}"


def load_model(
    model: str | os.PathLike | None = None, device: str | None = None, dtype: Precision | str | None = None
) -> SD2Model:
    """Load an SD2-architecture model for scoring.

    Args:
        model: a local diffusers folder, a hub id, or ``"demo"`` (the shipped demo world model). Defaults to
            ``stabilityai/stable-diffusion-2-1-base``.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Defaults to ``"auto"``.
        dtype: UNet precision, ``"fp32"``, ``"fp16"`` or ``"bf16"``. Defaults to ``"fp32"``.

    Raises:
        ModelError: the weights cannot be found or are not an SD2-architecture diffusers model.
        ConfigError: the device or precision cannot be used here.
    """
    try:
        precision = Precision(dtype.value if isinstance(dtype, Enum) else (dtype or "fp32"))
    except ValueError:
        raise ConfigError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None
    source = str(model if model is not None else DEFAULT_MODEL)
    torch_device = _resolve_device(device, precision)
    folder = resolve_model_folder(source)
    check_model_folder(folder)

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    prediction_type = _check_configs(folder, scheduler_config)

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading is quick; per-shard progress bars and hints from the upstream libraries would only clutter our output.
    # They configure their loggers on first import, so this has to happen here, after the imports.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if logging.getLogger("dsdkit").getEffectiveLevel() > logging.DEBUG:
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    is_test_model = (folder / TEST_MODEL_MARKER).is_file()
    declaration = read_model_declaration(folder)
    logger.info("loading %s from %s on %s (%s UNet)", source, folder, torch_device, precision.value)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", use_safetensors=True, torch_dtype=precision.torch_dtype
        )
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(
            folder / "text_encoder", use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{folder}: weights could not be loaded ({first_line}); re-download the model folder"
        ) from None
    tokenizer = ClipTokenizer.from_folder(folder / "tokenizer")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(torch_device)
    if is_test_model:
        logger.warning(
            "%s is a random-weight test model made by `dsdkit tiny-model`: its scores are meaningless", folder
        )
    return SD2Model(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        schedule=DiffusionProcess.from_scheduler_config(scheduler_config),
        source=source,
        folder=folder,
        device=torch_device,
        precision=precision,
        prediction_type=prediction_type,
        is_test_model=is_test_model,
        declaration=declaration,
    )
