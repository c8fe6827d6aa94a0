"""`dsdkit match` as a library function: images x captions -> score matrix (+ result file), on the PyTorch scorer
or on an exported bundle."""

from __future__ import annotations

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
from .runtime.files import atomic_write_text
from .runtime.images import ImageInput, Pixels, ResizeMode, check_image, describe, preprocess_image
from .runtime.inputs import list_images, read_captions
from .runtime.jobs import finish, job_fingerprint, run_resumable
from .runtime.results import OUTPUT_FORMATS, MatchResult, write_result

__all__ = ["match", "gather_inputs", "JobInputs", "skipped_report_path"]

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


class _Skips:
    """Images skipped in a job (index -> reason), shared with the resumable state so a resumed run keeps them.

    ``strict`` turns the first skip into an :class:`InputError` instead.
    """

    def __init__(self, names: list[str], strict: bool):
        self.names, self.strict = names, strict
        self.images: dict[str, str] = {}  # str(index) -> reason; str keys survive the JSON round trip of state.json

    def skip(self, index: int, error: InputError) -> None:
        if self.strict:
            raise InputError(f"{error} (--strict: fix or remove it, or drop --strict to skip it)") from None
        logger.warning("skipping %s", error)
        self.images[str(index)] = str(error)

    def screen(self, images: list[ImageInput]) -> _Skips:
        """Header-only check of every image file, so bad files are known (or refused) before any scoring."""
        for index, image in enumerate(images):
            if isinstance(image, (str, os.PathLike)):
                try:
                    check_image(image)
                except InputError as exc:
                    self.skip(index, exc)
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
            {"index": int(i), "image": self.names[int(i)], "reason": why}
            for i, why in sorted(self.images.items(), key=lambda item: int(item[0]))
        ]


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
) -> MatchResult:
    """Score every image against every caption and optionally write a result file.

    Two engines: the PyTorch scorer (``model``, ``config``, ``adapters``) or an exported bundle (``bundle``,
    ``backend``; torch is not imported). Rows are computed in chunks of ``chunk_size`` images; with an ``output``,
    each finished chunk is saved atomically in ``<output>.partial/`` and ``resume`` continues an interrupted job.

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
        per_layer: keep the attention term of every scored layer (``[N, M, L]``; PyTorch path).
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

    Images that cannot be used (unreadable, corrupt, truncated, too large: see :func:`~dsdkit.runtime.images.
    check_image`) are skipped with a one-line reason: they get no row in the result, and the reasons go to
    ``<output stem>.skipped.json`` and ``result.meta["skipped"]``. Blank caption lines are skipped likewise; captions
    over the text encoder's context are truncated and counted.
    """
    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--output {output}: unknown format; use a file ending in {', '.join(OUTPUT_FORMATS)}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    if chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {chunk_size}")
    if per_layer and resume:
        raise ConfigError("--per-layer cannot be combined with --resume (per-layer terms are not kept between runs)")
    job = gather_inputs(images, captions)
    if strict and job.skipped_lines:
        where_line, why = job.skipped_lines[0]
        raise InputError(f"{where_line}: {why} (--strict: remove it, or drop --strict to skip it)")
    if not job.images or not job.captions:
        raise InputError("nothing to score: give at least one image and one caption")
    skips = _Skips(job.names, strict).screen(job.images)
    skips.raise_if_all_skipped(len(job.images))  # before any model is loaded
    started = time.perf_counter()
    if bundle is not None:
        if per_layer:
            raise ConfigError("--per-layer comes from the PyTorch path (--model); bundles output pooled scores only")
        if compile is not None:
            raise ConfigError("--compile is for the PyTorch path (--model); a bundle's speed comes from its backend")
        engine = _BundleEngine(bundle, backend, device, batch_size, num_timesteps, chunk_size)
    else:
        engine = _TorchEngine(model, config, adapters, batch_size, device, dtype, compile)
    with engine:
        text_count = engine.encode_texts(job.captions, job.where)
        fingerprint = job_fingerprint(
            {
                "images": [_identify(i, name) for i, name in zip(job.images, job.names, strict=True)],
                "captions": job.captions,
                **engine.identity(),
            }
        )
        total = engine.planned_evaluations(len(job.images) - len(skips.images), text_count)
        if progress is not None:
            engine.set_progress(progress(total, 0))
        notes = {"skipped_images": skips.images}
        scores = run_resumable(
            lambda start: _blocks(engine, job, skips, chunk_size, start),
            (len(job.images), len(job.captions)),
            output,
            fingerprint,
            resume,
            notes,
        )
        skips.images = notes["skipped_images"]
        if strict and skips.images:  # skipped by an earlier run without --strict, merged back by --resume
            raise InputError(
                f"{skips.records()[0]['reason']} (--strict: an earlier run skipped it; fix or remove it, "
                "or resume without --strict)"
            )
        meta = engine.meta(job.captions, job.where)
        layer_scores = engine.layer_scores() if per_layer else None
    skips.raise_if_all_skipped(len(job.images))
    keep = [i for i in range(len(job.images)) if i not in skips]
    meta["seconds"] = round(time.perf_counter() - started, 3)
    meta["skipped"] = {
        "images": skips.records(),
        "caption_lines": [{"where": w, "reason": why} for w, why in job.skipped_lines],
    }
    result = MatchResult(
        images=[job.names[i] for i in keep],
        captions=job.captions,
        scores=scores[keep],
        meta=meta,
        layer_scores=None if layer_scores is None else layer_scores[keep],
    )
    if output is not None:
        write_result(result, output, k=top_k)
        report = {
            "format": "dsdkit-skipped/1",
            "result": Path(output).name,
            **meta["skipped"],
            "truncated_captions": meta.get("truncated_captions", {}),
        }
        atomic_write_text(skipped_report_path(output), json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        finish(output)
        logger.info("wrote %s", output)
    return result


def _blocks(engine, job: JobInputs, skips: _Skips, chunk_size: int, start: int):
    """Rows of the score matrix from ``start``, a chunk of images at a time; unusable images stay NaN rows.

    Each image is decoded once, here: a file that passed the header screen but fails to decode (truncated) is
    skipped now, and the others reach the engine as :class:`Pixels`.
    """
    count = len(job.captions)
    for begin in range(start, len(job.images), chunk_size):
        rows = slice(begin, min(begin + chunk_size, len(job.images)))
        block = np.full((rows.stop - begin, count), np.nan)
        ready, at = [], []
        for index in range(rows.start, rows.stop):
            if index in skips:
                continue
            try:
                pixels = preprocess_image(job.images[index], engine.resolution, engine.resize, index=index)
            except InputError as exc:
                skips.skip(index, exc)
                continue
            ready.append(Pixels(pixels, engine.resize, job.names[index]))
            at.append(index - begin)
        # Called for an all-skipped chunk too, so per-row side outputs (per-layer terms) stay aligned with rows.
        block[at] = engine.score_rows(ready, at, rows.stop - begin)
        yield rows, block


def _identify(image: ImageInput, name: str) -> str:
    """What a resumed job compares: a file's path, size and modification time, or an in-memory image's name."""
    if isinstance(image, (str, os.PathLike)):
        try:
            stat = os.stat(image)
            return f"{name}:{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            return name
    return name


class _TorchEngine:
    """The PyTorch scorer behind :func:`match`."""

    def __init__(self, model, config, adapters, batch_size, device, dtype, compile=None):
        from .acceleration import Acceleration
        from .models import SD2Model, load_model
        from .scorer import Scorer

        acceleration = Acceleration(compile=compile)  # a bad mode is refused before the model loads
        self.model = model if isinstance(model, SD2Model) else load_model(model, device=device, dtype=dtype)
        adapter = None
        if adapters is not None:
            from .adapters import load_adapter

            # Without a scoring config of its own, the job scores the way the adapter was trained.
            adapter, trained = load_adapter(adapters, self.model, config)
            config = config or trained
        config = config or ScoringConfig()
        self.adapters = adapters
        self.config = config
        self.scorer = Scorer(self.model, config, batch_size=batch_size, adapter=adapter, acceleration=acceleration)
        self._layers: list[np.ndarray] = []
        self._truncated: list[int] = []
        self._evaluations = 0
        self._layer_names: list[str] = list(self.scorer.layer_names)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def encode_texts(self, captions, where) -> int:
        self._texts = self.scorer.encode_texts(captions, where=where)
        self._truncated = [e.tokens.truncated for e in self._texts]
        return len({e.text for e in self._texts})

    def identity(self) -> dict:
        return {
            "engine": "pytorch",
            "model": self.model.identity(),
            "scoring": self.config.to_dict(),
            "adapters": None if self.adapters is None else str(self.adapters),
            "timesteps": self.scorer.timesteps,
        }

    def planned_evaluations(self, num_images: int, num_texts: int) -> int:
        return self.scorer.planned_evaluations(num_images, num_images * num_texts)

    def set_progress(self, advance) -> None:
        self.scorer.progress = advance

    @property
    def resolution(self) -> int:
        return self.scorer.resolution

    @property
    def resize(self) -> str:
        return ResizeMode(self.config.resize).value

    def score_rows(self, images, at, num_rows) -> np.ndarray:
        layers = np.full((num_rows, len(self._texts), len(self._layer_names)), np.nan)
        self._layers.append(layers)
        if not images:
            return np.empty((0, len(self._texts)))
        out = self.scorer.score_encoded_matrix(self.scorer.encode_images(images), self._texts)
        layers[at] = out.layer_scores
        self._evaluations += out.unet_evaluations
        return out.scores

    def layer_scores(self):
        return np.concatenate(self._layers) if self._layers else None

    def meta(self, captions, where) -> dict:
        truncated = {where[j]: count for j, count in enumerate(self._truncated) if count}
        warnings = []
        if self.model.is_test_model:
            warnings.append("random-weight test model: scores are meaningless")
        _warn_truncated(truncated, warnings, self.model.tokenizer.max_length)
        return {
            "dsdkit_version": __version__,
            "backend": "pytorch",
            "compile": self.scorer.acceleration.compile,
            "model": self.model.describe(),
            "scoring": self.config.to_dict(),
            "adapters": None if self.adapters is None else str(self.adapters),
            "timesteps": list(self.scorer.timesteps),
            "layers": self._layer_names,
            "unet_evaluations": self._evaluations,
            "truncated_captions": truncated,
            "warnings": warnings,
        }


class _BundleEngine:
    """The torch-free runtime behind :func:`match` (``--bundle``)."""

    def __init__(self, bundle, backend, device, batch_size, num_timesteps, chunk_size):
        from .runtime.matcher import Matcher

        self.matcher = Matcher.from_bundle(
            bundle,
            backend=backend,
            device=device or "auto",
            batch_size=batch_size,
            num_timesteps=num_timesteps,
            chunk_size=chunk_size,
        )
        self.path = Path(bundle)
        self._evaluations = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.matcher.close()

    def encode_texts(self, captions, where) -> int:
        self._texts = self.matcher.encode_texts(captions, where=where)
        return len({e.text for e in self._texts})

    def identity(self) -> dict:
        manifest = self.matcher.bundle.manifest
        return {
            "engine": "bundle",
            "scorer": manifest["files"][manifest["graphs"]["scorer"]["file"]]["sha256"],
            "scoring": self.matcher.scoring,
            "timesteps": self.matcher.timesteps,
        }

    def planned_evaluations(self, num_images: int, num_texts: int) -> int:
        return self.matcher.planned_evaluations(num_images, num_texts)

    def set_progress(self, advance) -> None:
        def counted(n: int) -> None:
            self._evaluations += n
            advance(n)

        self.matcher.progress = counted

    @property
    def resolution(self) -> int:
        return self.matcher.resolution

    @property
    def resize(self) -> str:
        return ResizeMode(self.matcher.resize).value

    def score_rows(self, images, at, num_rows) -> np.ndarray:
        if not images:
            return np.empty((0, len(self._texts)))
        return self.matcher.score_encoded_matrix(self.matcher.encode_images(images), self._texts)

    def layer_scores(self):
        return None

    def meta(self, captions, where) -> dict:
        manifest = self.matcher.bundle.manifest
        truncated = {where[j]: e.tokens.truncated for j, e in enumerate(self._texts) if e.tokens.truncated}
        warnings = []
        if manifest["model"].get("test_model_random_weights"):
            warnings.append("random-weight test model: scores are meaningless")
        _warn_truncated(truncated, warnings, manifest["model"]["text_length"])
        return {
            "dsdkit_version": __version__,
            "backend": next(iter(self.matcher.runners.values())).name,
            "bundle": str(self.path),
            "model": {k: manifest["model"][k] for k in ("source", "identity", "resolution", "licence")},
            "adapters": (manifest.get("adapter") or {}).get("file"),
            "precision": manifest["precision"],
            "scoring": self.matcher.scoring,
            "timesteps": self.matcher.timesteps,
            "layers": manifest["layers"],
            "unet_evaluations": self._evaluations,
            "truncated_captions": truncated,
            "warnings": warnings,
        }


def _warn_truncated(truncated: dict, warnings: list, length: int) -> None:
    if truncated:
        warnings.append(f"{len(truncated)} caption(s) longer than {length} tokens were truncated")
        for name, count in truncated.items():
            logger.warning("%s: %d token(s) beyond the 77-token context were dropped", name, count)


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
) -> dict[str, Any]:
    """What a match job will cost, from a short calibration on its first image and caption (``--dry-run``).

    Returns pairs, UNet evaluations (``N·S`` unconditional when needed + ``N·M·S``), measured seconds per image
    encoding, caption encoding and scorer evaluation, and the estimated total seconds.
    """
    job = gather_inputs(images, captions)
    skips = _Skips(job.names, strict=False).screen(job.images)
    image_list = [image for i, image in enumerate(job.images) if i not in skips]
    caption_list, where = job.captions, job.where
    if not image_list or not caption_list:
        raise InputError("nothing to score: give at least one usable image and one caption")
    n, m = len(image_list), len(caption_list)
    if bundle is not None:
        from .runtime.matcher import Matcher

        engine = Matcher.from_bundle(
            bundle, backend=backend, device=device or "auto", batch_size=batch_size, num_timesteps=num_timesteps
        )
        with engine:
            timing = _calibrate_bundle(engine, image_list[0], caption_list[0], where[0])
            steps, batch = len(engine.timesteps), engine.batch_size
            evaluations = engine.planned_evaluations(n, m)
            label = f"{next(iter(engine.runners.values())).name} ({bundle})"
    else:
        from .scorer import build_scorer

        scorer = build_scorer(model, adapters, None, None, batch_size=batch_size, device=device, dtype=dtype)
        if adapters is not None and config is not None:
            from .adapters import check_scoring_matches

            check_scoring_matches(adapters, scorer.config, config)
        config = config or scorer.config
        scorer = scorer.__class__(scorer.model, config, batch_size=batch_size, adapter=scorer.adapter)
        timing = _calibrate_torch(scorer, image_list[0], caption_list[0], where[0])
        steps, batch = len(scorer.timesteps), scorer.batch_size
        evaluations = scorer.planned_evaluations(n, n * m)
        label = f"pytorch ({scorer.model.device}, {scorer.model.precision.value})"
    batches = -(-evaluations // batch)
    estimate = n * timing["image_s"] + m * timing["caption_s"] + batches * timing["batch_s"]
    return {
        "images": n,
        "captions": m,
        "skipped_images": len(skips.images),
        "pairs": n * m,
        "timesteps": steps,
        "unet_evaluations": evaluations,
        "batch_size": batch,
        "calibration": timing,
        "estimated_seconds": estimate,
        "engine": label,
    }


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _calibrate_bundle(matcher, image, caption, where) -> dict[str, float]:
    image_s = _timed(lambda: matcher.encode_images([image]))
    caption_s = _timed(lambda: matcher.encode_texts([caption], where=[where]))
    encoded, text = matcher.encode_images([image])[0], matcher.encode_texts([caption], where=[where])[0]
    count = matcher.batch_size
    feed = {
        "latents": np.repeat(encoded.latent[None], count, 0),
        "states": np.repeat(text.states[None], count, 0),
        "token_mask": np.repeat(text.mask[None], count, 0),
        "timestep": np.full(count, matcher.timesteps[0], dtype=np.int64),
        "noise_index": np.zeros(count, np.int64),
    }
    if matcher.conditioned:
        feed["condition"] = np.repeat(encoded.condition[None], count, 0)
    matcher.runners["scorer"].infer(feed)  # warm-up: session creation, allocations
    batch_s = _timed(lambda: matcher.runners["scorer"].infer(feed))
    return {"image_s": image_s, "caption_s": caption_s, "batch_s": batch_s}


def _calibrate_torch(scorer, image, caption, where) -> dict[str, float]:
    image_s = _timed(lambda: scorer.encode_images([image]))
    caption_s = _timed(lambda: scorer.encode_texts([caption], where=[where]))
    # One batch of the job's size at one timestep (the unconditional pass off so only the timed batch runs).
    probe = scorer.__class__(
        scorer.model,
        scorer.config.replace(
            num_timesteps=1, noise_levels=(0.5,), denoise_term=False, normalize="none", uncond_in_attention=False
        ),
        batch_size=scorer.batch_size,
        adapter=scorer.adapter,
    )
    encoded, text = probe.encode_images([image]), probe.encode_texts([caption], where=[where])
    pairs = [(0, 0)] * scorer.batch_size
    probe.score_encoded_pairs(encoded, text, pairs[:1])  # warm-up
    batch_s = _timed(lambda: probe.score_encoded_pairs(encoded, text, pairs))
    return {"image_s": image_s, "caption_s": caption_s, "batch_s": batch_s}
