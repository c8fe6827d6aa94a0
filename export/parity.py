"""Parity of an exported bundle with PyTorch (Polygraphy's comparator, for DSD's outputs).

Two levels, both on real inputs (generated colour-shape images and captions, see :func:`parity_inputs`):

* **per graph**: each ONNX graph on ONNX Runtime against the PyTorch computation it replaces, per output: max abs
  diff, max rel diff, and whether every element lies within the spec's ``atol + rtol·|reference|``. The scorer's
  reference is the *unfolded* PyTorch path (the adapter as trained, weights untouched, fp32), so a folding mistake
  or an fp16 rounding problem shows up here.
* **end to end**: the runtime :class:`~dsdkit.runtime.Matcher` on the bundle against
:class:`~dsdkit.pytorch.scorer.Scorer`
  over an N x M score matrix (few timesteps, to keep it affordable): max abs/rel diff, top-1 agreement per image
  (which caption wins) and per caption (which image wins), and Spearman's rank correlation of every row and column.

An fp16 graph is compared with fp32 PyTorch under looser tolerances; its ranking gate allows a top-1 flip only
between candidates whose fp32 scores differ by less than twice the measured max abs diff (a numerical tie).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.errors import ParityError

__all__ = ["ParitySettings", "compare_outputs", "ranking_agreement", "parity_inputs", "check_report"]


@dataclass(frozen=True)
class ParitySettings:
    """How much parity checking an export does.

    Args:
        images, captions: size of the end-to-end score matrix (generated images x captions).
        timesteps: S for the end-to-end check (the discffusion table; the ``paper`` preset keeps its 4 levels).
        seed: seed of the generated images.
        enabled: ``False`` skips the check (the manifest then says so); a bundle is then unverified.
    """

    images: int = 4
    captions: int = 4
    timesteps: int = 1
    seed: int = 0
    enabled: bool = True


def compare_outputs(name: str, ours: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    """Max abs and rel diff of one output and whether ``|ours - ref| <= atol + rtol |ref|`` holds everywhere."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise ParityError(f"parity: output {name!r} has shape {ours.shape}, PyTorch gives {reference.shape}")
    diff = np.abs(ours - reference)
    finite = bool(np.isfinite(ours).all())
    rel = diff / np.maximum(np.abs(reference), 1e-12)
    return {
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "max_rel": float(rel.max()) if rel.size else 0.0,
        "reference_max_abs": float(np.abs(reference).max()) if reference.size else 0.0,
        "atol": atol,
        "rtol": rtol,
        "ok": finite and bool((diff <= atol + rtol * np.abs(reference)).all()),
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's coefficient needs."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, np.float64)), _ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 1.0


def ranking_agreement(ours: np.ndarray, reference: np.ndarray, tie: float = 0.0) -> dict[str, Any]:
    """How well ``ours`` ranks candidates like ``reference`` (both ``[N images, M captions]``).

    Top-1 agreement per image (over captions) and per caption (over images); mean and min Spearman over rows and
    columns with at least 2 candidates; ``flips_beyond_tie`` counts top-1 disagreements whose reference scores differ
    by more than ``tie``.
    """
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    agree, flips, correlations = [], 0, []
    for a, b in [(ours[i], reference[i]) for i in range(len(ours))] + [
        (ours[:, j], reference[:, j]) for j in range(ours.shape[1])
    ]:
        if len(a) < 2:
            continue
        same = int(np.argmax(a)) == int(np.argmax(b))
        agree.append(same)
        if not same and abs(b[int(np.argmax(b))] - b[int(np.argmax(a))]) > tie:
            flips += 1
        correlations.append(spearman(a, b))
    return {
        "candidate_sets": len(agree),
        "top1_agreement": float(np.mean(agree)) if agree else 1.0,
        "spearman_mean": float(np.mean(correlations)) if correlations else 1.0,
        "spearman_min": float(np.min(correlations)) if correlations else 1.0,
        "flips_beyond_tie": flips,
        "tie": tie,
    }


_CAPTION_TEMPLATES = (
    "a {} {}",
    "a small {} {}",
    "a large {} {}",
    "one {} {} on a white background",
    "a picture of a {} {}",
    "a {} {} in the middle",
)


def parity_inputs(settings: ParitySettings) -> tuple[list, list[str]]:
    """Generated colour-shape images and distinct captions naming colours and shapes (real inputs, not noise).

    Up to 90 captions are distinct (so benchmarks measure real work, not the cache); images are all distinct.
    """
    from ..world.scenes import COLOURS, SHAPES, colour_shape_image

    rng = np.random.default_rng(settings.seed)
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    images = [_textured(colour_shape_image(*combos[i % len(combos)], rng), rng) for i in range(settings.images)]
    every = [template.format(c, s) for template in _CAPTION_TEMPLATES for c, s in combos]
    # Steps of 13 visit all 90 in an order that mixes colours, shapes and templates early on.
    captions = [every[(1 + 13 * i) % len(every)] for i in range(settings.captions)]
    return images, captions


def _textured(image, rng: np.random.Generator):
    """Light per-pixel jitter, as in photographs. Perfectly flat regions make the VAE's GroupNorm divide rounding
    noise by sqrt(eps) and would measure that ill-conditioning instead of the export."""
    from PIL import Image

    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (*image.size[::-1], 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def check_report(report: dict[str, Any]) -> None:
    """Raise :class:`ParityError` naming the first output or ranking check that failed."""
    for graph, outputs in report.get("graphs", {}).items():
        for output, result in outputs.items():
            if not result["ok"]:
                raise ParityError(
                    f"parity: {graph}.{output} differs from PyTorch by max abs {result['max_abs']:.3g} / max rel "
                    f"{result['max_rel']:.3g} (tolerance atol {result['atol']:g}, rtol {result['rtol']:g}); the "
                    "bundle was not written"
                )
    end = report.get("end_to_end")
    if end:
        scores = end["scores"]
        if not scores["ok"]:
            raise ParityError(
                f"parity: bundle scores differ from PyTorch by max abs {scores['max_abs']:.3g} / max rel "
                f"{scores['max_rel']:.3g} (tolerance atol {scores['atol']:g}, rtol {scores['rtol']:g}); the bundle "
                "was not written"
            )
        ranking = end["ranking"]
        if ranking["flips_beyond_tie"]:
            raise ParityError(
                f"parity: the bundle ranks candidates differently from PyTorch ({ranking['flips_beyond_tie']} top-1 "
                f"flips beyond a tie of {ranking['tie']:.3g}; top-1 agreement {ranking['top1_agreement']:.3f}); the "
                "bundle was not written"
            )
