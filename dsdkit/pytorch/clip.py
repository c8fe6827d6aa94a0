"""A CLIP model's towers on PyTorch: the shortlist stage of gallery search (:mod:`dsdkit.runtime.shortlist`).

Any Hugging Face ``CLIPModel`` folder or hub id (for example openai/clip-vit-large-patch14 for real photographs),
or ``"demo"``: the mini-CLIP shipped beside the demo model, whose text tower is the demo diffusion model's frozen
text encoder. Images go through :class:`~dsdkit.runtime.shortlist.ClipPreprocessor` (the model's own processor
config) and captions through the runtime tokenizer, the same code the bundle's ONNX towers use, so both paths embed
the same pixels and ids. Embeddings are L2-normalised float32.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import ModelError
from ..runtime.images import ImageInput, as_pil
from ..runtime.shortlist import ClipPreprocessor
from ..runtime.tokenizer import ClipTokenizer

__all__ = ["TorchClip", "resolve_clip_folder", "projected"]

logger = logging.getLogger(__name__)

_CLIP_FILES = [
    "config.json",
    "preprocessor_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors",
]


def resolve_clip_folder(source: str | os.PathLike) -> Path:
    """A local CLIPModel folder: ``"demo"`` (the shipped mini-CLIP, verified), a folder, or a hub id's snapshot in
    the local hub cache (downloaded where the hub is reachable)."""
    from ..world.demo import DEMO_MODEL, demo_clip_folder

    if str(source) == DEMO_MODEL:
        return demo_clip_folder()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a CLIPModel folder (no config.json); pass a CLIP folder, a hub id or demo")
        return path
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=_CLIP_FILES, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one actionable line
        where = "the local hub cache (HF_HUB_OFFLINE=1)" if offline else "the local hub cache and the hub"
        raise ModelError(
            f"shortlist model {source}: not a folder, and not found in {where} ({type(exc).__name__}); download it "
            f"with `hf download {source} --local-dir DIR` and pass DIR, or use demo"
        ) from None


class TorchClip:
    """A CLIPModel's image and text towers (the :class:`~dsdkit.runtime.shortlist.Embedder` of the PyTorch path).

    Args:
        source: a CLIPModel folder, a hub id or ``"demo"``.
        device: ``cpu``, ``cuda`` or ``auto``.
        batch_size: images or captions per tower run.
    """

    def __init__(self, source: str | os.PathLike = "demo", device: str | None = None, batch_size: int = 64):
        import torch
        from transformers import CLIPModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        self.source = str(source)
        self.folder = resolve_clip_folder(source)
        name = (device or "auto").lower()
        self.device = torch.device(
            "cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu")
        )
        try:
            self.model = CLIPModel.from_pretrained(self.folder, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.folder}: not a loadable CLIPModel ({first})") from None
        self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = ClipTokenizer.from_folder(self.folder)
        self.preprocess = ClipPreprocessor.from_folder(self.folder)
        self.batch_size = int(batch_size)

    def identity(self) -> str:
        """sha256 of the model's config and weights: what a stored shortlist was computed with."""
        digest = hashlib.sha256((self.folder / "config.json").read_bytes())
        for path in sorted(self.folder.glob("*.safetensors")):
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "model": self.source,
            "backend": "pytorch",
            "embedding_dim": int(config.projection_dim),
            "image_size": int(config.vision_config.image_size),
            "preprocess": self.preprocess.to_dict(),
        }

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """``float32[N, D]`` L2-normalised image embeddings."""
        import torch

        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = np.stack(
                [
                    self.preprocess(as_pil(image, start + i))
                    for i, image in enumerate(images[start : start + self.batch_size])
                ]
            )
            with torch.inference_mode():
                features = projected(
                    self.model.get_image_features(pixel_values=torch.from_numpy(pixels).to(self.device))
                )
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """``float32[M, D]`` L2-normalised caption embeddings."""
        import torch

        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = np.stack(
                [
                    self.tokenizer.encode(t, where=f"caption #{start + i}").ids
                    for i, t in enumerate(texts[start : start + self.batch_size])
                ]
            ).astype(np.int64)
            with torch.inference_mode():
                features = projected(self.model.get_text_features(input_ids=torch.from_numpy(ids).to(self.device)))
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)


def projected(output):
    """The projected embedding: ``get_*_features`` returns a tensor in transformers 4, an output object (its
    ``pooler_output``) in 5."""
    return output if not hasattr(output, "pooler_output") else output.pooler_output
