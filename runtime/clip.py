"""The shortlist CLIP of a bundle, without torch: its ONNX towers (``dsdkit export --shortlist``) as an
:class:`~dsdkit.runtime.shortlist.Embedder`, with the model's own tokenizer and image processor from the bundle's
``clip/`` folder (:class:`~dsdkit.runtime.shortlist.ClipPreprocessor`: the same pixels the PyTorch towers see)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .images import ImageInput, as_pil
from .shortlist import ClipPreprocessor
from .tokenizer import ClipTokenizer

__all__ = ["OnnxClip"]


class OnnxClip:
    """A bundle's CLIP towers on its runners (ONNX Runtime or TensorRT)."""

    def __init__(self, bundle, runners: dict, batch_size: int = 32):
        self.record = bundle.manifest["shortlist"]
        folder = bundle.path / self.record["folder"]
        self.tokenizer = ClipTokenizer.from_folder(folder)
        self.preprocess = ClipPreprocessor.from_folder(folder)
        self.image_runner = runners[self.record["graphs"]["image"]]
        self.text_runner = runners[self.record["graphs"]["text"]]
        self.batch_size = int(batch_size)
        self.dimension = int(self.record["embedding_dim"])

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.record["model"],
            "backend": self.image_runner.name,
            "embedding_dim": self.dimension,
            "preprocess": self.preprocess.to_dict(),
        }

    def identity(self) -> str:
        return self.record["identity"]

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        out = [np.zeros((0, self.dimension), np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = np.stack([self.preprocess(as_pil(image, start + i)) for i, image in enumerate(chunk)])
            out.append(self.image_runner.infer({"pixels": pixels.astype(np.float32)})["embeddings"])
        return np.concatenate(out).astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = [np.zeros((0, self.dimension), np.float32)]
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            ids = np.stack([self.tokenizer.encode(t, where=f"caption #{start + i}").ids for i, t in enumerate(chunk)])
            out.append(self.text_runner.infer({"input_ids": ids.astype(np.int64)})["embeddings"])
        return np.concatenate(out).astype(np.float32)
