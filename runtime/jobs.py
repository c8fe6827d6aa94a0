"""Long match jobs: rows of the score matrix are computed in chunks and saved atomically as each chunk finishes, so an
interrupted run loses nothing already scored and ``--resume`` continues where it stopped.

The partial state lives next to the output, in ``<output>.partial/``: ``scores.npy`` (plain numpy, read with
``allow_pickle=False``) and ``state.json`` (format, a fingerprint of the job, rows done). ``state.json`` is written
after ``scores.npy``, so it is the commit point: a kill between the two writes only repeats one chunk. The folder is
removed once the final result file is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, Interrupted
from .files import atomic_write_bytes, atomic_write_text, output_error

__all__ = ["PARTIAL_FORMAT", "job_fingerprint", "partial_folder", "run_resumable", "finish"]

logger = logging.getLogger(__name__)

PARTIAL_FORMAT = "dsdkit-partial/1"

Blocks = Callable[[int], Iterator[tuple[slice, np.ndarray]]]


def job_fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of what makes a job's numbers: inputs, model or bundle, scoring config, timesteps."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def partial_folder(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".partial")


def run_resumable(
    blocks: Blocks,
    shape: tuple[int, int],
    output: str | Path | None,
    fingerprint: str,
    resume: bool = False,
    notes: dict[str, dict] | None = None,
) -> np.ndarray:
    """Fill a ``float64[N, M]`` matrix from ``blocks(start_row)`` and, with an ``output``, save progress per chunk.

    ``notes`` (JSON-able dicts the blocks fill as they go, e.g. skipped images) are saved with every chunk; on
    resume the saved ones are merged back into them, key by key, before ``blocks`` runs.

    Raises:
        ConfigError: partial results of another job are in the way, or they exist and ``resume`` is off.
    """
    scores = np.full(shape, np.nan, dtype=np.float64)
    if output is None:
        if resume:
            raise ConfigError("--resume needs --output: partial results are kept next to the output file")
        for rows, block in blocks(0):
            scores[rows] = block
        return scores
    folder = partial_folder(output)
    start = 0
    if folder.exists():
        if not resume:
            raise ConfigError(
                f"{folder} holds partial results of an interrupted run; pass --resume to continue it, or "
                "delete the folder to start over"
            )
        start = _load(folder, scores, fingerprint, notes)
        logger.warning("resuming %s: %d of %d image rows already scored", output, start, shape[0])
    done = start
    try:
        for rows, block in blocks(start):
            scores[rows] = block
            _save(folder, scores, rows.stop, fingerprint, notes)
            done = rows.stop
    except KeyboardInterrupt:
        # Each chunk was saved atomically as it finished: say what is kept, so the user can continue from it.
        if done == 0:
            raise Interrupted(f"interrupted before the first chunk of {output} was saved; nothing to resume") from None
        raise Interrupted(
            f"interrupted: {done} of {shape[0]} image rows of {output} are saved in {folder}", resumable=True
        ) from None
    return scores


def finish(output: str | Path) -> None:
    """Remove the partial state once the final result is written."""
    shutil.rmtree(partial_folder(output), ignore_errors=True)


def _save(folder: Path, scores: np.ndarray, done_rows: int, fingerprint: str, notes: dict | None = None) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    buffer = io.BytesIO()
    np.save(buffer, scores, allow_pickle=False)
    atomic_write_bytes(folder / "scores.npy", buffer.getvalue())
    state = {
        "format": PARTIAL_FORMAT,
        "fingerprint": fingerprint,
        "done_rows": done_rows,
        "shape": list(scores.shape),
        "notes": notes or {},
    }
    atomic_write_text(folder / "state.json", json.dumps(state) + "\n")


def _load(folder: Path, scores: np.ndarray, fingerprint: str, notes: dict | None) -> int:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        saved = np.load(folder / "scores.npy", allow_pickle=False)
    except FileNotFoundError:
        return 0  # killed before the first chunk was committed
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{folder}: partial results are unreadable ({exc}); delete the folder to start over"
        ) from None
    if state.get("format") != PARTIAL_FORMAT or state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{folder} holds partial results of a different job (other images, captions, model or "
            "scoring); delete it or choose another --output"
        )
    done = int(state["done_rows"])
    if saved.shape != scores.shape or not 0 <= done <= scores.shape[0]:
        raise ConfigError(f"{folder}: partial results do not fit this job; delete the folder to start over")
    scores[:done] = saved[:done]
    if notes is not None:
        for key, saved_note in (state.get("notes") or {}).items():
            notes.setdefault(key, {}).update(saved_note)
    return done
