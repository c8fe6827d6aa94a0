"""`dsdkit match` as a library function: images x captions -> score matrix (+ result file), on either engine.

A match job runs as named stages, each a function of this module, written once against the engine interface
(:class:`~dsdkit.runtime.engine.Engine`), so shards and Ray workers run the very same code:

1. **check**: :class:`~dsdkit.jobs.specs.EngineSpec` and :class:`~dsdkit.jobs.specs.MatchOptions` validate
   themselves on construction (before anything is read or loaded);
2. **prepare inputs** (:func:`prepare_inputs`): the image list and captions resolved, every image file's header
   screened so bad files are known (or refused) first, the pair list read;
3. **plan** (:func:`plan_scoring`): captions encoded once, the resume fingerprint, the evaluations the job will run,
   and the block scorer its options ask for (:mod:`dsdkit.jobs.blocks`);
4. **score blocks** (:func:`score_blocks`): the engine's one block iterator
   (:meth:`~dsdkit.runtime.engine.Engine.iter_image_chunks`) decodes and encodes a chunk of images at a time, the
   block scorer fills its rows, and each finished chunk is saved atomically for ``resume``
   (:func:`~dsdkit.runtime.resume.run_resumable`);
5. **assemble** (:func:`assemble_result`): the :class:`~dsdkit.runtime.results.MatchResult` with its ``meta``;
6. **write** (:func:`write_outputs`): the result file, the skipped-items report, the partial state removed.

Nothing here imports torch unless the PyTorch engine is asked for (:func:`~dsdkit.jobs.engines.open_engine`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.engine import Engine
from ..runtime.errors import InputError
from ..runtime.images import ImageInput
from ..runtime.pairs import PairList, read_pairs
from ..runtime.results import MatchResult, require_parquet, write_result
from ..runtime.resume import finish, job_fingerprint, run_resumable
from ..runtime.shortlist import Shortlist
from ..runtime.version import __version__
from .blocks import BlockScorer, EvaluationCounter, block_scorer
from .engines import open_engine
from .inputs import JobInputs, gather_inputs, identify_image
from .shortlists import compute_shortlist, shortlist_meta, shortlist_pairs
from .skips import SHOWN_BY_NAME, SkippedImages, skipped_report_path
from .specs import EngineSpec, MatchOptions, ShortlistSpec

__all__ = [
    "match",
    "prepare_inputs",
    "shortlist_stage",
    "plan_scoring",
    "score_blocks",
    "assemble_result",
    "write_outputs",
    "fused_if_asked",
    "PreparedJob",
    "JobPlan",
    "open_engine",
    "gather_inputs",
    "JobInputs",
    "skipped_report_path",
    "SHOWN_BY_NAME",
    "EngineSpec",
    "MatchOptions",
]

logger = logging.getLogger(__name__)

#: ``progress(total, already_done) -> advance``: makes a reporter for a job of ``total`` UNet evaluations.
ProgressFactory = Callable[[int, int], Callable[[int], None]]


@dataclass
class PreparedJob:
    """Stage 2's result: the inputs, the pair list (if any) and the skip bookkeeping."""

    inputs: JobInputs
    pairs: PairList | None
    skips: SkippedImages


@dataclass
class JobPlan:
    """Stage 3's result: what the job scores with and what it will cost."""

    texts: list
    fingerprint: str
    total: int
    counter: EvaluationCounter
    scorer: BlockScorer
    num_steps: int
    exhaustive: int = 0  # the UNet evaluations of scoring every usable pair (what a shortlist saves against)
    shortlist: Shortlist | None = None
    shortlist_stage: dict[str, Any] | None = None


def prepare_inputs(
    images: str | os.PathLike | Sequence[ImageInput],
    captions: str | os.PathLike | Sequence[str],
    options: MatchOptions,
) -> PreparedJob:
    """Stage 2: resolve the inputs, screen every image file's header, read the pair list."""
    if options.output is not None and Path(options.output).suffix.lower() == ".parquet":
        require_parquet(Path(options.output))  # a missing pyarrow is refused before any scoring, not after it
    inputs = gather_inputs(images, captions)
    if options.strict and inputs.skipped_lines:
        where_line, why = inputs.skipped_lines[0]
        raise InputError(f"{where_line}: {why} (`strict`: remove it, or drop `strict` to skip it)")
    if not inputs.images or not inputs.captions:
        raise InputError("nothing to score: give at least one image and one caption")
    pairs = options.pairs
    if pairs is not None and not isinstance(pairs, PairList):
        pairs = read_pairs(pairs, inputs.names, inputs.captions)
    report = skipped_report_path(options.output) if options.output is not None else None
    skips = SkippedImages(inputs.names, options.strict, report).screen(inputs.images)
    skips.note_caption_lines(inputs.skipped_lines)
    if not options.empty_ok:
        skips.raise_if_all_skipped(len(inputs.images))  # before any model is loaded
    return PreparedJob(inputs, pairs, skips)


