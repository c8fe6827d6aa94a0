"""A server's gallery (``dsdkit serve --gallery DIR``): every image embedded once, at start, by the CLIP model of
the search; ``POST /search`` takes a caption, shortlists the gallery's K most similar images (exact top K,
:func:`dsdkit.runtime.shortlist.top_k`) and has DSD rank those K only."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import ConfigError, InputError
from ..runtime.images import as_pil
from ..runtime.inputs import list_images
from ..runtime.shortlist import top_k

__all__ = ["Gallery", "open_gallery"]

logger = logging.getLogger("dsdkit.serving")

_EMBED_CHUNK = 256  # images decoded and embedded together while indexing


class Gallery:
    """The indexed images: their paths, names (relative to the gallery) and unit-length CLIP embeddings."""

    def __init__(self, folder: Path, paths: list[Path], vectors: np.ndarray, embedder, k: int, skipped: int):
        self.folder, self.paths, self.vectors = folder, paths, vectors
        # top_k sums the products in float64: widen the gallery once here, not on every search request.
        self._pool = vectors.astype(np.float64)
        self.embedder, self.k, self.skipped = embedder, k, skipped
        self.names = [_name(path, folder) for path in paths]

    def describe(self) -> dict[str, Any]:
        """What ``/health`` reports (the page shows its search panel when there is one)."""
        return {
            "route": "/search",
            "images": len(self.paths),
            "skipped": self.skipped,
            "shortlist": self.embedder.describe().get("model"),
            "shortlist_k": self.k,
        }

    def shortlist(self, caption: str, k: int) -> tuple[list[int], list[float]]:
        """The indices and cosine similarities of the ``k`` gallery images most similar to ``caption``."""
        query = self.embedder.embed_texts([caption])
        chosen, similarities = top_k(query, self._pool, k)
        return [int(i) for i in chosen[0]], [float(s) for s in similarities[0]]

    def read(self, index: int) -> bytes:
        return self.paths[index].read_bytes()


def _name(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder).as_posix()
    except ValueError:
        return path.name


def open_gallery(source: str, engine, shortlist: str | None, k: int, limit: int) -> Gallery:
    """Index ``source`` (a folder or an image-list file) with the search's CLIP model: ``shortlist``, else the
    engine's own towers, else the shipped mini-CLIP. Unreadable images are left out with one log line each."""
    from ..jobs.shortlists import open_embedder
    from ..jobs.specs import ShortlistSpec

    started = time.perf_counter()
    paths = [Path(p) for p in list_images(source)]
    if len(paths) > limit:
        raise ConfigError(
            f"`gallery` {source}: {len(paths):,} images is over max_gallery_images {limit:,}", field="gallery"
        )
    if shortlist is None and engine.shortlist_embedder() is None:
        shortlist = "demo"
    embedder = open_embedder(ShortlistSpec(model=shortlist, k=k), engine)
    kept, parts, skipped = [], [], 0
    for first in range(0, len(paths), _EMBED_CHUNK):  # decoded pictures are held one chunk at a time
        pictures = []
        for path in paths[first : first + _EMBED_CHUNK]:
            try:
                pictures.append(as_pil(path))
            except InputError as exc:
                logger.warning("gallery: skipped %s", exc)
                skipped += 1
                continue
            kept.append(path)
        if pictures:
            parts.append(np.asarray(embedder.embed_images(pictures), dtype=np.float32))
    if not kept:
        raise InputError(f"`gallery` {source}: no usable image in it")
    vectors = np.concatenate(parts)
    folder = Path(source).resolve() if Path(source).is_dir() else Path(source).resolve().parent
    logger.info("gallery: %d images of %s embedded in %.1f s", len(kept), source, time.perf_counter() - started)
    return Gallery(folder, kept, vectors, embedder, k, skipped)
