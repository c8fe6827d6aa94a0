"""Score matrices and how they are written: CSV (the full matrix), JSON and JSONL (matrix plus top-k lists), and
Parquet (one row per scored pair; :func:`read_result` reads it back).

Adaptive ranking (:mod:`~dsdkit.runtime.adaptive`) and given-pair scoring leave some cells without an exact score:
an eliminated candidate holds a *partial* mean over the timesteps it was scored at, and a pair that was not listed
holds nothing. Every format keeps the two apart: the CSV matrix holds exact scores only (other cells are empty); the
JSON and JSONL matrices (``scores``) hold exact scores only (``null`` elsewhere), and beside them ``partial`` holds
the eliminated candidates' partial means with the timesteps they held and the stage after which they left; each
top-k entry says ``"exact": true`` or gives its ``stage`` and ``timesteps``.

Parquet (``.parquet``, needs the ``parquet`` extra: pyarrow) is for results too large to read as one JSON document
and for tools that query them (pandas, polars, DuckDB): one row per scored pair, ordered by image then caption, with
the columns ``image_id`` (int32, the row index), ``image`` (string), ``caption_id`` (int32), ``caption`` (string),
``score`` (float64: the exact score, or the partial mean), ``exact`` (bool), ``stage`` (int16, the adaptive stage
after which a partial candidate left; null for the others) and ``timesteps`` (int16, the timesteps the pair held).
Pairs that were not scored have no row. The file's key-value metadata holds the job's ``meta`` as JSON under
``dsdkit``, the format name (``dsdkit-scores/1``) under ``dsdkit.format`` and, under ``dsdkit.layout``, what the
rows cannot say on their own (every image and caption, also those without a row; S; whether ``held`` was recorded),
so that :func:`read_result` rebuilds the :class:`MatchResult`. Per-layer terms (``layer_scores``) and top-k lists are
not written: the lists follow from the scores (:meth:`MatchResult.top`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, MissingDependencyError, OutputError, missing_dependency
from .files import atomic_write_bytes, atomic_writer

__all__ = [
    "MatchResult",
    "top_k",
    "write_result",
    "read_result",
    "require_parquet",
    "OUTPUT_FORMATS",
    "PARQUET_FORMAT",
]

OUTPUT_FORMATS = (".csv", ".json", ".jsonl", ".parquet")

#: The format name in a Parquet result's key-value metadata (``dsdkit.format``); bumped when the columns change.
PARQUET_FORMAT = "dsdkit-scores/1"


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
        shortlist_rank: optional ``int[N, M]``: a gallery search's shortlist place of each pair (1 = the most similar
            under the shortlist model; 0 = not shortlisted, so not scored).
        shortlist_similarity: optional ``float[N, M]``: the shortlist model's cosine similarity (NaN: not listed).
    """

    images: list[str]
    captions: list[str]
    scores: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    layer_scores: np.ndarray | None = None
    held: np.ndarray | None = None
    left_after: np.ndarray | None = None
    num_timesteps: int | None = None
    shortlist_rank: np.ndarray | None = None
    shortlist_similarity: np.ndarray | None = None

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
        if self.shortlist_rank is not None:
            self.shortlist_rank = np.asarray(self.shortlist_rank, dtype=np.int64)
            self.shortlist_similarity = np.asarray(self.shortlist_similarity, dtype=np.float64)

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

    def fused(self, clip_weight: float, per: str = "image") -> MatchResult:
        """This gallery search's result ranked by the fused score (:func:`~dsdkit.runtime.shortlist.fuse`): each
        query's shortlisted pairs scored ``clip_weight * z(CLIP similarity) + (1 - clip_weight) * z(DSD score)``
        (an adaptive run's eliminated candidates with their partial means), every listed pair ranked by it, NaN
        elsewhere. ``meta["fusion"]`` records the weight and the direction; the result it is called on keeps the DSD
        scores.

        Raises:
            ConfigError: a result without a shortlist, or a weight outside [0, 1].
        """
        from .errors import ConfigError
        from .shortlist import fuse

        if self.shortlist_similarity is None:
            raise ConfigError(
                "a fused ranking needs a gallery search's result (its CLIP similarities): run match with `shortlist`",
                field="shortlist_fuse",
            )
        scores = fuse(self.scores, self.shortlist_similarity, clip_weight, per)
        meta = {
            **self.meta,
            "fusion": {
                "clip_weight": float(clip_weight),
                "per": per,
                "scores": "fused: clip_weight * z(shortlist similarity) + (1 - clip_weight) * z(DSD score), "
                "standardised over each query's shortlisted pairs",
            },
        }
        return dataclasses.replace(self, scores=scores, meta=meta, layer_scores=None, held=None, left_after=None)

    def top(self, k: int, axis: int) -> list[np.ndarray]:
        """Per image (``axis=1``: its captions) or per caption (``axis=0``: its images), the best ``k`` scored
        candidates: exact ones by score, then partial ones by timesteps held and their partial mean (ties to the
        lower index); unscored cells are never listed. Without ``held`` (every pair exact) it is :func:`top_k`."""
        if self.held is None:
            return list(top_k(self.scores, k, axis))
        scores, held = (self.scores, self.held) if axis == 1 else (self.scores.T, self.held.T)
        out = []
        for row in range(scores.shape[0]):
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
        if result.shortlist_rank is not None:
            entry["shortlist_rank"] = int(result.shortlist_rank[i, c])
            entry["shortlist_similarity"] = _finite(result.shortlist_similarity[i, c])
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