def shortlist_stage(job: PreparedJob, engine: Engine, options: MatchOptions) -> tuple[Shortlist, dict] | None:
    """Stage 2b (a gallery search): the CLIP shortlist; its pairs become the job's pairs unless it keeps every
    candidate (then the job is the one without it, exactly)."""
    spec = options.shortlist
    if spec is None:
        return None
    shortlisted, stage = compute_shortlist(job, engine, spec, options.per)
    if not shortlisted.keeps_all:
        job.pairs = shortlist_pairs(shortlisted, f"shortlist of {stage['model']} (k={spec.k}, per {options.per})")
    return shortlisted, stage


def plan_scoring(job: PreparedJob, engine: Engine, options: MatchOptions, progress: ProgressFactory | None) -> JobPlan:
    """Stage 3: encode the captions, fingerprint the job, count its evaluations, choose its block scorer."""
    inputs, pairs, skips = job.inputs, job.pairs, job.skips
    texts = engine.encode_texts(inputs.captions, inputs.where)
    fingerprint = job_fingerprint(
        {
            "images": [identify_image(i, name) for i, name in zip(inputs.images, inputs.names, strict=True)],
            "captions": inputs.captions,
            **engine.identity().to_dict(),
            # Only jobs that rank adaptively or score given pairs say so: plain jobs keep the fingerprint that
            # partial results of earlier versions were saved under.
            **(
                {"adaptive": str(options.adaptive.describe()), "per": options.per, "top_k": options.top_k}
                if options.adaptive is not None
                else {}
            ),
            **({"pairs": pairs.pairs} if pairs is not None else {}),
            **({"shortlist": options.shortlist.to_dict()} if options.shortlist is not None else {}),
        }
    )
    usable = len(inputs.images) - len(skips.images)
    exhaustive = engine.planned_evaluations(usable, usable * len({e.text for e in texts}))
    if pairs is not None:
        listed = [i for i, _ in pairs.pairs if i not in skips]
        total = engine.planned_evaluations(len(set(listed)), len(listed))
    else:
        total = engine.planned_evaluations(usable, usable * len({e.text for e in texts}))
    # With adaptive ranking the total is exhaustive scoring's: the bar finishes early by what elimination saved.
    counter = EvaluationCounter(progress(total, 0) if progress is not None else None)
    scorer = block_scorer(engine, texts, counter, options, pairs, len(inputs.images))
    return JobPlan(texts, fingerprint, total, counter, scorer, len(engine.timesteps), exhaustive)


def score_blocks(job: PreparedJob, engine: Engine, plan: JobPlan, options: MatchOptions) -> np.ndarray:
    """Stage 4: score the images a chunk at a time through the engine's one block iterator; each finished chunk is
    saved for ``resume`` (with the skips and the evaluations spent, so a resumed job keeps them)."""
    skips = job.skips

    def blocks(start: int):
        chunks = engine.iter_image_chunks(
            job.inputs.images, start, skip=skips, on_error=skips.skip, on_warnings=skips.note
        )
        for rows, positions, encoded in chunks:
            yield rows, plan.scorer.score(rows, positions, encoded)

    count = len(job.inputs.images)
    shape = (count, len(job.inputs.captions), 3) if plan.scorer.detailed else (count, len(job.inputs.captions))
    notes = {"skipped_images": skips.images, "image_warnings": skips.warnings, "evaluations": plan.counter.spent}
    return run_resumable(blocks, shape, options.output, plan.fingerprint, options.resume, notes)


