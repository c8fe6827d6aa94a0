"""`dsdkit match` as a library function: images x captions -> score matrix (+ result file), on either engine.

Written once against the engine interface (:class:`~dsdkit.runtime.engine.Engine`): :func:`open_engine` returns the
PyTorch :class:`~dsdkit.scorer.Scorer` or a bundle's :class:`~dsdkit.runtime.matcher.Matcher`, and everything
after that (screening and decoding images once, chunking, resuming, per-layer terms, metadata, the dry run's
calibration) is the same code for both. Nothing here imports torch unless the PyTorch engine is asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import ScoringConfig
from .errors import ConfigError, InputError
from .runtime.adaptive import EVALUATION_KEYS, Schedule, rank_matrix, resolve_schedule
from .runtime.decode_warnings import collecting
from .runtime.engine import Engine, chunk_slices
from .runtime.files import atomic_write_text
from .runtime.images import ImageInput, check_image, describe, preprocess_image
from .runtime.inputs import list_images, read_captions
from .runtime.jobs import finish, job_fingerprint, run_resumable
from .runtime.pairs import PairList, read_pairs
from .runtime.results import OUTPUT_FORMATS, MatchResult, write_result

__all__ = ["match", "plan_match", "open_engine", "gather_inputs", "JobInputs", "skipped_report_path"]

logger = logging.getLogger(__name__)


@dataclass
class JobInputs:
    """The inputs of a match job, resolved.

    Attributes:
        images: paths / PIL images / arrays, in job order.
        names: each image's name in messages and result files.
        captions: the captions, in job order (blank lines dropped).
        where: each caption's origin for messages (``"captions.txt line 3"``).
        skipped_lines: ``(where, why)`` of caption-file lines that were skipped (blank lines).
    """

    images: list[ImageInput]
    names: list[str]
    captions: list[str]
    where: list[str]
    skipped_lines: list[tuple[str, str]] = field(default_factory=list)


def gather_inputs(
    images: str | os.PathLike | Sequence[ImageInput], captions: str | os.PathLike | Sequence[str]
) -> JobInputs:
    """Resolve a folder / image-list file and a captions file (or in-memory lists)."""
    if isinstance(images, (str, os.PathLike)):
        image_list: list[ImageInput] = list(list_images(images))
    else:
        image_list = list(images)
    names = [describe(image, i) for i, image in enumerate(image_list)]
    if isinstance(captions, (str, os.PathLike)):
        read = read_captions(captions)
        return JobInputs(
            image_list,
            names,
            read.captions,
            [f"{captions} line {n}" for n in read.line_numbers],
            [(f"{captions} line {n}", why) for n, why in read.skipped],
        )
    caption_list = list(captions)
    return JobInputs(image_list, names, caption_list, [f"caption #{i}" for i in range(len(caption_list))])


def skipped_report_path(output: str | os.PathLike) -> Path:
    """Where the skipped-items report of a result file goes: ``results.csv`` -> ``results.skipped.json``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.skipped.json")


#: Skipped images (and, apart, usable images with decoder warnings) logged by name; past that, one line says where
#: the others are, so a folder of hundreds of bad files prints a dozen lines, not hundreds.
SHOWN_BY_NAME = 10