def _shortlist_rows(result: MatchResult) -> dict[str, list] | None:
    """A gallery search's shortlist ranks and similarities per pair (``None`` where not shortlisted)."""
    if result.shortlist_rank is None:
        return None
    listed = result.shortlist_rank > 0
    return {
        "rank": [
            [int(r) if ok else None for r, ok in zip(row, flags, strict=True)]
            for row, flags in zip(result.shortlist_rank, listed, strict=True)
        ],
        "similarity": [
            [_finite(v) if ok else None for v, ok in zip(row, flags, strict=True)]
            for row, flags in zip(result.shortlist_similarity, listed, strict=True)
        ],
    }


def write_result(result: MatchResult, path: str | os.PathLike, k: int = 5) -> Path:
    """Write ``result`` atomically in the format given by the file suffix (``.csv``, ``.json``, ``.jsonl`` or
    ``.parquet``; ``k``: the length of the JSON/JSONL top-k lists)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise OutputError(
            f"{path}: unknown output format {suffix or '(none)'}; use one of {', '.join(OUTPUT_FORMATS)}"
        )
    if suffix == ".parquet":
        atomic_write_bytes(path, _parquet_bytes(result, path))
        return path
    text = _csv_text(result) if suffix == ".csv" else _json_text(result, k, lines=suffix == ".jsonl")
    with atomic_writer(path, "w") as handle:
        handle.write(text)
    return path


def _csv_text(result: MatchResult) -> str:
    """The score matrix, one image per row; a pair not scored exactly (adaptive, a shortlist, pairs) is empty."""
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
    return buffer.getvalue()


def _image_records(result: MatchResult, k: int) -> tuple[list[dict], dict | None, dict | None]:
    """Per image: its exact scores, top k captions, and (when the result has them) its partial means, per-layer
    scores and shortlist rows; with the partial and shortlist tables themselves."""
    per_image = result.top(k, axis=1)
    records = [
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
        for i, record in enumerate(records):
            record["partial"] = {name: rows[i] for name, rows in partial.items()}
    if result.layer_scores is not None:
        for i, record in enumerate(records):
            record["layer_scores"] = [[_finite(v) for v in pair] for pair in result.layer_scores[i]]
    shortlisted = _shortlist_rows(result)
    if shortlisted is not None:
        for i, record in enumerate(records):
            record["shortlist"] = {name: rows[i] for name, rows in shortlisted.items()}
    return records, partial, shortlisted


def _json_text(result: MatchResult, k: int, lines: bool) -> str:
    """The JSON document (``lines`` False) or JSON Lines (a meta line, then one line per image and per caption)."""
    image_records, partial, shortlisted = _image_records(result, k)
    per_caption = result.top(k, axis=0)
    caption_records = [
        {
            "caption": caption,
            "index": j,
            "top_k": _ranked(result, result.images, lambda i, j=j: (i, j), per_caption[j], "image"),
        }
        for j, caption in enumerate(result.captions)
    ]
    if lines:
        header = {"type": "meta", "images": len(result.images), "captions": len(result.captions), "k": k}
        rows = [json.dumps(header | result.meta, ensure_ascii=False)]
        rows += [json.dumps({"type": "image", **r}, ensure_ascii=False) for r in image_records]
        rows += [json.dumps({"type": "caption", **r}, ensure_ascii=False) for r in caption_records]
        return "\n".join(rows) + "\n"
    document = {
        "images": result.images,
        "captions": result.captions,
        "scores": [_exact_row(result, i) for i in range(len(result.images))],
        **({"partial": partial} if partial is not None else {}),
        **({"layer_scores": [r["layer_scores"] for r in image_records]} if result.layer_scores is not None else {}),
        **({"shortlist": shortlisted} if shortlisted is not None else {}),
        "top_k": {
            "k": k,
            # the matrix is already under "scores"; the per-image lists carry only the ranking
            "per_image": [{key: r[key] for key in ("image", "index", "top_k")} for r in image_records],
            "per_caption": caption_records,
        },
        "meta": result.meta,
    }
    return json.dumps(document, ensure_ascii=False, indent=1) + "\n"


# -- Parquet -------------------------------------------------------------------------------------------------------


def require_parquet(path: Path):
    """``(pyarrow, pyarrow.parquet)``, imported only when a Parquet file is read or written (an optional extra)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        missing = missing_dependency(exc)
        if missing is None:
            raise
        raise MissingDependencyError(f"{path}: {missing}") from None
    return pyarrow, pyarrow.parquet


