"""Search a gallery in two stages: a CLIP shortlist, then DSD on the shortlisted pairs only (torch-free part).

Every retrieval system in this field works so (DiffusionITM reranks CLIP's top 10; clip-retrieval builds an
embedding index): a cheap embedding model proposes K candidates per query, the expensive model ranks those. This
module holds what does not depend on how the embeddings are computed:

- :func:`top_k`: the exact top K of a blocked similarity matrix (ties broken by the lower index), whose memory is
  bounded by one block of rows (``block_rows x pool`` similarities), never the whole ``queries x pool`` matrix;
- :class:`Shortlist`: per query its K candidates, their rank and cosine similarity, as candidate lists and pairs
  the DSD job scores (:mod:`dsdkit.jobs.match`), plus the rank / similarity matrices a result carries;
- :func:`fuse`: a weighted sum of the standardised CLIP similarity and DSD score per query, for where the reranker
  alone is not better than the shortlist (measured in ``docs/search.md``);
- :class:`ClipPreprocessor`: a CLIP image processor's arithmetic (resize of the shortest edge, centre crop,
  rescale, normalise; ``preprocessor_config.json``) in numpy and Pillow, so the PyTorch and the ONNX towers see the
  same pixels.

The CLIP towers themselves are an :class:`Embedder`: PyTorch (``dsdkit.pytorch.clip``) or a bundle's ONNX graphs
(:class:`~dsdkit.runtime.clip.OnnxClip`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import ConfigError, ModelError

__all__ = [
    "top_k",
    "Shortlist",
    "Shortlister",
    "shortlist",
    "fuse",
    "ClipPreprocessor",
    "Embedder",
    "DEFAULT_BLOCK_ROWS",
]

#: Query rows per similarity block: the block holds ``DEFAULT_BLOCK_ROWS x pool`` float32 similarities (40 MB for
#: a pool of 10,000 images; while it is computed, also their float64 sums, 80 MB), however many queries there are.
DEFAULT_BLOCK_ROWS = 1024


def top_k(
    queries: np.ndarray, pool: np.ndarray, k: int, block_rows: int = DEFAULT_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top ``k`` of ``queries @ pool.T`` per query, best first, ties broken by the lower pool index.

    Args:
        queries: ``float32[Q, D]`` (L2-normalised embeddings: the products are cosine similarities).
        pool: ``float32[P, D]``, or its ``float64`` copy (exact: made once by a caller that searches it often).
        k: candidates per query (``k >= P`` keeps them all, in order).
        block_rows: queries per similarity block; memory is ``block_rows x P`` similarities at a time.

    Returns:
        ``(indices int64[Q, min(k, P)], similarities float32[Q, min(k, P)])``.
    """
    if k < 1:
        raise ConfigError(f"`shortlist_k` must be >= 1, got {k}", field="shortlist_k")
    if block_rows < 1:
        raise ConfigError(f"block_rows must be >= 1, got {block_rows}")
    queries, pool = np.asarray(queries, dtype=np.float32), np.asarray(pool)
    # The products are summed in float64 (see _similarities), so the pool is widened once per call; a caller that
    # searches one pool many times (a served gallery) passes its float64 copy and nothing is copied per query.
    pool = pool if pool.dtype == np.float64 else pool.astype(np.float32, copy=False).astype(np.float64)
    count, size = len(queries), len(pool)
    keep = min(int(k), size)
    indices = np.empty((count, keep), dtype=np.int64)
    similarities = np.empty((count, keep), dtype=np.float32)
    for start in range(0, count, block_rows):
        block = _similarities(queries[start : start + block_rows], pool)  # the only [rows, P] array alive at a time
        chosen = _block_top(block, keep)
        indices[start : start + len(block)] = chosen
        similarities[start : start + len(block)] = np.take_along_axis(block, chosen, axis=1)
    return indices, similarities


