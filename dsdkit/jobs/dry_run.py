"""``dsdkit match --dry-run``: what a match job will cost, from a short calibration of the engine that will run it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from typing import Any

from ..runtime.adaptive import resolve_schedule
from ..runtime.engine import Engine
from ..runtime.errors import InputError
from ..runtime.images import ImageInput
from .engines import open_engine
from .inputs import gather_inputs
from .skips import SkippedImages
from .specs import EngineSpec, MatchOptions

__all__ = ["estimate_match"]


def estimate_match(
    images: str | os.PathLike | Sequence[ImageInput],
    captions: str | os.PathLike | Sequence[str],
    engine: EngineSpec | Engine,
    options: MatchOptions | None = None,
) -> dict[str, Any]:
    """What a match job will cost, from a short calibration of the engine that will run it (with ``compile``, the
    compiled scorer, so the first timed batch follows a compiling warm-up). ``engine``: a spec (opened and closed
    here) or an engine the caller keeps open.

    Returns pairs, UNet evaluations (``N·S`` unconditional when needed + ``N·M·S``), measured seconds per image
    encoding, caption encoding and UNet batch, and the estimated total seconds. With ``options.adaptive`` (per
    image), the evaluations are the schedule's exactly: Σ survivors × new timesteps per image, plus the
    unconditional pass.
    """
    options = options or MatchOptions()
    adaptive = options.adaptive
    job = gather_inputs(images, captions)
    skips = SkippedImages(job.names, strict=False).screen(job.images)
    image_list = [image for i, image in enumerate(job.images) if i not in skips]
    caption_list, where = job.captions, job.where
    if not image_list or not caption_list:
        raise InputError("nothing to score: give at least one usable image and one caption")
    n, m = len(image_list), len(caption_list)
    own = isinstance(engine, EngineSpec)
    with open_engine(engine) if own else contextlib.nullcontext(engine) as opened:
        timing = _calibrate(opened, image_list[0], caption_list[0], where[0])
        steps, batch = len(opened.timesteps), opened.batch_size
        evaluations = exhaustive = opened.planned_evaluations(n, n * m)
        if adaptive is not None:
            plan = resolve_schedule(adaptive, m, steps, options.top_k)
            evaluations = exhaustive - n * m * steps + n * plan.evaluations(m)
        label = opened.describe().label
    batches = -(-evaluations // batch)
    estimate = n * timing["image_s"] + m * timing["caption_s"] + batches * timing["batch_s"]
    return {
        "images": n,
        "captions": m,
        "skipped_images": len(skips.images),
        "pairs": n * m,
        "timesteps": steps,
        "unet_evaluations": evaluations,
        **({"exhaustive_unet_evaluations": exhaustive, "adaptive": adaptive.describe()} if adaptive else {}),
        "batch_size": batch,
        "calibration": timing,
        "estimated_seconds": estimate,
        "engine": label,
    }


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _calibrate(engine: Engine, image, caption, where) -> dict[str, float]:
    """Seconds per image encoding, caption encoding and full UNet batch, measured on the job's own engine."""
    image_s = _timed(lambda: engine.encode_images([image]))
    caption_s = _timed(lambda: engine.encode_texts([caption], where=[where]))
    encoded, text = engine.encode_images([image]), engine.encode_texts([caption], where=[where])
    pairs = [(0, 0)] * engine.batch_size  # one full batch at one timestep
    engine.score_encoded_pairs(encoded, text, pairs, steps=[0])  # warm-up (and the unconditional pass, cached)
    batch_s = _timed(lambda: engine.score_encoded_pairs(encoded, text, pairs, steps=[0]))
    return {"image_s": image_s, "caption_s": caption_s, "batch_s": batch_s}
