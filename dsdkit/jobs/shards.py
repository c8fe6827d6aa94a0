"""Sharded match jobs without a cluster framework: ``dsdkit plan`` / ``match --job --shard`` / ``merge``.

A job is a folder. :func:`plan_job` writes ``JOB/job.json`` (:class:`JobManifest`, format :data:`JOB_FORMAT`): the
image paths (absolute, so that workers started from any folder find them) with the names the results use, the
caption texts, the engine spec (model or bundle, adapters, scoring config, timesteps, batch size, adaptive schedule,
top-k, pairs), the identity of the model or bundle as the engine reports it, a record of every input file (size and
modification time, or sha256 with ``content_hash``), shard ranges aligned to the chunk size, and a fingerprint over
all of it. Nothing else is needed to run a shard, so workers take no options but where to run.

:func:`run_shard` scores one shard with :func:`dsdkit.jobs.match.match` on the shard's images, in the same chunks as a
single run (shards start on chunk boundaries), so a merged job equals a single run bit for bit on one machine. A
worker first claims the shard with an exclusive lock file (``O_CREAT|O_EXCL``; pid, host, start time), so two
workers on one shard never both score it; a lock whose pid is dead on this host is taken over. The part is written
atomically (``JOB/scores/part-00001.parquet``, with its ``.partial/`` resume state beside it while it runs), then the
done marker (``part-00001.done.json``: the job fingerprint, rows, UNet evaluations, skipped images, seconds, the
part's sha256), which is the commit point: a shard killed before its marker is scored again by the next worker,
continuing from its saved chunks. A worker refuses a job whose inputs of its shard, model or scoring changed.

:func:`merge_job` refuses a job with shards not done (naming them), checks every input and marker, concatenates the
parts in image order and writes any result format; top-k per caption across shards follows from the merged matrix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import schemas
from ..runtime.adaptive import EVALUATION_KEYS
from ..runtime.bundle import sha256_file
from ..runtime.engine import Engine
from ..runtime.errors import ConfigError, InputError, JobError, ModelError, one_line
from ..runtime.files import atomic_write_bytes, atomic_write_text, output_error
from ..runtime.results import OUTPUT_FORMATS, MatchResult
from ..runtime.resume import job_fingerprint
from ..runtime.version import __version__
from .inputs import gather_inputs
from .shortlists import shortlist_meta
from .specs import EngineSpec, MatchOptions

__all__ = [
    "JOB_FORMAT",
    "DONE_FORMAT",
    "JobManifest",
    "ShardReport",
    "plan_job",
    "run_shard",
    "open_job_engine",
    "merge_job",
    "shard_ranges",
    "parse_shard",
    "load_job",
    "read_done_marker",
]

logger = logging.getLogger(__name__)

JOB_FORMAT = "dsdkit-job/1"
DONE_FORMAT = "dsdkit-shard-done/1"
MANIFEST_NAME = "job.json"

#: A lock file that is still empty this long after it was created belongs to a worker that died while claiming.
EMPTY_LOCK_GRACE_S = 60.0


# -- the manifest ----------------------------------------------------------------------------------------------------


def _file_record(path: str | os.PathLike, content_hash: bool) -> dict[str, Any]:
    """What a job remembers of an input file: size and modification time, or its sha256; a file that cannot be
    read now (the worker skips it as a single run would) is recorded as such, so that a later change is seen too."""
    try:
        if content_hash:
            return {"sha256": sha256_file(path)}
        stat = os.stat(path)
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    except OSError as exc:
        return {"unreadable": exc.strerror or type(exc).__name__}


def _what_changed(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    if "unreadable" in now and "unreadable" not in before:
        return f"it cannot be read now: {now['unreadable']}"
    if "unreadable" in before:
        return "it could not be read when the job was planned and can now"
    if "sha256" in before:
        return "its content changed (sha256)"
    if before.get("size") != now.get("size"):
        return f"size {before.get('size')} -> {now.get('size')} bytes"
    return "it was modified (modification time)"


@dataclass
class JobManifest:
    """``JOB/job.json``: everything a worker needs to score a shard, and what the job's numbers depend on.

    Attributes:
        folder: the job folder (not stored; where the manifest was read from or written to).
        images: per image, in job order (the id is the position): ``name`` (as the results name it, the path as
            given to ``plan``), ``path`` (absolute) and ``file`` (:func:`_file_record`).
        captions: the caption texts (the id is the position).
        caption_where: each caption's origin for messages (``captions.txt line 3``).
        caption_source: the captions file (``name``, ``path``, ``file``), or ``None`` for an in-memory list.
        skipped_caption_lines: ``{"where", "reason"}`` of caption-file lines that were skipped (blank lines).
        engine: the engine spec (:func:`dsdkit.jobs.match.open_engine`'s arguments but the device).
        scoring: the job's options beside the engine: ``chunk_size``, ``top_k``, ``adaptive`` (schedule text),
            ``per``, ``strict``, ``pairs`` (``{"source", "pairs", "duplicates"}`` with image ids, or ``None``).
        identity: the engine's identity at planning (model weights hash or bundle scorer hash, scoring config,
            adapters, timesteps): workers compare theirs with it.
        shards: ``[start, stop)`` image ranges, aligned to ``chunk_size``.
        content_hash: whether ``file`` records hold sha256 digests instead of sizes and modification times.
        fingerprint: sha256 of all of the above; every done marker carries it.
    """

    folder: Path
    images: list[dict[str, Any]]
    captions: list[str]
    caption_where: list[str]
    caption_source: dict[str, Any] | None
    skipped_caption_lines: list[dict[str, str]]
    engine: dict[str, Any]
    scoring: dict[str, Any]
    identity: dict[str, Any]
    shards: list[list[int]]
    content_hash: bool = False
    #: A gallery search's shortlist, computed once at planning (``SHORTLIST_FILE``, its sha256 and the stage's
    #: record); ``None``: no shortlist.
    shortlist: dict[str, Any] | None = None
    fingerprint: str = ""
    dsdkit_version: str = __version__
    created: str = ""

    #: Fields that the fingerprint covers (the rest are where and when).
    _COVERED = (
        "images",
        "captions",
        "caption_source",
        "engine",
        "scoring",
        "identity",
        "shards",
        "content_hash",
    )

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def compute_fingerprint(self) -> str:
        covered = {name: getattr(self, name) for name in self._COVERED}
        if self.shortlist is not None:  # jobs without one keep the fingerprint of earlier versions
            covered["shortlist"] = self.shortlist
        return job_fingerprint(covered)

    def load_shortlist(self):
        """The shortlist stored at planning (checked against its sha256 and the job's shape), or ``None``."""
        from ..runtime.shortlist import Shortlist

        if self.shortlist is None:
            return None
        path = self.folder / self.shortlist["file"]
        if not path.is_file() or sha256_file(path) != self.shortlist["sha256"]:
            raise JobError(f"{path} is missing or not the shortlist {self.path} records; plan the job again")
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
            shortlist = Shortlist.from_arrays(arrays, self.scoring["per"], str(path))
        except ModelError as exc:  # arrays that do not fit the job: a job folder's error (exit code 11)
            raise JobError(str(exc)) from None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:  # a file that verifies (its hash re-recorded)
            raise JobError(f"{path}: not a stored shortlist ({one_line(exc)}); plan the job again") from None
        if (shortlist.num_images, shortlist.num_captions) != (len(self.images), len(self.captions)):
            raise JobError(f"{path} does not fit the job's {len(self.images)} x {len(self.captions)}; plan again")
        return shortlist

    def part(self, index: int) -> Path:
        return self.folder / "scores" / f"part-{index:05d}.parquet"

    def done_marker(self, index: int) -> Path:
        return self.folder / "scores" / f"part-{index:05d}.done.json"

    def lock(self, index: int) -> Path:
        return self.folder / "scores" / f"part-{index:05d}.lock"

    def label(self, index: int) -> str:
        return f"shard {index}/{self.num_shards} of {self.folder}"

    def to_json(self) -> str:
        document = {"format": JOB_FORMAT}
        for f in dataclasses.fields(self):
            if f.name != "folder":
                document[f.name] = getattr(self, f.name)
        return _json_lines(document)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> JobManifest:
        """Read ``folder/job.json``, refusing another format and a manifest edited after planning."""
        folder = Path(folder)
        path = folder / MANIFEST_NAME
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobError(f"{path}: no such file; {folder} is not a job folder (make one with dsdkit plan)") from None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
            raise JobError(f"{path}: unreadable job manifest ({reason}); plan the job again") from None
        if not isinstance(document, dict) or document.get("format") != JOB_FORMAT:
            found = document.get("format") if isinstance(document, dict) else None
            raise JobError(
                f"{path}: not a dsdkit job (format {found or 'missing'}, expected {JOB_FORMAT}); plan it again"
            )
        schemas.job_manifest(document, str(path))
        names = {f.name for f in dataclasses.fields(cls)} - {"folder"}
        manifest = cls(folder=folder, **{k: v for k, v in document.items() if k in names})
        if manifest.compute_fingerprint() != manifest.fingerprint:
            raise JobError(
                f"{path} was changed after it was planned (its fingerprint does not match its content); "
                "plan a new job with dsdkit plan instead of editing it"
            )
        return manifest

    def check_inputs(self, ids: Sequence[int] | None = None, captions: bool = True) -> None:
        """Refuse (:class:`JobError`) when an input file differs from its record: the images ``ids`` (default:
        all) and the captions file."""
        records = []
        if captions and self.caption_source is not None:
            records.append((self.caption_source["name"], self.caption_source["path"], self.caption_source["file"]))
        chosen = range(len(self.images)) if ids is None else ids
        records += [(self.images[i]["name"], self.images[i]["path"], self.images[i]["file"]) for i in chosen]
        changed = []
        for name, path, before in records:
            now = _file_record(path, self.content_hash)
            if now != before:
                changed.append((name, _what_changed(before, now)))
        if changed:
            name, why = changed[0]
            more = f" (and {len(changed) - 1} more input(s))" if len(changed) > 1 else ""
            raise JobError(
                f"{name} changed since {self.path} was planned ({why}){more}; the job's scores would not match "
                "its inputs: plan a new job with dsdkit plan"
            )

    def engine_spec(self) -> EngineSpec:
        """The engine the job was planned with (manifests of earlier versions recorded another form: read too)."""
        spec = self.engine
        if "knobs" in spec:
            return EngineSpec.from_dict(spec, source=str(self.path))
        knobs = dict(spec.get("config") or {})
        if spec.get("num_timesteps") is not None:
            knobs["num_timesteps"] = spec["num_timesteps"]
        return EngineSpec(
            model=spec.get("model"),
            bundle=spec.get("bundle"),
            adapters=spec.get("adapters"),
            knobs=knobs,
            backend=spec.get("backend") or "auto",
            batch_size=spec.get("batch_size"),
            dtype=spec.get("dtype") or "fp32",
            compile=spec.get("compile"),
            chunk_size=self.scoring["chunk_size"],
        )

    def check_identity(self, identity: Mapping[str, Any]) -> None:
        """Refuse an engine that scores differently from the one the job was planned with, naming what differs."""
        identity = json.loads(json.dumps(identity, default=str))  # as stored: lists, not tuples
        if identity == self.identity:
            return
        keys = sorted(k for k in set(identity) | set(self.identity) if identity.get(k) != self.identity.get(k))
        what = {
            "model": "the model's weights",
            "scorer": "the bundle's scorer",
            "scoring": "the scoring config",
            "adapters": "the adapter",
            "timesteps": "the timesteps",
            "engine": "the engine",
        }
        named = ", ".join(what.get(k, k) for k in keys)
        planned = self.engine.get("bundle") or self.engine.get("model") or "the default model"
        raise JobError(
            f"{self.path}: {named} differ from the job's (it was planned with {planned}); "
            "plan a new job with dsdkit plan to score with them"
        )


def _json_lines(document: Mapping[str, Any]) -> str:
    """JSON with a line per top-level key and per element of a top-level list: a manifest of a million images stays
    a file that ``grep`` and ``diff`` can read, without indenting every field of every image."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = []
    for key, value in document.items():
        if isinstance(value, list) and value:
            inner = ",\n".join(f"  {dump(item)}" for item in value)
            lines.append(f" {dump(key)}: [\n{inner}\n ]")
        else:
            lines.append(f" {dump(key)}: {dump(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def load_job(job: str | os.PathLike | JobManifest) -> JobManifest:
    return job if isinstance(job, JobManifest) else JobManifest.read(job)


# -- shards ----------------------------------------------------------------------------------------------------------


def shard_ranges(num_images: int, chunk_size: int, num_shards: int) -> list[list[int]]:
    """``[start, stop)`` image ranges of ``num_shards`` shards: whole chunks of ``chunk_size`` images (the last one
    may be short), spread as evenly as chunks allow, so that every shard's chunks are a single run's chunks."""
    if num_shards < 1:
        raise ConfigError(f"`shards` must be >= 1, got {num_shards}", field="shards")
    if chunk_size < 1:
        raise ConfigError(f"`chunk_size` must be >= 1, got {chunk_size}", field="chunk_size")
    chunks = -(-num_images // chunk_size)
    if num_shards > chunks:
        raise ConfigError(
            f"`shards` {num_shards}: {num_images} images make {chunks} chunk(s) of {chunk_size}, and a shard is "
            f"whole chunks; use at most `shards` {chunks}, or a smaller `chunk_size`"
        )
    bounds = [i * chunks // num_shards for i in range(num_shards + 1)]
    return [[bounds[i] * chunk_size, min(bounds[i + 1] * chunk_size, num_images)] for i in range(num_shards)]


def parse_shard(spec: str | int, num_shards: int, environ: Mapping[str, str] | None = None) -> int:
    """The shard index of ``--shard``: ``i/N`` (0-based; N must be the job's shard count), or ``auto``: a Slurm
    array task's ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` of
    ``SLURM_ARRAY_TASK_COUNT``, else ``RANK`` of ``WORLD_SIZE`` (torchrun and most launchers)."""
    environ = os.environ if environ is None else environ
    if isinstance(spec, int):
        index, count, source = spec, num_shards, f"shard {spec}"
    elif spec.strip() == "auto":
        index, count, source = _shard_from_environment(environ)
    else:
        text, sep, total = spec.strip().partition("/")
        try:
            index, count = int(text), int(total)
        except ValueError:
            raise ConfigError(
                f"`shard` {spec!r}: expected i/N (0-based, e.g. 0/{num_shards}) or auto (a Slurm array, or "
                "RANK/WORLD_SIZE)"
            ) from None
        if not sep:
            raise ConfigError(f"`shard` {spec!r}: expected i/N, e.g. 0/{num_shards}", field="shard")
        source = f"`shard` {spec}"
    if count != num_shards:
        raise ConfigError(
            f"{source}: the job has {num_shards} shard(s), not {count}; use i/{num_shards} with i from 0 to "
            f"{num_shards - 1} (or plan the job with `shards` {count})"
        )
    if not 0 <= index < num_shards:
        raise ConfigError(f"{source}: i runs from 0 to {num_shards - 1} (shards are numbered from 0)")
    return index


def _shard_from_environment(environ: Mapping[str, str]) -> tuple[int, int, str]:
    def number(name: str, default: int | None = None) -> int:
        raw = environ.get(name)
        if raw is None or not raw.strip():
            if default is None:
                raise ConfigError(f"`shard` auto: {name} is not set; give `shard` i/N", field="shard")
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(
                f"`shard` auto: {name}={raw!r} is not a number; give `shard` i/N", field="shard"
            ) from None

    if environ.get("SLURM_ARRAY_TASK_ID", "").strip():
        task, low, step = (
            number("SLURM_ARRAY_TASK_ID"),
            number("SLURM_ARRAY_TASK_MIN", 0),
            number("SLURM_ARRAY_TASK_STEP", 1),
        )
        count = number("SLURM_ARRAY_TASK_COUNT")
        return (task - low) // max(step, 1), count, f"`shard` auto (Slurm array task {task})"
    if environ.get("RANK", "").strip():
        return number("RANK"), number("WORLD_SIZE"), f"`shard` auto (RANK {environ['RANK']})"
    raise ConfigError(
        "`shard` auto: neither SLURM_ARRAY_TASK_ID (a Slurm array) nor RANK/WORLD_SIZE is set; give `shard` i/N"
    )


# -- claiming a shard ------------------------------------------------------------------------------------------------


@dataclass
class _Lock:
    path: Path
    token: str


def _read_lock(path: Path) -> dict[str, Any] | None:
    """A lock file's record; ``None`` while it is empty (being written) or damaged. Raises FileNotFoundError."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


#: How long a worker that finds a freshly created, still empty lock waits for its record (the winner writes it
#: right after creating the file), so that the loser can say which worker holds the shard.
FRESH_LOCK_WAIT_S = 2.0


def _read_settled(path: Path) -> dict[str, Any] | None:
    """:func:`_read_lock`, waiting up to :data:`FRESH_LOCK_WAIT_S` for a just-created lock's record."""
    deadline = time.monotonic() + FRESH_LOCK_WAIT_S
    while True:
        holder = _read_lock(path)
        if holder is not None or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def _slurm_task() -> str | None:
    """This process's Slurm array task (``ARRAYJOB_TASK``), which stays the same when Slurm requeues the task."""
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID", "").strip(), os.environ.get("SLURM_ARRAY_TASK_ID", "").strip()
    return f"{job}_{task}" if job and task else None


def _stale(path: Path, holder: dict[str, Any] | None, run: str | None = None) -> bool:
    """Whether the lock's worker is gone: its pid is dead on this host (another host's pid cannot be checked), it
    was this very Slurm array task before a requeue (Slurm runs one instance of a task at a time), it was an
    earlier attempt in this scheduler ``run`` (a Ray job retries a shard only after its worker died), or the lock
    has stayed empty past :data:`EMPTY_LOCK_GRACE_S`."""
    if holder is None:
        return time.time() - path.stat().st_mtime > EMPTY_LOCK_GRACE_S
    if run is not None and holder.get("run") == run:
        return True
    task = _slurm_task()
    if task is not None and holder.get("slurm_task") == task and holder.get("pid") != os.getpid():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        return not _alive(int(holder["pid"]))
    except (KeyError, TypeError, ValueError):
        return False


def _busy(path: Path, label: str, holder: dict[str, Any] | None) -> JobError:
    if holder is None:
        return JobError(f"{label} is being claimed by another worker ({path}); wait for it, or run another shard")
    where = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
    if holder.get("host") == socket.gethostname():
        advice = "wait for it to finish, or run another shard"
    else:
        advice = f"wait for it to finish; if that worker is gone, delete {path} and rerun"
    return JobError(f"{label} is being scored by {where} ({path}); {advice}")


def _claim(path: Path, label: str, run: str | None = None) -> _Lock:
    """Create the shard's lock file exclusively, taking over one whose worker is gone (:func:`_stale`).

    A takeover renames the stale lock to a name of its own first (one rename succeeds), then checks that what it
    moved is the lock it judged stale; a fresh claim moved by a racing takeover is put back with a link, which does
    not replace a file that appeared meanwhile.
    """
    token = uuid.uuid4().hex
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "slurm_task": _slurm_task(),
        "run": run,
        "token": token,
    }
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = _read_settled(path)
                stale = _stale(path, holder, run)
            except FileNotFoundError:
                continue  # released or taken over meanwhile: try again
            if not stale:
                raise _busy(path, label, holder) from None
            aside = path.with_name(f"{path.name}.{token}.stale")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            try:
                moved = _read_lock(aside)
            except FileNotFoundError:
                moved = None
            if moved != holder:  # a live claim that appeared after we read the stale one: give it back
                try:
                    os.link(aside, path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "a worker that died claiming it"
            logger.warning("%s: taking over the lock of %s, which is no longer running", label, who)
            continue
        except OSError as exc:
            raise output_error(path, exc) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return _Lock(path, token)
    raise _busy(path, label, None)


def _release(lock: _Lock) -> None:
    """Remove the lock if it is still this worker's."""
    try:
        holder = _read_lock(lock.path)
    except FileNotFoundError:
        return
    if holder is not None and holder.get("token") == lock.token:
        lock.path.unlink(missing_ok=True)


# -- planning --------------------------------------------------------------------------------------------------------


def _absolute(path: str | os.PathLike | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(str(path)))


def _gather_job_inputs(images, captions, options: MatchOptions):
    """A sharded job's inputs, refused in one line if workers could not read them by path or nothing is left."""
    job = gather_inputs(images, captions)
    if any(not isinstance(image, (str, os.PathLike)) for image in job.images):
        raise ConfigError("a sharded job reads its images by path: give a folder, an image list or file paths")
    if options.strict and job.skipped_lines:
        where_line, why = job.skipped_lines[0]
        raise InputError(f"{where_line}: {why} (`strict`: remove it, or drop `strict` to skip it)")
    if not job.images or not job.captions:
        raise InputError("nothing to score: give at least one image and one caption")
    return job


def _scoring_record(engine: EngineSpec, options: MatchOptions, pair_spec: dict | None) -> dict:
    """What every shard scores the same way: the manifest's ``scoring``."""
    return {
        "chunk_size": engine.chunk_size,
        "top_k": options.top_k,
        "adaptive": None if options.adaptive is None else str(options.adaptive),
        "per": options.per,
        "strict": options.strict,
        "pairs": pair_spec,
    }


def _recorded_engine(engine: EngineSpec) -> EngineSpec:
    """The spec the manifest records: workers read it, so its paths are absolute; the device is each worker's own."""
    model = engine.model
    if model is not None and model != "demo" and Path(model).expanduser().exists():
        model = _absolute(model)
    return engine.replace(
        model=model, bundle=_absolute(engine.bundle), adapters=_absolute(engine.adapters), device=None
    )


def plan_job(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    captions: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    shards: int,
    engine: EngineSpec | None = None,
    options: MatchOptions | None = None,
    content_hash: bool = False,
    **legacy: Any,
) -> JobManifest:
    """Write the manifest of a job of ``shards`` shards to ``out/job.json`` and return it.

    ``engine`` and ``options`` are :func:`dsdkit.jobs.match.match`'s (``legacy`` takes the keyword arguments of the
    earlier signature: ``model=``, ``config=``, ``top_k=``, ...); the engine is opened once here (on the spec's
    device) to record its identity, so that a worker with other weights, another adapter or another scoring config
    is refused before it scores. Images must be files (a folder, an image list or paths): workers read them by
    path. Planning a job that is already in ``out`` (the same fingerprint) changes nothing; a different job there
    is refused.

    Raises:
        ConfigError: impossible options (more shards than chunks, ...); JobError: ``out`` holds another job;
        InputError: bad inputs, as :func:`~dsdkit.jobs.match.match` reports them.
    """
    from ..runtime.pairs import read_pairs
    from ..runtime.results import require_parquet
    from .engines import open_engine
    from .match import specs_from_keywords

    out = Path(out)
    if legacy:
        engine, options = specs_from_keywords(engine, options, legacy)
    engine, options = engine or EngineSpec(), options or MatchOptions()
    if not isinstance(engine, EngineSpec):
        raise ConfigError("plan_job needs the engine as a spec (the manifest records it), not a loaded model")
    require_parquet(out / "scores" / "part.parquet")  # the parts are Parquet: a missing pyarrow is refused now
    job = _gather_job_inputs(images, captions, options)
    ranges = shard_ranges(len(job.images), engine.chunk_size, shards)
    pair_spec = None
    if options.pairs is not None:
        pair_list = read_pairs(options.pairs, job.names, job.captions)
        pair_spec = {
            "source": pair_list.source,
            "pairs": [list(p) for p in pair_list.pairs],
            "duplicates": pair_list.duplicates,
        }
    recorded = _recorded_engine(engine)
    with open_engine(engine) as opened:
        identity = json.loads(json.dumps(opened.identity().to_dict(), default=str))
        stored, shortlist_bytes = (
            _plan_shortlist(job, opened, options) if options.shortlist is not None else (None, b"")
        )
    caption_source = None
    if isinstance(captions, (str, os.PathLike)):  # a caption file: recorded so that a changed one is refused
        caption_source = {
            "name": str(captions),
            "path": _absolute(captions),
            "file": _file_record(captions, content_hash),
        }
    manifest = JobManifest(
        folder=out,
        images=[
            {"name": name, "path": _absolute(image), "file": _file_record(image, content_hash)}
            for image, name in zip(job.images, job.names, strict=True)
        ],
        captions=list(job.captions),
        caption_where=list(job.where),
        caption_source=caption_source,
        skipped_caption_lines=[{"where": w, "reason": why} for w, why in job.skipped_lines],
        engine=recorded.to_dict(),
        scoring=_scoring_record(engine, options, pair_spec),
        identity=identity,
        shards=ranges,
        content_hash=content_hash,
        shortlist=stored,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    manifest.fingerprint = manifest.compute_fingerprint()
    if manifest.path.exists():
        existing = JobManifest.read(out)
        if existing.fingerprint == manifest.fingerprint:
            logger.info("%s already holds this job; nothing to do", out)
            return existing
        raise JobError(
            f"{out} already holds another job (other inputs, model, scoring or shards); choose another `out`, "
            "or delete the folder to replace it"
        )
    if out.exists() and (not out.is_dir() or any(p.name != "scores" for p in out.iterdir())):
        raise JobError(f"{out} exists and is not an empty folder; choose a new `out` for the job")
    try:
        (out / "scores").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from None
    if stored is not None:
        atomic_write_bytes(out / SHORTLIST_FILE, shortlist_bytes)  # before the manifest, which is the commit point
    atomic_write_text(manifest.path, manifest.to_json())
    logger.info("planned %s: %d images x %d captions in %d shard(s)", out, len(job.images), len(job.captions), shards)
    return manifest


#: The shortlist of a gallery-search job, beside job.json (numpy arrays, no pickles).
SHORTLIST_FILE = "shortlist.npz"


def _plan_shortlist(job, engine: Engine, options: MatchOptions) -> tuple[dict[str, Any], bytes]:
    """Compute the job's shortlist once: its record for the manifest and the file's bytes (written with it)."""
    import hashlib
    import io

    from .match import PreparedJob
    from .shortlists import compute_shortlist
    from .skips import SkippedImages

    skips = SkippedImages(job.names, strict=False).screen(job.images)
    shortlist, stage = compute_shortlist(PreparedJob(job, None, skips), engine, options.shortlist, options.per)
    buffer = io.BytesIO()
    np.savez(buffer, **shortlist.to_arrays())
    data = buffer.getvalue()
    record = {
        "spec": options.shortlist.to_dict(),
        "file": SHORTLIST_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "stage": json.loads(json.dumps(stage, default=str)),
    }
    return record, data


# -- running a shard -------------------------------------------------------------------------------------------------


@dataclass
class ShardReport:
    """What :func:`run_shard` did: the shard, its part and done marker, and whether it was already done."""

    index: int
    num_shards: int
    part: Path
    marker: dict[str, Any] = field(default_factory=dict)
    already_done: bool = False


def read_done_marker(manifest: JobManifest, index: int, verify: bool = False) -> dict[str, Any] | None:
    """The shard's done marker if the shard is done (marker and part present; with ``verify``, the part's sha256
    checked), else ``None``; a marker of another job is refused."""
    path = manifest.done_marker(index)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise JobError(f"{path}: unreadable done marker ({exc}); delete it to score the shard again") from None
    if not isinstance(marker, dict) or marker.get("format") != DONE_FORMAT:
        raise JobError(f"{path}: not a dsdkit done marker; delete it to score the shard again")
    if marker.get("job") != manifest.fingerprint:
        raise JobError(
            f"{path} belongs to another job (its fingerprint is not {manifest.path}'s); delete {path.parent} to "
            "score this job's shards again"
        )
    part = manifest.part(index)
    schemas.done_marker(
        marker, str(path), manifest.fingerprint, index, manifest.num_shards, manifest.shards[index], part.name
    )
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return None  # the marker without its part: score the shard again
    if size != marker.get("part_bytes") or (verify and sha256_file(part) != marker.get("part_sha256")):
        raise JobError(f"{part} is not the part its done marker {path.name} records; delete both and rerun the shard")
    return marker


def open_job_engine(job: str | os.PathLike | JobManifest, device: str | None = None) -> Engine:
    """The engine a job's manifest names, opened on ``device`` (default: auto) and checked against the identity
    recorded at planning. A worker that scores several shards (a Ray actor) opens it once and passes it to
    :func:`run_shard`.

    Raises:
        JobError: the model, bundle or scoring changed since planning.
    """
    from .engines import open_engine

    manifest = load_job(job)
    engine = open_engine(manifest.engine_spec().replace(device=device))
    try:
        manifest.check_identity(engine.identity().to_dict())
    except BaseException:
        engine.close()
        raise
    return engine


def run_shard(
    job: str | os.PathLike | JobManifest,
    shard: str | int,
    device: str | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
    engine: Engine | None = None,
    run: str | None = None,
) -> ShardReport:
    """Score shard ``shard`` (``i/N``, ``auto`` or an index: :func:`parse_shard`) of a planned job, unless it is
    done; every other option comes from the manifest. ``device`` is the worker's own (default: auto).

    Args:
        engine: an engine from :func:`open_job_engine` of this job, kept open by the caller (default: open one for
            this shard and close it after).
        run: the id of a scheduler's run that gives each shard to one worker at a time and retries it only after
            that worker died (a Ray job): a lock left by the same run on another host is then taken over, which a
            plain worker cannot judge (another host's pid cannot be checked).

    Raises:
        JobError: the shard's inputs, the model or the scoring changed since planning, or another live worker holds
            the shard; ConfigError: a bad shard spec.
    """
    from ..runtime.pairs import PairList
    from .match import match

    manifest = load_job(job)
    index = parse_shard(shard, manifest.num_shards)
    label = manifest.label(index)
    part = manifest.part(index)
    marker = read_done_marker(manifest, index)
    if marker is not None:
        logger.info("%s is already done (%s); nothing to do", label, manifest.done_marker(index).name)
        return ShardReport(index, manifest.num_shards, part, marker, already_done=True)
    start, stop = manifest.shards[index]
    manifest.check_inputs(range(start, stop))
    try:
        (manifest.folder / "scores").mkdir(exist_ok=True)
    except OSError as exc:
        raise output_error(manifest.folder / "scores", exc) from None
    lock = _claim(manifest.lock(index), label, run)
    own_engine = engine is None
    try:
        marker = read_done_marker(manifest, index)  # finished by another worker between the first look and the claim
        if marker is not None:
            logger.info("%s is already done (%s); nothing to do", label, manifest.done_marker(index).name)
            return ShardReport(index, manifest.num_shards, part, marker, already_done=True)
        scoring = manifest.scoring
        if own_engine:
            engine = open_job_engine(manifest, device)
        else:
            manifest.check_identity(engine.identity().to_dict())
        pairs = None
        if scoring["pairs"] is not None:
            pairs = PairList(
                [(i - start, j) for i, j in scoring["pairs"]["pairs"] if start <= i < stop],
                scoring["pairs"]["source"],
            )
        shortlist = manifest.load_shortlist()
        if shortlist is not None and not shortlist.keeps_all:
            # The stored shortlist, never recomputed: this shard reranks the pairs of its own images.
            pairs = PairList([(i - start, j) for i, j in shortlist.pairs() if start <= i < stop], "shortlist")
        options = MatchOptions(
            output=str(part),
            top_k=scoring["top_k"],
            resume=True,
            strict=scoring["strict"],
            adaptive=scoring["adaptive"],
            # Without adaptive ranking the direction only chose the (stored) shortlist: the shard scores its pairs.
            per=scoring["per"] if scoring["adaptive"] is not None else "image",
            pairs=pairs,
            empty_ok=True,  # a shard of unusable images is done, with no rows; merge refuses an empty job
        )
        result = match(
            [manifest.images[i]["path"] for i in range(start, stop)],
            manifest.captions,
            engine,
            options,
            progress=progress,
            close_engine=own_engine,
        )
        _stamp_part(manifest, index, result, part)
        marker = _marker(manifest, index, result, part)
        atomic_write_text(manifest.done_marker(index), json.dumps(marker, indent=1, ensure_ascii=False) + "\n")
    finally:
        _release(lock)
    logger.info("%s: %d rows in %s", label, marker["rows"], part)
    return ShardReport(index, manifest.num_shards, part, marker)


def _scored_ids(manifest: JobManifest, index: int, result: MatchResult) -> list[int]:
    """The job's ids of the part's rows: the shard's images that were not skipped, in order."""
    start, stop = manifest.shards[index]
    dropped = {start + entry["index"] for entry in result.meta["skipped"]["images"]}
    return [i for i in range(start, stop) if i not in dropped]


def _stamp_part(manifest: JobManifest, index: int, result: MatchResult, part: Path) -> None:
    """Rewrite the shard's part with its own row labels in its metadata (``meta["job"]``: the job's fingerprint,
    the shard and the job ids of its rows), so that merge can check the done marker's ids against the part itself.

    The part is written twice (``match`` writes it first) because ``match`` knows nothing of jobs; the second write
    is atomic too, and the done marker, written after it, stays the commit point."""
    from ..runtime.results import write_result

    result.meta["job"] = {
        "fingerprint": manifest.fingerprint,
        "shard": index,
        "image_ids": _scored_ids(manifest, index, result),
    }
    write_result(result, part, k=manifest.scoring["top_k"])


def _marker(manifest: JobManifest, index: int, result: MatchResult, part: Path) -> dict[str, Any]:
    """The done marker of a finished shard: image ids are the job's (a shard's own indices plus its start)."""
    start, stop = manifest.shards[index]
    meta = result.meta
    skipped = [
        {**entry, "index": start + entry["index"], "image": manifest.images[start + entry["index"]]["name"]}
        for entry in meta["skipped"]["images"]
    ]
    warned = [
        {**entry, "index": start + entry["index"], "image": manifest.images[start + entry["index"]]["name"]}
        for entry in meta.get("image_warnings", [])
    ]
    spent = meta.get("evaluations", {})
    return {
        "format": DONE_FORMAT,
        "job": manifest.fingerprint,
        "shard": index,
        "shards": manifest.num_shards,
        "images": [start, stop],
        "rows": len(result.images),
        "image_ids": _scored_ids(manifest, index, result),
        "unet_evaluations": int(spent.get("conditional", 0) + spent.get("unconditional", 0)),
        "evaluations": spent,
        "skipped": skipped,
        "image_warnings": warned,
        "truncated_captions": meta.get("truncated_captions", {}),
        "seconds": meta.get("seconds"),
        "part": part.name,
        "part_bytes": part.stat().st_size,
        "part_sha256": sha256_file(part),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "dsdkit_version": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# -- merging ---------------------------------------------------------------------------------------------------------


def merge_job(
    job: str | os.PathLike | JobManifest, output: str | os.PathLike | None = None, top_k: int | None = None
) -> MatchResult:
    """The job's result from its parts, in image order (optionally written to ``output``: ``.parquet``, ``.json``,
    ``.jsonl`` or ``.csv``; ``top_k`` for the JSON lists, default the job's).

    Raises:
        JobError: shards not done (all named), an input changed since planning, a part that is not the one its
            marker records.
    """
    from ..runtime.results import write_result
    from .skips import skipped_report_path

    manifest = load_job(job)
    if output is not None and Path(output).suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(
            f"`output` {output}: unknown format; use a file ending in {', '.join(OUTPUT_FORMATS)}", field="output"
        )
    top_k = manifest.scoring["top_k"] if top_k is None else top_k
    if top_k < 1:
        raise ConfigError(f"`top_k` must be >= 1, got {top_k}", field="top_k")
    markers = {i: read_done_marker(manifest, i, verify=True) for i in range(manifest.num_shards)}
    missing = [i for i, marker in markers.items() if marker is None]
    if missing:
        running = [i for i in missing if manifest.lock(i).exists()]
        listed = ", ".join(str(i) for i in missing[:20]) + (
            f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        )
        note = f"; running now: {', '.join(str(i) for i in running[:20])}" if running else ""
        raise JobError(
            f"{manifest.folder}: {len(missing)} of {manifest.num_shards} shard(s) not done: {listed}{note}; run "
            f"`dsdkit match --job {manifest.folder} --shard i/{manifest.num_shards}` (or run_shard) for each, then "
            "merge again"
        )
    manifest.check_inputs()
    if not any(m["rows"] for m in markers.values()):
        first = next(m["skipped"][0]["reason"] for m in markers.values() if m["skipped"])
        raise InputError(
            f"no usable image: all {len(manifest.images)} of {manifest.folder} were skipped (first: {first}); "
            "check the images"
        )
    parts = [_checked_part(manifest, i, markers[i]) for i in range(manifest.num_shards)]
    ids = [i for m in markers.values() for i in m["image_ids"]]
    detailed = [p.held is not None for p in parts]
    if any(detailed) != all(detailed):
        raise JobError(f"{manifest.folder}: some parts hold adaptive or pair results and others do not; rerun them")
    scores = np.concatenate([p.scores for p in parts], axis=0)
    held = np.concatenate([p.held for p in parts], axis=0) if all(detailed) else None
    left_after = np.concatenate([p.left_after for p in parts], axis=0) if all(detailed) else None
    meta = _merged_meta(manifest, parts[0].meta, list(markers.values()))
    shortlist = manifest.load_shortlist()
    if shortlist is not None:
        from ..runtime.config import ScoringConfig

        spent = {k: sum(m.get("evaluations", {}).get(k, 0) for m in markers.values()) for k in EVALUATION_KEYS}
        steps = len(manifest.identity["timesteps"])
        unconditional = ScoringConfig.from_dict(manifest.identity["scoring"]).needs_unconditional_pass
        exhaustive = len(ids) * steps * (len(manifest.captions) + int(unconditional))  # every usable pair
        meta["shortlist"] = shortlist_meta(manifest.shortlist["stage"], len(shortlist.pairs()), exhaustive, spent)
    result = MatchResult(
        images=[manifest.images[i]["name"] for i in ids],
        captions=list(manifest.captions),
        scores=scores,
        meta=meta,
        held=held,
        left_after=left_after,
        num_timesteps=parts[0].num_timesteps if all(detailed) else None,
        shortlist_rank=None if shortlist is None else shortlist.rank_matrix()[ids],
        shortlist_similarity=None if shortlist is None else shortlist.similarity_matrix()[ids],
    )
    if shortlist is not None:  # a fused ranking is applied to the whole job, as the single process applies it
        from .match import fused_if_asked

        result = fused_if_asked(result, manifest.shortlist["spec"], manifest.scoring["per"])
    if output is not None:
        report = skipped_report_path(output)
        nothing = not (
            meta["skipped"]["images"]
            or meta["skipped"]["caption_lines"]
            or meta["truncated_captions"]
            or meta["image_warnings"]
        )
        meta["skipped_report"] = None if nothing else report.name
        write_result(result, output, k=top_k)
        if not nothing:
            document = {
                "format": "dsdkit-skipped/1",
                "result": Path(output).name,
                **meta["skipped"],
                "truncated_captions": meta["truncated_captions"],
                "warnings": meta["image_warnings"],
            }
            atomic_write_text(report, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
        else:
            report.unlink(missing_ok=True)
        logger.info("wrote %s", output)
    return result


def _checked_part(manifest: JobManifest, index: int, marker: dict[str, Any]) -> MatchResult:
    """Shard ``index``'s part, read and checked against its (validated) done marker and the job: its captions, its
    own row labels (``meta["job"]``, see :func:`_stamp_part`) equal to the marker's ``image_ids``, and each row
    named as the job names that image, so a row can never be merged under another image's name."""
    from ..runtime.images import describe
    from ..runtime.results import read_result

    path = manifest.part(index)
    part = read_result(path)
    redo = f"delete it and {manifest.done_marker(index).name}, and rerun shard {index}"
    if part.captions != manifest.captions or len(part.images) != marker["rows"]:
        raise JobError(f"{path} does not fit {manifest.path} (other captions or rows); {redo}")
    ids = marker["image_ids"]
    stamp = part.meta.get("job")
    if stamp is None:  # a part written before parts carried their ids: its row names are still checked below
        logger.warning("%s carries no row labels of its own (an earlier dsdkit wrote it); checking its names", path)
    elif (
        not isinstance(stamp, dict) or stamp.get("fingerprint") != manifest.fingerprint or stamp.get("shard") != index
    ):
        raise JobError(f"{path} is not shard {index} of {manifest.path} (its own label says otherwise); {redo}")
    elif stamp.get("image_ids") != ids:
        raise JobError(
            f"{path}: its rows are images {_ids(stamp.get('image_ids'))}, the done marker says {_ids(ids)}; {redo}"
        )
    for row, (name, image) in enumerate(zip(part.images, ids, strict=True)):
        if name != describe(manifest.images[image]["path"]):
            raise JobError(
                f"{path}: row {row} is {name}, but the done marker labels it image {image} "
                f"({manifest.images[image]['name']}); {redo}"
            )
    return part


def _ids(ids: Any) -> str:
    text = json.dumps(ids)
    return text if len(text) <= 60 else text[:57] + "..."


def _merged_meta(manifest: JobManifest, first: dict[str, Any], markers: list[dict[str, Any]]) -> dict[str, Any]:
    """The merged result's ``meta``: the engine's (from the first part), with the job's images, skips, warnings and
    evaluations summed over the shards, and where the job is."""
    meta = dict(first)
    spent: dict[str, int] = {}
    for marker in markers:
        for key, value in marker.get("evaluations", {}).items():
            spent[key] = spent.get(key, 0) + int(value)
    meta["evaluations"] = spent
    meta["unet_evaluations"] = sum(m["unet_evaluations"] for m in markers)
    meta["seconds"] = round(sum(m.get("seconds") or 0.0 for m in markers), 3)
    meta["skipped"] = {
        "images": [entry for m in markers for entry in m["skipped"]],
        "caption_lines": list(manifest.skipped_caption_lines),
    }
    meta["image_warnings"] = [entry for m in markers for entry in m["image_warnings"]]
    # The parts name captions by position ("caption #3"); the job knows their lines.
    where = {f"caption #{j}": w for j, w in enumerate(manifest.caption_where)}
    truncated: dict[str, int] = {}
    for marker in markers:
        for key, count in marker.get("truncated_captions", {}).items():
            truncated[where.get(key, key)] = count
    meta["truncated_captions"] = truncated
    if manifest.scoring["pairs"] is not None:
        pairs = manifest.scoring["pairs"]
        meta["pairs"] = {"source": pairs["source"], "pairs": len(pairs["pairs"]), "duplicates": pairs["duplicates"]}
    meta["job"] = {"folder": str(manifest.folder), "fingerprint": manifest.fingerprint, "shards": manifest.num_shards}
    meta.pop("skipped_report", None)
    return meta