def assemble_result(
    job: PreparedJob, engine: Engine, plan: JobPlan, saved: np.ndarray, options: MatchOptions, seconds: float
) -> MatchResult:
    """Stage 5: the result (rows of usable images only) and its ``meta``."""
    inputs, skips = job.inputs, job.skips
    if options.strict and skips.images:  # skipped by an earlier run without --strict, merged back by --resume
        raise InputError(
            f"{skips.records()[0]['reason']} (`strict`: an earlier run skipped it; fix or remove it, "
            "or resume without `strict`)"
        )
    if not options.empty_ok:
        skips.raise_if_all_skipped(len(inputs.images))
    meta = _engine_meta(engine, plan.texts, inputs.where, plan.counter.evaluations)
    meta["evaluations"] = dict(plan.counter.spent)  # this run's and, after --resume, the earlier runs' too
    if options.adaptive is not None:
        meta["adaptive"] = {"schedule": options.adaptive.describe(), "per": options.per, "top_k": options.top_k}
    if job.pairs is not None and plan.shortlist is None:
        meta["pairs"] = {"source": job.pairs.source, "pairs": len(job.pairs.pairs), "duplicates": job.pairs.duplicates}
    if plan.shortlist is not None:
        listed = (
            len(job.pairs.pairs) if job.pairs is not None else plan.shortlist.num_images * plan.shortlist.num_captions
        )
        meta["shortlist"] = shortlist_meta(plan.shortlist_stage, listed, plan.exhaustive, plan.counter.spent)
    meta["seconds"] = round(seconds, 3)
    meta.update(skips.meta(meta.get("truncated_captions", {})))
    keep = [i for i in range(len(inputs.images)) if i not in skips]
    detailed = plan.scorer.detailed
    layers = getattr(plan.scorer, "layers", None)
    return MatchResult(
        images=[inputs.names[i] for i in keep],
        captions=inputs.captions,
        scores=(saved[..., 0] if detailed else saved)[keep],
        meta=meta,
        layer_scores=None if layers is None else layers[keep],
        held=saved[keep][..., 1].astype(np.int64) if detailed else None,
        left_after=saved[keep][..., 2].astype(np.int64) if detailed else None,
        num_timesteps=plan.num_steps if detailed else None,
        shortlist_rank=None if plan.shortlist is None else plan.shortlist.rank_matrix()[keep],
        shortlist_similarity=None if plan.shortlist is None else plan.shortlist.similarity_matrix()[keep],
    )


def write_outputs(result: MatchResult, job: PreparedJob, options: MatchOptions) -> None:
    """Stage 6: the result file, the skipped-items report (or no stale one), the partial state removed."""
    if options.output is None:
        return
    write_result(result, options.output, k=options.top_k)
    job.skips.write_report(result.meta, options.output)
    finish(options.output)
    logger.info("wrote %s", options.output)


def match(
    images: str | os.PathLike | Sequence[ImageInput],
    captions: str | os.PathLike | Sequence[str],
    engine: EngineSpec | Engine | None = None,
    options: MatchOptions | None = None,
    *,
    progress: ProgressFactory | None = None,
    close_engine: bool = True,
    **legacy: Any,
) -> MatchResult:
    """Score every image against every caption and optionally write a result file: the six stages of the module.

    Args:
        images: a folder, an image-list file, or a list of paths / PIL images / arrays.
        captions: a captions file (one per line) or a list of strings.
        engine: an :class:`~dsdkit.jobs.specs.EngineSpec` (the job opens the engine and closes it), or an engine
            the caller opened with :func:`~dsdkit.jobs.engines.open_engine` (closed too unless ``close_engine`` is
            False: a worker that scores several shards with one engine). Default: ``EngineSpec()``, the default
            model on the PyTorch engine.
        options: what the job computes and writes (:class:`~dsdkit.jobs.specs.MatchOptions`).
        progress: ``progress(total, already_done) -> advance`` makes a progress reporter for a job of ``total``
            UNet evaluations; ``advance(n)`` is called as batches finish.
        legacy: the keyword arguments of earlier versions (``model``, ``config``, ``bundle``, ``output``,
            ``top_k``, ...), sorted into the two specs by :func:`specs_from_keywords`.

    Images that cannot be used are skipped with a one-line reason (no row in the result; the reasons go to
    ``<output stem>.skipped.json`` and ``result.meta["skipped"]``); blank caption lines likewise; captions over
    the text encoder's context are truncated and counted.
    """
    if legacy:
        engine, options = specs_from_keywords(engine, options, legacy)
    options = options or MatchOptions()
    engine = engine if engine is not None else EngineSpec()
    job = prepare_inputs(images, captions, options)
    started = time.perf_counter()
    opened = open_engine(engine) if isinstance(engine, EngineSpec) else engine
    own = isinstance(engine, EngineSpec) or close_engine
    with opened if own else contextlib.nullcontext(opened):
        shortlisted = shortlist_stage(job, opened, options)
        plan = plan_scoring(job, opened, options, progress)
        if shortlisted is not None:
            plan.shortlist, plan.shortlist_stage = shortlisted
        saved = score_blocks(job, opened, plan, options)
        result = assemble_result(job, opened, plan, saved, options, time.perf_counter() - started)
    result = fused_if_asked(result, options.shortlist, options.per)
    write_outputs(result, job, options)
    return result


