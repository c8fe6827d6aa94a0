"""Score matrices and how they are written: CSV (the full matrix), JSON and JSONL (matrix plus top-k lists).

Adaptive ranking (:mod:`~dsdkit.runtime.adaptive`) and given-pair scoring leave some cells without an exact score:
an eliminated candidate holds a *partial* mean over the timesteps it was scored at, and a pair that was not listed
holds nothing. Every format keeps the two apart: the CSV matrix holds exact scores only (other cells are empty); the
JSON and JSONL matrices (``scores``) hold exact scores only (``null`` elsewhere), and beside them ``partial`` holds
the eliminated candidates' partial means with the timesteps they held and the stage after which they left; each
top-k entry says ``"exact": true`` or gives its ``stage`` and ``timesteps``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError
from .files import atomic_writer

__all__ = ["MatchResult", "top_k", "write_result", "OUTPUT_FORMATS"]

OUTPUT_FORMATS = (".csv", ".json", ".jsonl")


@dataclass
class MatchResult:
    """Scores of every image against every caption.

    Attributes:
        images: a name per row (the file path for files).
        captions: a caption per column.
        scores: ``float[N, M]``; higher means a better match. Values are only comparable under one model and one
            scoring config; see ``meta["scoring"]``.
        meta: provenance written next to the numbers (model, scoring config, versions, warnings).
        layer_scores: optional ``float[N, M, L]`` attention term per scored layer (``meta["layers"]`` names them);
            written to JSON/JSONL outputs when present.
        held: optional ``int[N, M]`` timesteps each pair was scored at (adaptive ranking, given pairs): a pair is
            exact when it held all ``num_timesteps``, partial when fewer, and was not scored at 0. ``None``: every
            pair is exact.
        left_after: optional ``int[N, M]``: the adaptive stage after which a candidate left (0: kept).
        num_timesteps: S (with ``held``).
    """

    images: list[str]
    captions: list[str]
    scores: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    layer_scores: np.ndarray | None = None
    held: np.ndarray | None = None
    left_after: np.ndarray | None = None
    num_timesteps: int | None = None

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.shape != (len(self.images), len(self.captions)):
            raise ValueError(
                f"scores have shape {self.scores.shape}, expected {(len(self.images), len(self.captions))}"
            )
        if self.held is not None:
            self.held = np.asarray(self.held, dtype=np.int64)
            self.left_after = (
                np.zeros_like(self.held) if self.left_after is None else np.asarray(self.left_after, dtype=np.int64)
            )
            if self.num_timesteps is None:
                raise ValueError("held needs num_timesteps")

    @property
    def exact(self) -> np.ndarray:
        """``bool[N, M]``: pairs scored at every timestep."""
        if self.held is None:
            return np.isfinite(self.scores)
        return (self.held == self.num_timesteps) & np.isfinite(self.scores)

    @property
    def partial(self) -> np.ndarray:
        """``bool[N, M]``: candidates eliminated early (a mean over fewer timesteps)."""
        if self.held is None:
            return np.zeros(self.scores.shape, dtype=bool)
        return (self.held > 0) & (self.held < self.num_timesteps)

    def top(self, k: int, axis: int) -> list[np.ndarray]:
        """Per image (``axis=1``: its captions) or per caption (``axis=0``: its images), the best ``k`` scored
        candidates: exact ones by score, then partial ones by timesteps held and their partial mean (ties to the
        lower index). Unscored cells are never listed."""
        scores = self.scores if axis == 1 else self.scores.T
        held = None if self.held is None else (self.held if axis == 1 else self.held.T)
        out = []
        for row in range(scores.shape[0]):
            if held is None:
                listed = np.flatnonzero(~np.isnan(scores[row]))
                order = listed[np.lexsort((listed, -scores[row, listed]))]
            else:
                listed = np.flatnonzero(held[row] > 0)
                order = listed[np.lexsort((listed, -scores[row, listed], -held[row, listed]))]
            out.append(order[: max(0, k)])
        return out


def top_k(scores: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Indices of the ``k`` best entries along ``axis`` (1: captions per image; 0: images per caption).

    Ties keep the lower index first, so the order is deterministic.
    """
    scores = np.asarray(scores)
    if axis == 0:
        return top_k(scores.T, k, axis=1)
    k = max(0, min(k, scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _ranked(result: MatchResult, names: list[str], cells, indices, key: str) -> list[dict]:
    """Top-k entries: ``cells(j) -> (row, column)`` of candidate ``j`` in the matrix."""
    out = []
    for j in indices:
        i, c = cells(int(j))
        entry = {key: names[j], "index": int(j), "score": _finite(result.scores[i, c])}
        if result.held is not None:
            if result.held[i, c] == result.num_timesteps:
                entry["exact"] = True
            else:
                entry.update(exact=False, stage=int(result.left_after[i, c]), timesteps=int(result.held[i, c]))
        out.append(entry)
    return out


def _exact_row(result: MatchResult, i: int) -> list[float | None]:
    exact = result.exact[i]
    return [_finite(v) if ok else None for v, ok in zip(result.scores[i], exact, strict=True)]


def _partial_rows(result: MatchResult) -> dict[str, list] | None:
    """The eliminated candidates' partial means, timesteps held and stage left after (``None`` when all exact)."""
    if result.held is None or not result.partial.any():
        return None
    partial = result.partial
    return {
        "scores": [
            [_finite(v) if p else None for v, p in zip(row, flags, strict=True)]
            for row, flags in zip(result.scores, partial, strict=True)
        ],
        "timesteps": [[int(h) for h in row] for row in result.held],
        "stage": [[int(s) for s in row] for row in result.left_after],
    }


def write_result(result: MatchResult, path: str | os.PathLike, k: int = 5) -> Path:
    """Write ``result`` atomically in the format given by the file suffix (``.csv``, ``.json`` or ``.jsonl``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise OutputError(
            f"{path}: unknown output format {suffix or '(none)'}; use one of {', '.join(OUTPUT_FORMATS)}"
        )
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", *result.captions])
        exact = result.exact if result.held is not None else None
        for i, (name, row) in enumerate(zip(result.images, result.scores, strict=True)):
            cells = (
                [repr(float(v)) for v in row]
                if exact is None
                else [repr(float(v)) if ok else "" for v, ok in zip(row, exact[i], strict=True)]
            )
            writer.writerow([name, *cells])
        text = buffer.getvalue()
    else:
        per_image = result.top(k, axis=1)
        per_caption = result.top(k, axis=0)
        image_records = [
            {
                "image": name,
                "index": i,
                "scores": _exact_row(result, i),
                "top_k": _ranked(result, result.captions, lambda j, i=i: (i, j), per_image[i], "caption"),
            }
            for i, name in enumerate(result.images)
        ]
        partial = _partial_rows(result)
        if partial is not None:
            for i, record in enumerate(image_records):
                record["partial"] = {name: rows[i] for name, rows in partial.items()}
        if result.layer_scores is not None:
            for i, record in enumerate(image_records):
                record["layer_scores"] = [[_finite(v) for v in pair] for pair in result.layer_scores[i]]
        caption_records = [
            {
                "caption": caption,
                "index": j,
                "top_k": _ranked(result, result.images, lambda i, j=j: (i, j), per_caption[j], "image"),
            }
            for j, caption in enumerate(result.captions)
        ]
        if suffix == ".json":
            document = {
                "images": result.images,
                "captions": result.captions,
                "scores": [_exact_row(result, i) for i in range(len(result.images))],
                **({"partial": partial} if partial is not None else {}),
                **(
                    {"layer_scores": [r["layer_scores"] for r in image_records]}
                    if result.layer_scores is not None
                    else {}
                ),
                "top_k": {
                    "k": k,
                    # the matrix is already under "scores"; the per-image lists carry only the ranking
                    "per_image": [{key: r[key] for key in ("image", "index", "top_k")} for r in image_records],
                    "per_caption": caption_records,
                },
                "meta": result.meta,
            }
            text = json.dumps(document, ensure_ascii=False, indent=1) + "\n"
        else:
            header = {"type": "meta", "images": len(result.images), "captions": len(result.captions), "k": k}
            lines = [json.dumps(header | result.meta, ensure_ascii=False)]
            lines += [json.dumps({"type": "image", **r}, ensure_ascii=False) for r in image_records]
            lines += [json.dumps({"type": "caption", **r}, ensure_ascii=False) for r in caption_records]
            text = "\n".join(lines) + "\n"
    with atomic_writer(path, "w") as handle:
        handle.write(text)
    return path