def _similarities(rows: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """``float32[rows, P]``: ``rows @ pool.T`` summed in float64 and rounded to float32.

    Why float64: BLAS picks its float32 kernel by the block's shape (a one-row product goes to the matrix-vector
    kernel) and, on some CPUs, by a row's position in the block (edge tiles), and those kernels' float32 sums differ
    in the last bit, so one query alone (``rank_texts``, a served search) or a query in a block of another size would
    get other similarities, and another order among near-ties, than in a job's blocks. The products of float32
    inputs are exact in float64 and the float64 sums of any two kernels differ by about 1e-16 relative, far below
    float32's rounding step (6e-8), so after rounding every block size and position gives the same similarity (a
    difference needs a sum within 1e-16 of a float32 rounding boundary: about one element in 10^9).
    """
    return (rows.astype(np.float64) @ pool.T).astype(np.float32)


def _block_top(block: np.ndarray, keep: int) -> np.ndarray:
    """Per row the ``keep`` best columns, best first, ties by the lower column (exact also at the boundary)."""
    rows, size = block.shape
    if keep == size:
        return np.lexsort((np.broadcast_to(np.arange(size), block.shape), -block), axis=1)
    # The keep-th largest value per row; everything above it is in, and of the values equal to it the lowest
    # columns fill what is left (argpartition alone would pick among ties arbitrarily).
    kth = -np.partition(-block, keep - 1, axis=1)[:, keep - 1 : keep]
    above = block > kth
    tied = block == kth
    room = keep - above.sum(axis=1, keepdims=True)
    selected = above | (tied & (np.cumsum(tied, axis=1) <= room))
    columns = np.nonzero(selected)[1].reshape(rows, keep)  # ascending columns per row
    values = np.take_along_axis(block, columns, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")  # stable: equal values keep the lower column first
    return np.take_along_axis(columns, order, axis=1)


def fuse(scores: np.ndarray, similarities: np.ndarray, clip_weight: float, per: str = "image") -> np.ndarray:
    """``float64[N, M]``: per query, ``clip_weight * z(similarity) + (1 - clip_weight) * z(DSD score)`` over the
    query's shortlisted pairs, NaN elsewhere.

    ``z`` standardises within one query (mean 0, standard deviation 1 over its listed candidates; a query whose
    values are all equal gets 0s), so the two scales meet: a DSD score is comparable within one image (or, with
    ``normalize=uncond``, within one caption), a cosine similarity everywhere. ``scores`` and ``similarities`` are
    a shortlisted result's ``scores`` (an adaptive run's eliminated pairs carry their partial means) and
    ``shortlist_similarity``; a pair is listed where both are finite. ``per`` names the query axis as
    ``--adaptive-per`` does: ``"image"`` (each row ranks its captions) or ``"caption"`` (each column ranks its
    images). The weight is
    a choice made on validation data, not on the images it will rank (``benchmarks/gallery_search.py`` chooses it on
    other images of the same gallery).

    Raises:
        ConfigError: a weight outside [0, 1], an unknown ``per`` or arrays of different shapes.
    """
    if not 0.0 <= float(clip_weight) <= 1.0:
        raise ConfigError(f"clip_weight={clip_weight}: give a weight from 0 (DSD alone) to 1 (CLIP alone)")
    if per not in ("image", "caption"):
        raise ConfigError(f"per={per!r}: choose image or caption", field="per")
    scores = np.asarray(scores, dtype=np.float64)
    similarities = np.asarray(similarities, dtype=np.float64)
    if scores.shape != similarities.shape or scores.ndim != 2:
        raise ConfigError(f"fuse: scores {scores.shape} and similarities {similarities.shape} must be one [N, M]")
    if per == "caption":
        return fuse(scores.T, similarities.T, clip_weight).T
    listed = np.isfinite(scores) & np.isfinite(similarities)

    def standardised(values: np.ndarray) -> np.ndarray:
        values = np.where(listed, values, np.nan)
        count = listed.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.nansum(values, axis=1, keepdims=True) / count
            spread = np.sqrt(np.nansum((values - mean) ** 2, axis=1, keepdims=True) / count)
            return np.where(spread > 0, (values - mean) / np.where(spread > 0, spread, 1.0), 0.0)

    fused = clip_weight * standardised(similarities) + (1.0 - clip_weight) * standardised(scores)
    return np.where(listed, fused, np.nan)


@dataclass
class Shortlist:
    """Each query's K candidates from the embeddings' cosine similarities.

    Attributes:
        per: ``"image"`` (each image's K captions) or ``"caption"`` (each caption's K images).
        k: the K asked for (a query keeps ``min(K, pool)``).
        candidates: ``int64[Q, min(K, P)]`` best first.
        similarities: ``float32[Q, min(K, P)]`` their cosine similarities.
        num_images, num_captions: the job's matrix.
    """

    per: str
    k: int
    candidates: np.ndarray
    similarities: np.ndarray
    num_images: int
    num_captions: int

    @property
    def pool_size(self) -> int:
        return self.num_captions if self.per == "image" else self.num_images

    @property
    def keeps_all(self) -> bool:
        """Whether every candidate is shortlisted (K at or above the pool): the job is the one without it."""
        return self.k >= self.pool_size

    def pairs(self) -> list[tuple[int, int]]:
        """``(image, caption)`` of every shortlisted pair, query by query, best first (a query row of -1s, an
        image that could not be used, lists none)."""
        out = []
        for query, row in enumerate(self.candidates):
            for candidate in row[row >= 0]:
                out.append((query, int(candidate)) if self.per == "image" else (int(candidate), query))
        return out

    def _cells(self):
        """Per listed pair: (image, caption, place 1.., similarity)."""
        for query, (row, values) in enumerate(zip(self.candidates, self.similarities, strict=True)):
            for place, (candidate, value) in enumerate(zip(row, values, strict=True), start=1):
                if candidate < 0:
                    continue
                image, caption = (query, int(candidate)) if self.per == "image" else (int(candidate), query)
                yield image, caption, place, value

    def rank_matrix(self) -> np.ndarray:
        """``int16[N, M]``: each pair's place in its query's shortlist (1 = the most similar; 0 = not listed)."""
        ranks = np.zeros((self.num_images, self.num_captions), dtype=np.int16)
        for image, caption, place, _ in self._cells():
            ranks[image, caption] = place
        return ranks

    def similarity_matrix(self) -> np.ndarray:
        """``float32[N, M]``: each shortlisted pair's cosine similarity (NaN: not listed)."""
        out = np.full((self.num_images, self.num_captions), np.nan, dtype=np.float32)
        for image, caption, _, value in self._cells():
            out[image, caption] = value
        return out

    def candidate_lists(self) -> list[list[int]]:
        """Per query, its shortlisted candidates, best first (what adaptive ranking takes as ``candidates``)."""
        return [[int(c) for c in row if c >= 0] for row in self.candidates]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for a job folder: ``numpy.savez`` without pickles)."""
        return {
            "candidates": self.candidates,
            "similarities": self.similarities,
            "shape": np.array([self.num_images, self.num_captions, self.k], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], per: str, source: str = "shortlist") -> Shortlist:
        try:
            num_images, num_captions, k = (int(v) for v in arrays["shape"])
            candidates = np.asarray(arrays["candidates"], dtype=np.int64)
            similarities = np.asarray(arrays["similarities"], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{source}: not a stored shortlist; plan the job again") from None
        pool = num_captions if per == "image" else num_images
        queries = num_images if per == "image" else num_captions
        width = min(k, pool)
        if candidates.shape != (queries, width) or similarities.shape != candidates.shape:
            raise ModelError(f"{source}: the stored shortlist does not fit the job ({candidates.shape}); plan again")
        if candidates.size and (candidates.min() < -1 or candidates.max() >= pool):
            raise ModelError(f"{source}: the stored shortlist names candidates out of range; plan the job again")
        return cls(per, k, candidates, similarities, num_images, num_captions)


class Embedder(Protocol):
    """A CLIP model's two towers: L2-normalised embeddings of images and captions (PyTorch or ONNX)."""

    def embed_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


def shortlist(
    embedder: Embedder,
    images: Sequence[Any],
    texts: Sequence[str],
    k: int,
    per: str = "image",
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> Shortlist:
    """Embed every image and caption once and keep each query's top ``k`` (see :func:`top_k`)."""
    if per not in ("image", "caption"):
        raise ConfigError(f"`per` must be image or caption, got {per!r}", field="per")
    image_vectors = embedder.embed_images(images)
    text_vectors = embedder.embed_texts(texts)
    queries, pool = (image_vectors, text_vectors) if per == "image" else (text_vectors, image_vectors)
    candidates, similarities = top_k(queries, pool, k, block_rows)
    return Shortlist(per, int(k), candidates, similarities, len(image_vectors), len(text_vectors))


@dataclass
class Shortlister:
    """A shortlist stage for the Python API: ``Shortlister(TorchClip("demo"), k=8)`` (or a bundle's
    ``matcher.shortlist_embedder()``), passed as ``shortlist=`` to an engine's ranking methods."""

    embedder: Any
    k: int = 8
    block_rows: int = DEFAULT_BLOCK_ROWS

    def __call__(self, images: Sequence[Any], texts: Sequence[str], per: str = "image") -> Shortlist:
        return shortlist(self.embedder, images, texts, self.k, per, self.block_rows)


class ClipPreprocessor:
    """A CLIP image processor's steps (``preprocessor_config.json``), without torch: RGB, resize so the shortest
    edge is ``size`` (bicubic), centre crop to ``crop``, ``/ 255``, ``(x - mean) / std``; ``float32[3, crop, crop]``.
    """

    def __init__(self, config: dict[str, Any], source: str = "preprocessor_config.json"):
        try:
            size = config.get("size", {})
            self.shortest = int(size["shortest_edge"] if isinstance(size, dict) else size)
            crop = config.get("crop_size", self.shortest)
            self.crop = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop),) * 2
            self.do_resize = bool(config.get("do_resize", True))
            self.do_crop = bool(config.get("do_center_crop", True))
            self.rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
            normalise = config.get("do_normalize", True)
            self.mean = np.array(config.get("image_mean", [0.0] * 3) if normalise else [0.0] * 3, dtype=np.float32)
            self.std = np.array(config.get("image_std", [1.0] * 3) if normalise else [1.0] * 3, dtype=np.float32)
            self.resample = int(config.get("resample", 3))
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{source}: not a CLIP image processor config (size, crop_size, mean, std)") from None

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipPreprocessor:
        path = Path(folder) / "preprocessor_config.json"
        try:
            return cls(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable ({exc}); a CLIP folder has its image processor's config") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "shortest_edge": self.shortest,
            "crop": list(self.crop),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "rescale": self.rescale,
            "resample": self.resample,
        }

    def __call__(self, image) -> np.ndarray:
        """One RGB PIL image -> ``float32[3, H, W]``."""
        from PIL import Image

        image = image.convert("RGB")
        if self.do_resize:
            width, height = image.size
            short, long = min(width, height), max(width, height)
            # The shorter side becomes exactly `shortest`; the longer one rounds as transformers' processors do.
            longer = int(self.shortest * long / short)
            size = (self.shortest, longer) if width <= height else (longer, self.shortest)
            if size != image.size:
                image = image.resize(size, Image.Resampling(self.resample))
        if self.do_crop:
            width, height = image.size
            crop_h, crop_w = self.crop
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))
        array = np.asarray(image, dtype=np.float32) * np.float32(self.rescale)
        array = (array - self.mean) / self.std
        return np.ascontiguousarray(array.transpose(2, 0, 1))