def _timesteps_of(result: MatchResult) -> int | None:
    """S: ``num_timesteps``, else (an exhaustive result) the length of ``meta["timesteps"]``; ``None`` if unknown."""
    if result.num_timesteps is not None:
        return int(result.num_timesteps)
    steps = result.meta.get("timesteps")
    return len(steps) if isinstance(steps, list) else None


def _parquet_bytes(result: MatchResult, path: Path) -> bytes:
    """The Parquet file of ``result`` (built in memory, so that the caller writes it atomically)."""
    pa, pq = require_parquet(path)
    if result.held is None:
        scored = np.ones(result.scores.shape, dtype=bool)
    else:
        scored = result.held > 0
    if result.shortlist_rank is not None:
        scored = scored & (result.shortlist_rank > 0) & np.isfinite(result.scores)
    rows, cols = np.nonzero(scored)  # row-major: ordered by image, then caption
    exact = result.exact[rows, cols]
    partial = result.partial[rows, cols]
    if result.held is None:
        steps = _timesteps_of(result)
        timesteps = pa.array(
            np.full(len(rows), 0 if steps is None else steps), pa.int16(), mask=np.full(len(rows), steps is None)
        )
        stage = pa.nulls(len(rows), pa.int16())
    else:
        timesteps = pa.array(result.held[rows, cols], pa.int16())
        stage = pa.array(result.left_after[rows, cols], pa.int16(), mask=~partial)
    images = np.asarray(result.images, dtype=object)
    captions = np.asarray(result.captions, dtype=object)
    table = pa.table(
        {
            "image_id": pa.array(rows, pa.int32()),
            "image": pa.array(images[rows], pa.string()),
            "caption_id": pa.array(cols, pa.int32()),
            "caption": pa.array(captions[cols], pa.string()),
            "score": pa.array(result.scores[rows, cols], pa.float64()),
            "exact": pa.array(exact, pa.bool_()),
            "stage": stage,
            "timesteps": timesteps,
            **(
                {
                    "shortlist_rank": pa.array(result.shortlist_rank[rows, cols], pa.int16()),
                    "shortlist_similarity": pa.array(result.shortlist_similarity[rows, cols], pa.float32()),
                }
                if result.shortlist_rank is not None
                else {}
            ),
        }
    )
    layout = {
        "images": list(result.images),
        "captions": list(result.captions),
        "num_timesteps": result.num_timesteps,
        "held": result.held is not None,
        "shortlist": result.shortlist_rank is not None,
    }
    table = table.replace_schema_metadata(
        {
            "dsdkit": json.dumps(result.meta, ensure_ascii=False),
            "dsdkit.format": PARQUET_FORMAT,
            "dsdkit.layout": json.dumps(layout, ensure_ascii=False),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


_COLUMNS = ("image_id", "image", "caption_id", "caption", "score", "exact", "stage", "timesteps")


def read_result(path: str | os.PathLike) -> MatchResult:
    """Read a ``.parquet`` result written by :func:`write_result` back into a :class:`MatchResult` (for merging
    results and for tests; the text formats are for people and other tools).

    The matrix, ``held``, ``left_after``, ``num_timesteps`` and ``meta`` are rebuilt; cells without a row get a NaN
    score, ``held`` 0 and ``left_after`` 0, and ``left_after`` is kept for partial candidates only (the file's
    ``stage`` is null for the others). Parquet is data only: reading it runs nothing from the file.
    """
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        raise InputError(f"{path}: only .parquet results can be read back; write the result with -o NAME.parquet")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    pa, pq = require_parquet(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"{path}: not a readable Parquet file ({reason}); write it again with dsdkit") from None
    kv = {key.decode("utf-8", "replace"): value for key, value in (table.schema.metadata or {}).items()}
    found = kv.get("dsdkit.format", b"").decode("utf-8", "replace")
    if found != PARQUET_FORMAT:
        raise InputError(
            f"{path}: not a dsdkit result (format {found or 'missing'}, expected {PARQUET_FORMAT}); "
            "write it with dsdkit match -o NAME.parquet"
        )
    missing = [name for name in _COLUMNS if name not in table.column_names]
    if missing:
        raise InputError(f"{path}: a {PARQUET_FORMAT} file without column(s) {', '.join(missing)}; write it again")
    try:
        meta = json.loads(kv.get("dsdkit", b"{}"))
        layout = json.loads(kv["dsdkit.layout"])
        images, captions = [str(x) for x in layout["images"]], [str(x) for x in layout["captions"]]
        num_timesteps, with_held = layout["num_timesteps"], bool(layout["held"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: damaged dsdkit metadata ({type(exc).__name__}: {exc}); write it again") from None
    rows = table.column("image_id").to_numpy().astype(np.int64)
    cols = table.column("caption_id").to_numpy().astype(np.int64)
    shape = (len(images), len(captions))
    if len(rows) and (rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1]):
        raise InputError(f"{path}: image_id or caption_id outside the {shape[0]} x {shape[1]} result; write it again")
    if len(np.unique(rows * shape[1] + cols)) != len(rows):
        raise InputError(f"{path}: the same (image_id, caption_id) pair in two rows; write it again")
    scores = np.full(shape, np.nan)
    scores[rows, cols] = table.column("score").to_numpy()
    held = left_after = None
    if with_held:
        if table.column("timesteps").null_count:
            raise InputError(f"{path}: rows without timesteps in a result with held timesteps; write it again")
        held = np.zeros(shape, dtype=np.int64)
        left_after = np.zeros(shape, dtype=np.int64)
        held[rows, cols] = table.column("timesteps").to_numpy()
        stage = table.column("stage").fill_null(0).to_numpy()
        left_after[rows, cols] = stage
    shortlist_rank = shortlist_similarity = None
    if layout.get("shortlist") and "shortlist_rank" in table.column_names:
        shortlist_rank = np.zeros(shape, dtype=np.int64)
        shortlist_similarity = np.full(shape, np.nan)
        shortlist_rank[rows, cols] = table.column("shortlist_rank").to_numpy()
        shortlist_similarity[rows, cols] = table.column("shortlist_similarity").to_numpy()
    return MatchResult(
        images=images,
        captions=captions,
        scores=scores,
        meta=meta,
        held=held,
        left_after=left_after,
        num_timesteps=num_timesteps,
        shortlist_rank=shortlist_rank,
        shortlist_similarity=shortlist_similarity,
    )
