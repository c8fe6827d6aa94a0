"""`dsdkit match` as a library function: images x captions -> score matrix (+ result file), on the PyTorch path."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import ScoringConfig
from .errors import ConfigError
from .runtime.images import ImageInput, describe
from .runtime.inputs import list_images, read_captions
from .runtime.results import OUTPUT_FORMATS, MatchResult, write_result

__all__ = ["match", "gather_inputs"]

logger = logging.getLogger(__name__)


def gather_inputs(images: str | os.PathLike | Sequence[ImageInput], captions: str | os.PathLike | Sequence[str]):
    """Resolve a folder / image-list file and a captions file (or in-memory lists) into two lists.

    Returns ``(images, image_names, captions, caption_where)``; ``caption_where`` names each caption's origin for
    error messages (``"captions.txt line 3"``).
    """
    if isinstance(images, (str, os.PathLike)):
        image_list: list[ImageInput] = list(list_images(images))
    else:
        image_list = list(images)
    names = [describe(image, i) for i, image in enumerate(image_list)]
    if isinstance(captions, (str, os.PathLike)):
        read = read_captions(captions)
        caption_list = read.captions
        where = [f"{captions} line {n}" for n in read.line_numbers]
    else:
        caption_list = list(captions)
        where = [f"caption #{i}" for i in range(len(caption_list))]
    return image_list, names, caption_list, where


def match(
    images: str | os.PathLike | Sequence[ImageInput],
    captions: str | os.PathLike | Sequence[str],
    model: Any = None,
    config: ScoringConfig | None = None,
    output: str | os.PathLike | None = None,
    top_k: int = 5,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    per_layer: bool = False,
    adapters: str | os.PathLike | None = None,
) -> MatchResult:
    """Score every image against every caption with the PyTorch scorer and optionally write a result file.

    Args:
        images: a folder, an image-list file, or a list of paths / PIL images / arrays.
        captions: a captions file (one per line) or a list of strings.
        model: a loaded :class:`~dsdkit.models.SD2Model`, a model folder or a hub id. Defaults to SD2-1-base.
        config: scoring config. Defaults to the ``discffusion`` preset.
        output: ``.csv`` (full matrix), ``.json`` or ``.jsonl`` (matrix and top-k lists); written atomically.
        top_k: how many best captions per image and images per caption the JSON outputs list.
        batch_size: UNet batch size. Defaults to 8.
        device, dtype: where and in which precision the UNet runs (see :func:`dsdkit.load_model`).
        progress: ``progress(total, already_done) -> advance`` makes a progress reporter for a job of ``total``
            UNet evaluations; ``advance(n)`` is called as batches finish.
        per_layer: keep the attention term of every scored layer (``[N, M, L]``) in the result and JSON outputs.
        adapters: an adapter file from ``dsdkit train`` (refused if made for another base model or other layers).
    """
    from .models import SD2Model, load_model
    from .scorer import Scorer

    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {output}: unknown format; use a file ending in {', '.join(OUTPUT_FORMATS)}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    config = config or ScoringConfig()
    image_list, names, caption_list, where = gather_inputs(images, captions)
    sd2 = model if isinstance(model, SD2Model) else load_model(model, device=device, dtype=dtype)
    adapter = None
    if adapters is not None:
        from .adapters import load_adapter

        adapter, _ = load_adapter(adapters, sd2, config)
    scorer = Scorer(sd2, config, batch_size=batch_size, adapter=adapter)
    started = time.perf_counter()
    image_encodings = scorer.encode_images(image_list)
    text_encodings = scorer.encode_texts(caption_list, where=where)
    unique_images = len({e.key for e in image_encodings})
    unique_texts = len({e.text for e in text_encodings})
    total = scorer.planned_evaluations(unique_images, unique_images * unique_texts)
    if progress is not None:
        scorer.progress = progress(total, 0)
    output_scores = scorer.score_encoded_matrix(image_encodings, text_encodings)
    elapsed = time.perf_counter() - started
    truncated = {where[j]: count for j, count in enumerate(output_scores.truncated) if count}
    warnings = []
    if sd2.is_test_model:
        warnings.append("random-weight test model: scores are meaningless")
    if truncated:
        warnings.append(f"{len(truncated)} caption(s) longer than {sd2.tokenizer.max_length} tokens were truncated")
        for name, count in truncated.items():
            logger.warning("%s: %d token(s) beyond the 77-token context were dropped", name, count)
    meta = {
        "dsdkit_version": __version__,
        "backend": "pytorch",
        "model": sd2.describe(),
        "scoring": config.to_dict(),
        "adapters": None if adapters is None else str(adapters),
        "timesteps": output_scores.timesteps,
        "layers": output_scores.layer_names,
        "unet_evaluations": output_scores.unet_evaluations,
        "seconds": round(elapsed, 3),
        "truncated_captions": truncated,
        "warnings": warnings,
    }
    result = MatchResult(
        images=names,
        captions=caption_list,
        scores=output_scores.scores,
        meta=meta,
        layer_scores=output_scores.layer_scores if per_layer else None,
    )
    if output is not None:
        write_result(result, output, k=top_k)
        logger.info("wrote %s", output)
    return result