class _Skips:
    """Images skipped in a job (index -> reason) and the decoder warnings of its images (index -> notes), shared with
    the resumable state so a resumed run keeps them.

    Each skip is logged once, as it happens (the CLI prints no second list): the first :data:`SHOWN_BY_NAME` at
    WARNING level, then one line saying where all of them are, the rest at INFO (``dsdkit -v``). Likewise the
    decoder warnings of images that are still scored. ``strict`` turns the first skip into an :class:`InputError`.
    """

    def __init__(self, names: list[str], strict: bool, report: Path | None = None):
        self.names, self.strict, self.report = names, strict, report
        self.images: dict[str, str] = {}  # str(index) -> reason; str keys survive the JSON round trip of state.json
        self.warnings: dict[str, list[str]] = {}  # str(index) -> decoder warnings (runtime.decode_warnings)
        self._logged = {"skipped": 0, "warned": 0}

    def _log(self, kind: str, message: str, *args) -> None:
        self._logged[kind] += 1
        if self._logged[kind] <= SHOWN_BY_NAME:
            logger.warning(message, *args)
            return
        if self._logged[kind] == SHOWN_BY_NAME + 1:
            where = f"in {self.report}" if self.report is not None else "in result.meta (-o writes them to a report)"
            what = "skipped images" if kind == "skipped" else "images with decoder warnings"
            logger.warning("more %s: not named here from now on (-v names them); every one is %s", what, where)
        logger.info(message, *args)

    def skip(self, index: int, error: InputError, notes: Sequence[str] = ()) -> None:
        if self.strict:
            raise InputError(f"{error} (--strict: fix or remove it, or drop --strict to skip it)") from None
        self.images[str(index)] = str(error)
        self.note(index, notes)
        self._log("skipped", "skipped %s", error)

    def note(self, index: int, notes: Sequence[str]) -> None:
        """Keep the decoder warnings of image ``index`` for the report; log those of a usable image once."""
        kept = self.warnings.get(str(index), [])
        new = [n for n in notes if n not in kept]
        if not new:
            return
        self.warnings[str(index)] = kept + new
        if index not in self:
            self._log("warned", "%s: decoder warning (the image is scored): %s", self.names[index], "; ".join(new))

    def screen(self, images: list[ImageInput]) -> _Skips:
        """Header-only check of every image file, so bad files are known (or refused) before any scoring."""
        for index, image in enumerate(images):
            if isinstance(image, (str, os.PathLike)):
                with collecting() as notes:
                    try:
                        check_image(image)
                    except InputError as exc:
                        self.skip(index, exc, notes)
                        continue
                self.note(index, notes)
        return self

    def raise_if_all_skipped(self, count: int) -> None:
        if count and len(self.images) == count:
            raise InputError(
                f"no usable image: all {count} were skipped (first: {self.records()[0]['reason']}); check the images"
            )

    def __contains__(self, index: int) -> bool:
        return str(index) in self.images

    def records(self) -> list[dict]:
        return [
            {"index": int(i), "image": self.names[int(i)], "reason": why, "warnings": self.warnings.get(i, [])}
            for i, why in sorted(self.images.items(), key=lambda item: int(item[0]))
        ]

    def warning_records(self) -> list[dict]:
        """The images that were scored although their decoder raised warnings."""
        return [
            {"index": int(i), "image": self.names[int(i)], "warnings": notes}
            for i, notes in sorted(self.warnings.items(), key=lambda item: int(item[0]))
            if i not in self.images
        ]


