"""Score matrices and how they are written: CSV (the full matrix), JSON and JSONL (matrix plus top-k lists)."""

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
    """

    images: list[str]
    captions: list[str]
    scores: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    layer_scores: np.ndarray | None = None

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.shape != (len(self.images), len(self.captions)):
            raise ValueError(
                f"scores have shape {self.scores.shape}, expected {(len(self.images), len(self.captions))}"
            )


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


def _ranked(names: list[str], scores_row: np.ndarray, indices: np.ndarray, key: str) -> list[dict]:
    return [{key: names[j], "index": int(j), "score": _finite(scores_row[j])} for j in indices]


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
        for name, row in zip(result.images, result.scores, strict=True):
            writer.writerow([name, *(repr(float(v)) for v in row)])
        text = buffer.getvalue()
    else:
        per_image = top_k(result.scores, k, axis=1)
        per_caption = top_k(result.scores, k, axis=0)
        image_records = [
            {
                "image": name,
                "index": i,
                "scores": [_finite(v) for v in result.scores[i]],
                "top_k": _ranked(result.captions, result.scores[i], per_image[i], "caption"),
            }
            for i, name in enumerate(result.images)
        ]
        if result.layer_scores is not None:
            for i, record in enumerate(image_records):
                record["layer_scores"] = [[_finite(v) for v in pair] for pair in result.layer_scores[i]]
        caption_records = [
            {
                "caption": caption,
                "index": j,
                "top_k": _ranked(result.images, result.scores[:, j], per_caption[j], "image"),
            }
            for j, caption in enumerate(result.captions)
        ]
        if suffix == ".json":
            document = {
                "images": result.images,
                "captions": result.captions,
                "scores": [[_finite(v) for v in row] for row in result.scores],
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
