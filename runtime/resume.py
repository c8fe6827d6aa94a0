"""Long match jobs: rows of the score matrix are computed in chunks and saved atomically as each chunk finishes, so an
interrupted run loses nothing already scored and ``--resume`` continues where it stopped.

The partial state lives next to the output, in ``<output>.partial/``: ``scores.npy`` (plain numpy: its header is
checked before its data is read, and nothing is unpickled) and ``state.json`` (format, a fingerprint of the job, rows
done, the notes, and a sha256 digest over the state and the done rows of the scores). ``state.json`` is written after
``scores.npy``, so it is the commit point: a kill between the two writes only repeats one chunk (the digest covers
the rows the state says are done, which the next chunk's write leaves as they were). The folder is removed once the
final result file is written.

Resuming trusts nothing in the folder: ``state.json`` is checked against its schema
(:func:`~dsdkit.runtime.schemas.resume_state`) and ``scores.npy`` against the job's shape, then the digest is
recomputed. State that fails any check (edited, damaged, of another dtype, or written before the digest existed) is
**discarded** with one logged line and the job is scored from the start: it is a cache of dsdkit's own work, so
dropping it costs time, never a wrong number, and an unattended worker (a shard, a Slurm task) goes on instead of
stopping. Verified state of another job is still refused (:class:`ConfigError`): it may be someone's good work.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, Interrupted
from .files import atomic_write_bytes, atomic_write_text, output_error
from .schemas import ResumeState, SchemaError, resume_state

__all__ = ["PARTIAL_FORMAT", "job_fingerprint", "partial_folder", "run_resumable", "finish"]

logger = logging.getLogger(__name__)

PARTIAL_FORMAT = "dsdkit-partial/2"
#: The format before the digest: its state is discarded (there is nothing to check it against).
_UNDIGESTED_FORMAT = "dsdkit-partial/1"

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
            raise ConfigError(
                "`resume` needs an `output`: partial results are kept next to the output file", field="resume"
            )
        for rows, block in blocks(0):
            scores[rows] = block
        return scores
    folder = partial_folder(output)
    start = 0
    if folder.exists():
        if not resume:
            raise ConfigError(
                f"{folder} holds partial results of an interrupted run; pass `resume` to continue it, or "
                "delete the folder to start over"
            )
        start = _load(folder, scores, fingerprint, notes)
        if start:  # discarded state has said so in its own line
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


def _digest(state: dict[str, Any], scores: np.ndarray) -> str:
    """sha256 over the state's fields (but the digest) and the bytes of its done rows (little-endian float64)."""
    fields = {key: value for key, value in state.items() if key != "digest"}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(np.ascontiguousarray(scores[: int(state["done_rows"])], dtype="<f8").tobytes())
    return digest.hexdigest()


def _save(folder: Path, scores: np.ndarray, done_rows: int, fingerprint: str, notes: dict | None = None) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(scores, dtype="<f8"), allow_pickle=False)
    atomic_write_bytes(folder / "scores.npy", buffer.getvalue())
    state = {
        "format": PARTIAL_FORMAT,
        "fingerprint": fingerprint,
        "done_rows": done_rows,
        "shape": list(scores.shape),
        "dtype": "float64",
        "notes": notes or {},
    }
    state["digest"] = _digest(state, scores)
    atomic_write_text(folder / "state.json", json.dumps(state) + "\n")


def _discard(folder: Path, reason: str) -> int:
    logger.warning(
        "%s: discarding the partial results (%s) and scoring from the start; --resume continues only from state "
        "that verifies",
        folder,
        reason,
    )
    return 0


def _read_scores(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """``scores.npy`` as ``float64[shape]``: its header (dtype, order, shape) and its size are checked before any
    data is read, so a header declaring a huge array allocates nothing. Raises ``ValueError`` (with the reason) or
    ``OSError``."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            found, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            found, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"npy format version {version}")
        if dtype != np.dtype("<f8") or fortran or tuple(found) != tuple(shape):
            raise ValueError(f"scores.npy holds {dtype} {list(found)}, not float64 {list(shape)}")
        size = int(np.prod(shape, dtype=object)) * 8
        if os.fstat(handle.fileno()).st_size - handle.tell() != size:
            raise ValueError(f"scores.npy does not hold the {size} bytes of a float64 {list(shape)} array")
        data = handle.read(size)
    return np.frombuffer(data, dtype="<f8").reshape(shape)


def _load(folder: Path, scores: np.ndarray, fingerprint: str, notes: dict | None) -> int:
    """Rows already done (their scores copied into ``scores``, their notes merged into ``notes``), or 0 when there
    is no state or it is discarded (one logged line says why).

    Raises:
        ConfigError: verified state of a different job.
    """
    try:
        document = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return 0  # killed before the first chunk was committed
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return _discard(folder, f"state.json is unreadable: {' '.join(str(exc).split())[:200]}")
    if isinstance(document, dict) and document.get("format") == _UNDIGESTED_FORMAT:
        return _discard(folder, "written by an earlier dsdkit, without the digest that verifies it")
    try:
        state: ResumeState = resume_state(document)
    except SchemaError as exc:
        return _discard(folder, f"state.json is damaged: {exc}")
    if state.format != PARTIAL_FORMAT or state.digest is None:
        return _discard(folder, f"state format {state.format!r} without a digest this dsdkit can check")
    try:
        saved = _read_scores(folder / "scores.npy", state.shape)
    except FileNotFoundError:
        return _discard(folder, "scores.npy is missing")
    except (OSError, ValueError, EOFError) as exc:
        return _discard(folder, f"scores.npy is unusable: {' '.join(str(exc).split())[:200]}")
    if _digest(document, saved) != state.digest:
        return _discard(folder, "the scores or the state do not match their digest: edited or damaged")
    if state.fingerprint != fingerprint:
        raise ConfigError(
            f"{folder} holds partial results of a different job (other images, captions, model or "
            "scoring); delete it or choose another `output`"
        )
    if state.shape != scores.shape:
        raise ConfigError(f"{folder}: partial results do not fit this job; delete the folder to start over")
    done = state.done_rows
    scores[:done] = saved[:done]
    if notes is not None:
        for key, saved_note in state.notes.items():
            notes.setdefault(key, {}).update(saved_note)
    return done