def open_engine(
    model: Any = None,
    config: ScoringConfig | None = None,
    adapters: str | os.PathLike | None = None,
    bundle: str | os.PathLike | None = None,
    backend: str = "auto",
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    num_timesteps: int | None = None,
    chunk_size: int = 64,
    compile: str | None = None,
) -> Engine:
    """The engine a job runs on: a bundle's :class:`~dsdkit.runtime.matcher.Matcher` (``bundle``; torch is not
    imported) or the PyTorch :class:`~dsdkit.scorer.Scorer` (``model``, ``config``, ``adapters``, ``compile``).

    The PyTorch engine's scoring config is :func:`~dsdkit.config.resolve_scoring` of ``config`` (as explicit knobs)
    over the adapter's header: an adapter is refused under a config that scores differently from its training.
    """
    if bundle is not None:
        if compile is not None:
            raise ConfigError("--compile is for the PyTorch path (--model); a bundle's speed comes from its backend")
        from .runtime.matcher import Matcher

        return Matcher.from_bundle(
            bundle,
            backend=backend,
            device=device or "auto",
            batch_size=batch_size,
            num_timesteps=num_timesteps,
            chunk_size=chunk_size,
        )
    from .scorer import build_scorer

    # Without a config of its own, the job scores the way the adapter was trained (or with the default preset).
    explicit = config.to_dict() if config is not None else None
    return build_scorer(model, adapters, None, explicit, batch_size, device, dtype, compile, chunk_size=chunk_size)


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
    bundle: str | os.PathLike | None = None,
    backend: str = "auto",
    num_timesteps: int | None = None,
    chunk_size: int = 64,
    resume: bool = False,
    strict: bool = False,
    compile: str | None = None,
    adaptive: Schedule | str | None = None,
    per: str = "image",
    pairs: str | os.PathLike | PairList | None = None,
    engine: Engine | None = None,
    close_engine: bool = True,
    empty_ok: bool = False,
) -> MatchResult:
    """Score every image against every caption and optionally write a result file.

    Two engines (:func:`open_engine`): the PyTorch scorer (``model``, ``config``, ``adapters``) or an exported
    bundle (``bundle``, ``backend``; torch is not imported). Rows are computed in chunks of ``chunk_size`` images;
    with an ``output``, each finished chunk is saved atomically in ``<output>.partial/`` and ``resume`` continues an
    interrupted job.

    Args:
        images: a folder, an image-list file, or a list of paths / PIL images / arrays.
        captions: a captions file (one per line) or a list of strings.
        model: a loaded :class:`~dsdkit.models.SD2Model`, a model folder or a hub id. Defaults to SD2-1-base.
        config: scoring config (PyTorch path). Defaults to the adapter's own (with ``adapters``), else the
            ``discffusion`` preset. An adapter is refused under a config that scores differently from its training.
        output: ``.csv`` (full matrix), ``.json`` or ``.jsonl`` (matrix and top-k lists); written atomically.
        top_k: how many best captions per image and images per caption the JSON outputs list.
        batch_size: UNet / scorer-graph batch size.
        device, dtype: where and in which precision the UNet runs (see :func:`dsdkit.load_model`); for a bundle,
            ``device`` picks the ONNX Runtime provider.
        progress: ``progress(total, already_done) -> advance`` makes a progress reporter for a job of ``total``
            UNet evaluations; ``advance(n)`` is called as batches finish.
        per_layer: keep the attention term of every scored layer (``[N, M, L]``).
        adapters: an adapter file from ``dsdkit train`` (refused if made for another base model or other layers).
        bundle: a bundle folder from ``dsdkit export`` (its scoring config is fixed at export).
        backend: ``auto``, ``onnxruntime`` or ``tensorrt`` (bundles only).
        num_timesteps: S of the discffusion table for a bundle (default: the bundle's).
        chunk_size: images per chunk (memory stays flat; the unit of ``resume``).
        resume: continue from ``<output>.partial/``.
        strict: refuse the job at the first unusable image or blank caption line instead of skipping it.
        compile: PyTorch path: a ``torch.compile`` mode (:data:`~dsdkit.acceleration.COMPILE_MODES`; ``auto`` is
            CUDA graphs on a GPU) with channels-last weights; scores agree with eager ones within the export's parity
            tolerances. The first batch compiles (minutes); worth it for large jobs.
        adaptive: rank by successive elimination (:mod:`dsdkit.runtime.adaptive`) with this schedule (``"default"``
            or e.g. ``"keep=8,3,1:steps=2,6,all"``) instead of scoring every pair at every timestep: the ``top_k``
            best candidates of each query get their exhaustive scores, the others partial means (``result.held``,
            ``result.left_after``). ``None``: exhaustive.
        per: with ``adaptive``, what a query is: ``"image"`` (each image ranks the captions) or ``"caption"``
            (each caption ranks the images of each chunk of ``chunk_size`` images; use ``normalize=uncond``). The
            per-caption top-k of the whole job are then the best exact scores over the chunks.
        pairs: a pair list (:func:`dsdkit.runtime.pairs.read_pairs`: ``.csv``, ``.jsonl``, ``.json``) or a
            :class:`~dsdkit.runtime.pairs.PairList`: only those pairs are scored (with ``adaptive``: each query ranks
            its listed candidates only); the other cells stay empty.
        engine: an engine the caller opened with :func:`open_engine` (``model``, ``config``, ``adapters``,
            ``bundle``, ``backend``, ``batch_size``, ``device``, ``dtype``, ``num_timesteps`` and ``compile`` are
            then not used); the job closes it unless ``close_engine`` is False (a worker that scores several shards
            with one engine). :func:`dsdkit.shards.run_shard` opens it first to compare its identity with the
            job's before anything is scored.
        empty_ok: return a result without rows when every image is skipped, instead of refusing the job: a shard
            of a larger job (:mod:`dsdkit.shards`) may hold only unusable images, and the job goes on.

    Images that cannot be used (unreadable, corrupt, truncated, too large: see :func:`~dsdkit.runtime.images.
    check_image`) are skipped with a one-line reason: they get no row in the result, and the reasons go to
    ``<output stem>.skipped.json`` and ``result.meta["skipped"]``. Blank caption lines are skipped likewise; captions
    over the text encoder's context are truncated and counted. Warnings a decoder raised on an image that is still
    scored go to the report's ``warnings`` (and ``result.meta["image_warnings"]``). The report is written only when
    it has something in it (``result.meta["skipped_report"]`` names it, or is ``None``).
    """
    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {output}: unknown format; use a file ending in {', '.join(OUTPUT_FORMATS)}")
    if output is not None and Path(output).suffix.lower() == ".parquet":
        from .runtime.results import _pyarrow

        _pyarrow(Path(output))  # a missing pyarrow is refused before any scoring, not after it
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {chunk_size}")
    if per_layer and resume:
        raise ConfigError("--per-layer cannot be combined with --resume (per-layer terms are not kept between runs)")
    if per not in ("image", "caption"):
        raise ConfigError(f"--adaptive-per must be image or caption, got {per!r}")
    if isinstance(adaptive, str):
        adaptive = Schedule.parse(adaptive)
    if per_layer and (adaptive is not None or pairs is not None):
        raise ConfigError("--per-layer needs every pair at every timestep; drop --adaptive / --pairs to use it")
    if per == "caption" and adaptive is None:
        raise ConfigError("--adaptive-per caption ranks images by successive elimination: add --adaptive")
    job = gather_inputs(images, captions)
    if strict and job.skipped_lines:
        where_line, why = job.skipped_lines[0]
        raise InputError(f"{where_line}: {why} (--strict: remove it, or drop --strict to skip it)")
    if not job.images or not job.captions:
        raise InputError("nothing to score: give at least one image and one caption")
    pair_list = None
    if pairs is not None:
        pair_list = pairs if isinstance(pairs, PairList) else read_pairs(pairs, job.names, job.captions)
    report = skipped_report_path(output) if output is not None else None
    skips = _Skips(job.names, strict, report).screen(job.images)
    if not empty_ok:
        skips.raise_if_all_skipped(len(job.images))  # before any model is loaded
    started = time.perf_counter()
    if engine is None:
        engine = open_engine(
            model, config, adapters, bundle, backend, batch_size, device, dtype, num_timesteps, chunk_size, compile
        )
    with engine if close_engine else contextlib.nullcontext(engine):
        texts = engine.encode_texts(job.captions, job.where)
        fingerprint = job_fingerprint(
            {
                "images": [_identify(i, name) for i, name in zip(job.images, job.names, strict=True)],
                "captions": job.captions,
                **_identity(engine),
                # Only jobs that rank adaptively or score given pairs say so: plain jobs keep the fingerprint that
                # partial results of earlier versions were saved under.
                **({"adaptive": str(adaptive.describe()), "per": per, "top_k": top_k} if adaptive else {}),
                **({"pairs": pair_list.pairs} if pair_list is not None else {}),
            }
        )
        unique_texts = len({e.text for e in texts})
        usable = len(job.images) - len(skips.images)
        if pair_list is not None:
            listed = sum(1 for i, _ in pair_list.pairs if i not in skips)
            total = engine.planned_evaluations(len({i for i, _ in pair_list.pairs if i not in skips}), listed)
        else:
            total = engine.planned_evaluations(usable, usable * unique_texts)
        # With --adaptive the total is exhaustive scoring's: the bar finishes early by what elimination saved.
        counter = _Counter(progress(total, 0) if progress is not None else None)
        layers = np.full((len(job.images), len(texts), len(engine.layer_names)), np.nan) if per_layer else None
        detailed = adaptive is not None or pair_list is not None
        per_image = pair_list.candidates_per_image(len(job.images)) if pair_list is not None else None
        per_caption = pair_list.candidates_per_caption(len(job.captions)) if pair_list is not None else None
        spent = {key: 0 for key in EVALUATION_KEYS}

        def blocks(start: int):
            """Rows of the score matrix from ``start``, a chunk of images at a time; unusable images stay NaN.

            Each image is decoded once, here: a file that passed the header screen but fails to decode (truncated)
            is skipped now, and the others reach the engine as preprocessed pixels."""
            for rows in chunk_slices(len(job.images), chunk_size, start):
                block = np.full((rows.stop - rows.start, len(texts)), np.nan)
                pixels, at = [], []
                for index in range(rows.start, rows.stop):
                    if index in skips:
                        continue
                    with collecting() as notes:
                        try:
                            pixels.append(
                                preprocess_image(
                                    job.images[index], engine.resolution, engine.config.resize, index=index
                                )
                            )
                        except InputError as exc:
                            skips.skip(index, exc, notes)
                            continue
                    skips.note(index, notes)
                    at.append(index)
                if detailed:
                    yield rows, _detailed_block(rows, pixels, at)
                    continue
                if pixels:
                    out = engine.score_encoded_matrix(engine.encode_pixels(pixels), texts, progress=counter)
                    block[np.asarray(at) - rows.start] = out.scores
                    if layers is not None:
                        layers[at] = out.layer_scores
                    _count(out, len(at) * unique_texts * len(out.steps))
                yield rows, block

        def _count(out, exhaustive_conditional: int) -> None:
            unconditional = out.unconditional_evaluations
            spent["conditional"] += out.unet_evaluations - unconditional
            spent["unconditional"] += unconditional
            spent["exhaustive_conditional"] += exhaustive_conditional
            spent["exhaustive_unconditional"] += unconditional

        def _detailed_block(rows: slice, pixels: list, at: list[int]) -> np.ndarray:
            """``float64[rows, M, 3]``: score, timesteps held, stage left after, for adaptive ranking or given
            pairs (cells that are no candidate: NaN, 0, 0)."""
            block = np.zeros((rows.stop - rows.start, len(texts), 3))
            block[..., 0] = np.nan
            if not pixels:
                return block
            encoded = engine.encode_pixels(pixels)
            local = {index: position for position, index in enumerate(at)}
            if per == "image":
                lists = [per_image[index] if per_image is not None else list(range(len(texts))) for index in at]
            else:
                everyone = list(local.values())
                lists = [
                    [local[i] for i in per_caption[j] if i in local] if per_caption is not None else everyone
                    for j in range(len(texts))
                ]
            rows_at = np.asarray(at) - rows.start
            if adaptive is None:  # given pairs, every one at every timestep
                pairs_here = [(q, j) for q, listed in enumerate(lists) for j in listed]
                if pairs_here:
                    out = engine.score_encoded_pairs(encoded, texts, pairs_here, progress=counter)
                    _count(out, len(pairs_here) * len(out.steps))
                    for (q, j), score in zip(pairs_here, out.scores, strict=True):
                        block[rows_at[q], j] = (score, len(out.steps), 0)
                return block
            ranked = rank_matrix(engine, encoded, texts, top_k, adaptive, per, lists, progress=counter)
            for key in EVALUATION_KEYS:
                spent[key] += ranked.evaluations[key]
            block[rows_at, :, 0] = ranked.scores
            block[rows_at, :, 1] = ranked.held
            block[rows_at, :, 2] = ranked.left_after
            return block

        saved = run_resumable(
            blocks,
            (len(job.images), len(job.captions), 3) if detailed else (len(job.images), len(job.captions)),
            output,
            fingerprint,
            resume,
            {"skipped_images": skips.images, "image_warnings": skips.warnings, "evaluations": spent},
        )
        scores = saved[..., 0] if detailed else saved
        if strict and skips.images:  # skipped by an earlier run without --strict, merged back by --resume
            raise InputError(
                f"{skips.records()[0]['reason']} (--strict: an earlier run skipped it; fix or remove it, "
                "or resume without --strict)"
            )
        meta = _meta(engine, texts, job.where, counter.evaluations)
        meta["evaluations"] = dict(spent)  # this run's and, after --resume, the earlier runs' too
        if adaptive is not None:
            meta["adaptive"] = {"schedule": adaptive.describe(), "per": per, "top_k": top_k}
        if pair_list is not None:
            meta["pairs"] = {
                "source": pair_list.source,
                "pairs": len(pair_list.pairs),
                "duplicates": pair_list.duplicates,
            }
        num_steps = len(engine.timesteps)
    if not empty_ok:
        skips.raise_if_all_skipped(len(job.images))
    keep = [i for i in range(len(job.images)) if i not in skips]
    meta["seconds"] = round(time.perf_counter() - started, 3)
    meta["skipped"] = {
        "images": skips.records(),
        "caption_lines": [{"where": w, "reason": why} for w, why in job.skipped_lines],
    }
    meta["image_warnings"] = skips.warning_records()
    # A report only when there is something in it: no file says "nothing was skipped".
    if not (
        meta["skipped"]["images"]
        or meta["skipped"]["caption_lines"]
        or meta.get("truncated_captions")
        or meta["image_warnings"]
    ):
        report = None
    meta["skipped_report"] = report.name if report is not None else None
    result = MatchResult(
        images=[job.names[i] for i in keep],
        captions=job.captions,
        scores=scores[keep],
        meta=meta,
        layer_scores=None if layers is None else layers[keep],
        held=saved[keep][..., 1].astype(np.int64) if detailed else None,
        left_after=saved[keep][..., 2].astype(np.int64) if detailed else None,
        num_timesteps=num_steps if detailed else None,
    )
    if output is not None:
        write_result(result, output, k=top_k)
        if report is not None:
            document = {
                "format": "dsdkit-skipped/1",
                "result": Path(output).name,
                **meta["skipped"],
                "truncated_captions": meta.get("truncated_captions", {}),
                "warnings": meta["image_warnings"],
            }
            atomic_write_text(report, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
        else:
            # An earlier run's report next to this result would describe skips that did not happen.
            stale = skipped_report_path(output)
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("%s is an earlier run's report and could not be removed (%s)", stale, exc.strerror)
        finish(output)
        logger.info("wrote %s", output)
    return result


class _Counter:
    """The progress callback of a job: counts evaluations and forwards them to the user's reporter."""

    def __init__(self, advance: Callable[[int], None] | None):
        self.advance = advance
        self.evaluations = 0

    def __call__(self, n: int) -> None:
        self.evaluations += n
        if self.advance is not None:
            self.advance(n)


def _identity(engine: Engine) -> dict[str, Any]:
    """What, besides the inputs, makes a job's numbers (the resume fingerprint; its form is kept stable so that
    partial results of earlier versions still resume)."""
    meta = engine.metadata()
    if meta["backend"] == "pytorch":
        return {
            "engine": "pytorch",
            "model": meta["model_identity"],
            "scoring": meta["scoring"],
            "adapters": meta["adapters"],
            "timesteps": meta["timesteps"],
        }
    return {
        "engine": "bundle",
        "scorer": meta["bundle_scorer_sha256"],
        "scoring": meta["scoring"],
        "timesteps": meta["timesteps"],
    }


def _meta(engine: Engine, texts, where: list[str], evaluations: int) -> dict[str, Any]:
    """The result file's ``meta``: the engine's metadata plus what this job did."""
    meta = engine.metadata()
    truncated = {where[j]: e.tokens.truncated for j, e in enumerate(texts) if e.tokens.truncated}
    warnings = list(meta.pop("warnings"))
    length = meta.pop("text_length")
    if truncated:
        warnings.append(f"{len(truncated)} caption(s) longer than {length} tokens were truncated")
        for name, count in truncated.items():
            logger.warning("%s: %d token(s) beyond the %d-token context were dropped", name, count, length)
    out = {"dsdkit_version": __version__, **meta}
    if meta["backend"] == "pytorch":
        out.pop("model_identity")
    else:
        manifest = engine.bundle.manifest
        out.pop("bundle_scorer_sha256")
        out["backend"] = next(iter(engine.runners.values())).name
        out["model"] = {k: manifest["model"][k] for k in ("source", "identity", "resolution", "licence")}
        out["precision"] = manifest["precision"]
    out["unet_evaluations"] = evaluations
    out["truncated_captions"] = truncated
    out["warnings"] = warnings
    return out


def plan_match(
    images: str | os.PathLike | Sequence[ImageInput],
    captions: str | os.PathLike | Sequence[str],
    model: Any = None,
    config: ScoringConfig | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    adapters: str | os.PathLike | None = None,
    bundle: str | os.PathLike | None = None,
    backend: str = "auto",
    num_timesteps: int | None = None,
    compile: str | None = None,
    adaptive: Schedule | str | None = None,
    top_k: int = 5,
) -> dict[str, Any]:
    """What a match job will cost, from a short calibration of the engine that will run it (``--dry-run``; with
    ``compile``, the compiled scorer, so the first timed batch follows a compiling warm-up).

    Returns pairs, UNet evaluations (``N·S`` unconditional when needed + ``N·M·S``), measured seconds per image
    encoding, caption encoding and UNet batch, and the estimated total seconds. With ``adaptive`` (per image), the
    evaluations are the schedule's exactly: Σ survivors × new timesteps per image, plus the unconditional pass.
    """
    if isinstance(adaptive, str):
        adaptive = Schedule.parse(adaptive)
    job = gather_inputs(images, captions)
    skips = _Skips(job.names, strict=False).screen(job.images)
    image_list = [image for i, image in enumerate(job.images) if i not in skips]
    caption_list, where = job.captions, job.where
    if not image_list or not caption_list:
        raise InputError("nothing to score: give at least one usable image and one caption")
    n, m = len(image_list), len(caption_list)
    engine = open_engine(
        model, config, adapters, bundle, backend, batch_size, device, dtype, num_timesteps, compile=compile
    )
    with engine:
        timing = _calibrate(engine, image_list[0], caption_list[0], where[0])
        steps, batch = len(engine.timesteps), engine.batch_size
        evaluations = exhaustive = engine.planned_evaluations(n, n * m)
        if adaptive is not None:
            plan = resolve_schedule(adaptive, m, steps, top_k)
            evaluations = exhaustive - n * m * steps + n * plan.evaluations(m)
        meta = engine.metadata()
        if meta["backend"] == "pytorch":
            label = f"pytorch ({engine.model.device}, {engine.model.precision.value})"
            if compile is not None:
                label += f", compiled ({compile})"
        else:
            label = f"{next(iter(engine.runners.values())).name} ({bundle})"
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


def _identify(image: ImageInput, name: str) -> str:
    """What a resumed job compares: a file's path, size and modification time, or an in-memory image's name."""
    if isinstance(image, (str, os.PathLike)):
        try:
            stat = os.stat(image)
            return f"{name}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return name
    return name