def fused_if_asked(result: MatchResult, spec: ShortlistSpec | dict | None, per: str) -> MatchResult:
    """Stage 5b of a gallery search with ``shortlist.fuse``: the result ranked by the fused score (the single
    process, the bundle, Ray and a merged sharded job all end here, so each path fuses the same way)."""
    weight = spec.get("fuse") if isinstance(spec, dict) else getattr(spec, "fuse", None)
    return result if weight is None else result.fused(weight, per)


#: Keyword arguments of the earlier ``match`` signature that belong to the engine spec (name there -> field).
_ENGINE_KEYWORDS = {
    "model": "model",
    "bundle": "bundle",
    "adapters": "adapters",
    "backend": "backend",
    "batch_size": "batch_size",
    "device": "device",
    "dtype": "dtype",
    "compile": "compile",
    "chunk_size": "chunk_size",
}
_OPTION_KEYWORDS = {"output", "top_k", "adaptive", "per", "pairs", "per_layer", "resume", "strict", "empty_ok"}


def _knobs_of_config(config) -> dict[str, Any]:
    """A whole :class:`ScoringConfig` as knobs. It carries every field, so a ``tokens`` value that is its preset's
    own is not a choice: left out, a model that declares a word-token context is scored over its words (as
    :class:`~dsdkit.pytorch.scorer.Scorer` does with the same config) instead of refusing the preset's value."""
    from ..runtime.config import PRESETS

    knobs = config.to_dict()
    preset = PRESETS.get(knobs.get("preset") or "discffusion")
    if preset is not None and knobs.get("tokens") == preset.to_dict()["tokens"]:
        del knobs["tokens"]
    return knobs


def specs_from_keywords(
    engine: EngineSpec | Engine | None, options: MatchOptions | None, keywords: dict[str, Any]
) -> tuple[EngineSpec | Engine, MatchOptions]:
    """The two specs from the keyword arguments of the earlier ``match`` signature (``model=``, ``config=``,
    ``bundle=``, ``num_timesteps=``, ``output=``, ``top_k=``, ...), so code written for it keeps working."""
    from ..runtime.errors import ConfigError

    unknown = sorted(set(keywords) - set(_ENGINE_KEYWORDS) - _OPTION_KEYWORDS - {"config", "num_timesteps"})
    if unknown:
        raise ConfigError(f"match() got unknown keyword argument(s): {', '.join(unknown)}")
    fields = {field: keywords[name] for name, field in _ENGINE_KEYWORDS.items() if keywords.get(name) is not None}
    knobs = {}
    if keywords.get("config") is not None:
        knobs.update(_knobs_of_config(keywords["config"]))
    if keywords.get("num_timesteps") is not None:
        knobs["num_timesteps"] = keywords["num_timesteps"]
    if isinstance(engine, Engine):
        if fields or knobs:
            raise ConfigError("match(): pass either an opened engine or the engine's options, not both")
    elif fields.get("model") is not None and not isinstance(fields["model"], (str, os.PathLike)):
        # A model already loaded in memory (an SD2Model): its scorer is this job's engine.
        from ..pytorch.scorer import build_scorer

        engine = build_scorer(
            fields["model"],
            fields.get("adapters"),
            None,
            knobs,
            fields.get("batch_size"),
            chunk_size=fields.get("chunk_size", 64),
            compile=fields.get("compile"),
        )
    else:
        engine = (engine or EngineSpec()).replace(**fields, knobs={**(engine.knobs if engine else {}), **knobs})
    chosen = {k: v for k, v in keywords.items() if k in _OPTION_KEYWORDS}
    options = (options or MatchOptions()).replace(**chosen)
    return engine, options


def _engine_meta(engine: Engine, texts, where: list[str], evaluations: int) -> dict[str, Any]:
    """The result file's ``meta``: the engine's description plus what this job did."""
    description = engine.describe()
    truncated = {where[j]: e.tokens.truncated for j, e in enumerate(texts) if e.tokens.truncated}
    warnings = list(description.warnings)
    if truncated:
        warnings.append(f"{len(truncated)} caption(s) longer than {description.text_length} tokens were truncated")
        for name, count in truncated.items():
            logger.warning(
                "%s: %d token(s) beyond the %d-token context were dropped", name, count, description.text_length
            )
    out = {"dsdkit_version": __version__, **description.to_dict()}
    out["unet_evaluations"] = evaluations
    out["truncated_captions"] = truncated
    out["warnings"] = warnings
    return out
