"""The shortlist stage of a match job (a gallery search): embed every usable image and caption once with a CLIP
model, keep each query's top K (:func:`dsdkit.runtime.shortlist.top_k`, exact, memory bounded by a block of rows),
and hand the shortlisted pairs to the scoring stages, which score nothing else.

The embedder is the engine's own (a bundle exported with ``--shortlist``: ONNX towers, torch-free) or a CLIP model
on PyTorch (:class:`~dsdkit.pytorch.clip.TorchClip`: a folder, a hub id or ``demo``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..runtime.engine import Engine
from ..runtime.errors import ConfigError, InputError
from ..runtime.images import as_pil
from ..runtime.pairs import PairList
from ..runtime.shortlist import Embedder, Shortlist, top_k
from .specs import ShortlistSpec

__all__ = ["open_embedder", "compute_shortlist", "shortlist_pairs", "shortlist_meta"]

logger = logging.getLogger("dsdkit.jobs.match")


def open_embedder(spec: ShortlistSpec, engine: Engine, device: str | None = None) -> Embedder:
    """The CLIP towers a shortlist asks for: the engine's own (``spec.model`` None) or a model on PyTorch."""
    if spec.model is None:
        own = engine.shortlist_embedder()
        if own is None:
            raise ConfigError(
                "`shortlist` needs a CLIP model: name one (a CLIPModel folder, a hub id or demo), or score with a "
                "bundle exported with one (`dsdkit export --shortlist MODEL`)",
                field="shortlist",
            )
        return own
    from ..pytorch.clip import TorchClip

    return TorchClip(spec.model, device=device)


def compute_shortlist(
    job, engine: Engine, spec: ShortlistSpec, per: str, embedder: Embedder | None = None
) -> tuple[Shortlist, dict[str, Any]]:
    """Embed the job's usable images and its captions once, and shortlist each query's candidates. Images that
    cannot be decoded are skipped here, with the job's one-line reason. Returns the shortlist over the job's image
    indices and what the stage did (for ``meta``)."""
    embedder = embedder or open_embedder(spec, engine)
    inputs, skips = job.inputs, job.skips
    started = time.perf_counter()
    pictures, usable = [], []
    for index, image in enumerate(inputs.images):
        if index in skips:
            continue
        try:
            pictures.append(as_pil(image, index))
        except InputError as exc:
            skips.skip(index, exc)
            continue
        usable.append(index)
    if not usable:
        raise InputError("no usable image to shortlist for: every image was skipped; check the images")
    image_vectors = embedder.embed_images(pictures)
    text_vectors = embedder.embed_texts(inputs.captions)
    embed_s = time.perf_counter() - started
    queries, pool = (image_vectors, text_vectors) if per == "image" else (text_vectors, image_vectors)
    local, similarities = top_k(queries, pool, spec.k, spec.block_rows)
    positions = np.asarray(usable, dtype=np.int64)
    if per == "image":
        candidates = local  # captions; the queries are the usable images, mapped below
        full = np.full((len(inputs.images), local.shape[1]), -1, dtype=np.int64)
        full_sims = np.full(full.shape, np.nan, dtype=np.float32)
        full[positions], full_sims[positions] = candidates, similarities
        candidates, similarities = full, full_sims
    else:
        candidates = positions[local]  # the pool is the usable images: back to the job's image indices
    result = Shortlist(per, spec.k, candidates, similarities, len(inputs.images), len(inputs.captions))
    stage = {
        "model": spec.model if spec.model is not None else f"{embedder.describe()['model']} (the bundle's)",
        "k": spec.k,
        "per": per,
        "embedder": embedder.describe(),
        "embedded_images": len(usable),
        "embedded_captions": len(inputs.captions),
        "embed_s": round(embed_s, 3),
    }
    logger.info(
        "shortlist: embedded %d images and %d captions in %.1f s; top %d per %s",
        len(usable),
        len(inputs.captions),
        embed_s,
        spec.k,
        per,
    )
    return result, stage


def shortlist_pairs(shortlist: Shortlist, source: str) -> PairList:
    """The shortlisted pairs as the job's pair list (a query without a usable image lists none)."""
    pairs = [(i, j) for i, j in shortlist.pairs() if i >= 0 and j >= 0]
    return PairList(pairs, source)


def shortlist_meta(stage: dict[str, Any], pairs: int, exhaustive: int, spent: dict[str, int]) -> dict[str, Any]:
    """The result's ``meta["shortlist"]``: the stage, and its UNet evaluations beside exhaustive scoring's."""
    used = int(spent.get("conditional", 0) + spent.get("unconditional", 0))
    return {
        **stage,
        "pairs": pairs,
        "unet_evaluations": used,
        "exhaustive_unet_evaluations": exhaustive,
        "fraction_of_exhaustive": round(used / exhaustive, 6) if exhaustive else None,
    }
