"""A sharded match job on a Ray cluster, through Ray Data: ``dsdkit match ... --ray [ADDRESS|local] --workers N``.

The unit of work and of recovery stays dsdkit's own shard (:mod:`dsdkit.jobs.shards`): Ray only schedules them. The
driver plans the job (or takes a planned one), puts the index of every shard not yet done in a dataset, one row per
block, and maps it with :class:`ShardWorker` on an actor pool (``compute=ActorPoolStrategy(size=workers)``, one
shard in flight per actor so that a slow actor never hoards queued shards). Each actor pins its thread count and
opens the job's model or bundle once (:func:`~dsdkit.jobs.shards.open_job_engine`, checked against the job's identity);
for each shard it reads and decodes its own images from their paths (pixels never travel through the object store),
writes its own part and done marker (:func:`~dsdkit.jobs.shards.run_shard`) and returns one small status row.

Recovery: the actors run with ``max_restarts`` and their calls with ``max_task_retries``, so a worker process that
dies is restarted and its shard is given to a worker again; that attempt takes over the dead attempt's lock (the
lock records the run's id, and Ray retries a shard only after its worker died) and continues from the chunks the
dead one saved. A rerun of the same command after the driver itself died skips the shards that are done. The merged
result is :func:`~dsdkit.jobs.shards.merge_job`'s, so it equals a single-process run within the scoring contract's
batch-invariance tolerance (bitwise on one machine: the shards start on chunk boundaries and score in the same
batches).

The job folder, the images and the model or bundle must be at the same paths on every node (a shared filesystem,
as for a Slurm array).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.errors import ConfigError, DsdkitError, JobError, missing_dependency, one_line
from .inputs import gather_inputs
from .shards import JobManifest, load_job, merge_job, open_job_engine, plan_job, read_done_marker, run_shard
from .specs import EngineSpec, MatchOptions

__all__ = ["RayOptions", "RayJobReport", "ShardWorker", "run_job_on_ray", "match_on_ray", "default_shards"]

logger = logging.getLogger(__name__)

#: Shards per worker when ``match_on_ray`` plans the job: small enough that a dead worker loses little and the pool
#: stays balanced, large enough that per-shard overhead (a part, a marker, one engine call setup) stays negligible.
SHARDS_PER_WORKER = 4


@dataclass
class RayOptions:
    """Where and how wide a job runs on Ray (the ``--ray``, ``--workers``, ``--gpus-per-worker`` and
    ``--cpus-per-worker`` options).

    Attributes:
        address: ``"local"`` starts a local cluster for this call (shut down after it); ``None`` uses the Ray this
            process is connected to already, else ``RAY_ADDRESS`` or a running local cluster (``ray.init()``'s
            default); anything else is ``ray.init(address=...)`` (``auto``, ``HOST:PORT``, ``ray://HOST:10001``).
        workers: actors in the pool (at most what the cluster can hold, and one per shard to do).
        gpus_per_worker: GPUs each actor reserves (``0``: CPU workers). Ray sets each actor's
            ``CUDA_VISIBLE_DEVICES`` to its own GPUs, so every actor scores on ``cuda`` device 0 of its view.
        cpus_per_worker: CPUs each actor reserves; also its thread count unless ``threads`` is given.
        threads: torch / ONNX Runtime threads per actor (default: ``cpus_per_worker``, at least 1).
        device: the device each actor opens the engine on (default: ``auto``, i.e. CUDA where the actor sees a GPU).
        max_restarts: how often Ray restarts an actor whose process died.
        max_task_retries: how often a shard whose actor died is given to an actor again.
        progress_bars: Ray Data's own progress bars on stderr.
    """

    address: str | None = "local"
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads: int | None = None
    device: str | None = None
    max_restarts: int = 3
    max_task_retries: int = 3
    progress_bars: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"`workers` must be >= 1, got {self.workers}", field="workers")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"`gpus_per_worker` must be >= 0, got {self.gpus_per_worker}", field="gpus_per_worker")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"`cpus_per_worker` must be > 0, got {self.cpus_per_worker}", field="cpus_per_worker")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"`threads` must be >= 1, got {self.threads}", field="threads")
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise ConfigError("max_restarts and max_task_retries must be >= 0")

    @property
    def worker_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, int(self.cpus_per_worker))


@dataclass
class RayJobReport:
    """What :func:`run_job_on_ray` did.

    Attributes:
        job: the job folder.
        run: this run's id (in every lock its workers took).
        shards: the status row of every shard scored in this run, by shard index (``shard``, ``rows``,
            ``unet_evaluations``, ``seconds``, ``already_done``, ``pid``, ``host``, ``gpu_ids``, ``restarted``).
        already_done: the shards that were done before this run.
        workers: the distinct worker processes that scored (``pid``, ``host``, ``gpu_ids``, ``restarted``).
        seconds: wall time of the Ray part (actor start, scoring, collecting the rows).
        requested_workers / used_workers: the pool asked for, and the one the cluster could hold.
    """

    job: Path
    run: str
    shards: list[dict[str, Any]] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    requested_workers: int = 0
    used_workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"job": str(self.job)}


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise (missing_dependency(exc) or exc) from None
    return ray


class ShardWorker:
    """The Ray Data actor: opens the job's engine once, then scores the shards it is given, one at a time.

    A subclass may wrap :meth:`score_shard` (e.g. to instrument it); :func:`run_job_on_ray` takes it as
    ``worker_class``.
    """

    def __init__(self, job: str, run: str, threads: int, device: str | None = None):
        from ..runtime.threads import configure_threads

        configure_threads(threads)
        self.run = run
        self.manifest = load_job(job)
        self.engine = open_job_engine(self.manifest, device)
        self.identity = _worker_identity()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [self.score_shard(int(index)) for index in batch["shard"]]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    def score_shard(self, index: int) -> dict[str, Any]:
        started = time.perf_counter()
        report = run_shard(self.manifest, index, engine=self.engine, run=self.run)
        marker = report.marker
        return {
            "shard": index,
            "rows": int(marker["rows"]),
            "unet_evaluations": int(marker["unet_evaluations"]),
            "skipped": len(marker["skipped"]),
            "seconds": time.perf_counter() - started,
            "already_done": report.already_done,
            **self.identity,
        }

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _worker_identity() -> dict[str, Any]:
    """Who scored a shard: process, host, the GPUs Ray gave this actor, and whether Ray restarted it."""
    import ray

    with warnings.catch_warnings():
        # Ray's own property reads its deprecated ``actor_id`` inside; nothing of ours to change.
        warnings.simplefilter("ignore", DeprecationWarning)
        restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()]),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "restarted": restarted,
    }


#: Ray takes a node's address from this switch: off, the loopback address (Ray's own choice on macOS and Windows),
#: and then every server of the node (GCS, raylet, workers, agents) listens on loopback only. On, the address other
#: machines reach it by, where an unauthenticated port would let anyone who reaches it run code.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_local_cluster(ray, **kwargs) -> None:
    """``ray.init(**kwargs)`` starting a new local cluster whose every port listens on loopback only (every cluster
    dsdkit starts itself; a multi-node cluster is started by its user, who secures it)."""
    from ray._private import ray_constants

    # The switch is read when ray_constants is imported (already, with ray) and by every process the new cluster
    # starts (they inherit this environment); set for the start only.
    previous = os.environ.get(_LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**kwargs)
    finally:
        if previous[0] is None:
            os.environ.pop(_LOOPBACK_SWITCH, None)
        else:
            os.environ[_LOOPBACK_SWITCH] = previous[0]
        ray_constants.ENABLE_RAY_CLUSTER = previous[1]


def _connect(ray, address: str | None) -> bool:
    """Connect to Ray as ``address`` asks (:class:`RayOptions`); True when this call started the cluster."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        if address == "local":
            init_local_cluster(ray, **kwargs)
            return True
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"`address` {address}: cannot connect to a Ray cluster there ({one_line(exc)})", field="address"
        ) from None
    return False


def _pool_size(ray, options: RayOptions, shards: int) -> int:
    """The actors the cluster can hold, at most ``workers`` and one per shard; refused when not even one fits (a
    pool that cannot start waits for resources forever)."""
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if options.gpus_per_worker > gpus:
        raise ConfigError(
            f"`gpus_per_worker` {options.gpus_per_worker:g}: the Ray cluster has {gpus:g} GPU(s); use fewer GPUs per "
            "worker, or 0 for CPU workers"
        )
    if options.cpus_per_worker > cpus:
        raise ConfigError(
            f"`cpus_per_worker` {options.cpus_per_worker:g}: the Ray cluster has {cpus:g} CPU(s)",
            field="cpus_per_worker",
        )
    fits = math.floor(cpus / options.cpus_per_worker + 1e-9)
    if options.gpus_per_worker > 0:
        fits = min(fits, math.floor(gpus / options.gpus_per_worker + 1e-9))
    size = min(options.workers, fits, shards)
    if size < options.workers and size < shards:
        logger.warning(
            "the Ray cluster holds %d worker(s) of %g CPU / %g GPU (it has %g CPU, %g GPU); running %d instead of %d",
            fits,
            options.cpus_per_worker,
            options.gpus_per_worker,
            cpus,
            gpus,
            size,
            options.workers,
        )
    return size


def _dsdkit_cause(exc: BaseException) -> DsdkitError | None:
    """The dsdkit error a worker raised, inside the exceptions Ray wraps it in (``cause`` and ``__cause__``)."""
    from ray.exceptions import RayError as ray_error

    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DsdkitError) and not isinstance(current, ray_error):
            return current
        stack.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return None


def run_job_on_ray(
    job: str | os.PathLike | JobManifest,
    options: RayOptions | None = None,
    worker_class: type[ShardWorker] = ShardWorker,
) -> RayJobReport:
    """Score every shard of a planned job that is not done yet, on Ray Data actors (see the module doc).

    Raises:
        ConfigError: the cluster cannot hold one worker, or cannot be reached; JobError: a worker failed (its
            dsdkit error, when it raised one, e.g. a changed input or model), with the shards done so far kept.
    """
    ray = _ray()
    options = options or RayOptions()
    manifest = load_job(job)
    report = RayJobReport(manifest.folder, uuid.uuid4().hex, requested_workers=options.workers)
    todo = [i for i in range(manifest.num_shards) if read_done_marker(manifest, i) is None]
    report.already_done = [i for i in range(manifest.num_shards) if i not in todo]
    if not todo:
        logger.info("%s: all %d shard(s) are done; nothing to run", manifest.folder, manifest.num_shards)
        return report
    started_here = _connect(ray, options.address)
    started = time.perf_counter()
    try:
        report.used_workers = _pool_size(ray, options, len(todo))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = options.progress_bars
        context.raise_original_map_exception = True  # a worker's JobError reaches the driver as itself
        # One row per block, so that each shard is its own task and goes to whichever actor is free.
        dataset = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
        with warnings.catch_warnings():
            # max_restarts / max_task_retries have no named parameter of map_batches yet and go through its
            # deprecated **ray_remote_args; Ray Data's default for both is "forever", ours is a bound.
            warnings.simplefilter("ignore", DeprecationWarning)
            scored = _map_shards(ray, dataset, worker_class, manifest, report, options)
        for row in scored.iter_rows():
            status = {key: _plain(value) for key, value in row.items()}
            report.shards.append(status)
            logger.info(
                "%s: %d rows, %d UNet evaluations, %.1f s (pid %s on %s%s)",
                manifest.label(status["shard"]),
                status["rows"],
                status["unet_evaluations"],
                status["seconds"],
                status["pid"],
                status["host"],
                f", GPUs {status['gpu_ids']}" if status["gpu_ids"] != "[]" else "",
            )
    except Exception as exc:
        if isinstance(exc, DsdkitError) and not isinstance(exc, ray.exceptions.RayError):
            raise  # the driver's own (a cluster too small, ...)
        cause = _dsdkit_cause(exc)
        if cause is not None:  # a worker's one-line error, without the traceback text Ray adds to its message
            raise type(cause)(one_line(cause)) from None
        done = sum(read_done_marker(manifest, i) is not None for i in range(manifest.num_shards))
        raise JobError(
            f"{manifest.folder}: the Ray job failed ({type(exc).__name__}: {one_line(exc)}); {done} of "
            f"{manifest.num_shards} shard(s) are done and kept: run the same command again to continue"
        ) from None
    finally:
        report.seconds = time.perf_counter() - started
        if started_here:
            ray.shutdown()
    report.shards.sort(key=lambda status: status["shard"])
    workers = {(s["host"], s["pid"]): s for s in report.shards}
    report.workers = [
        {key: status[key] for key in ("pid", "host", "gpu_ids", "cuda_visible_devices", "restarted")}
        for status in workers.values()
    ]
    return report


def _map_shards(ray, dataset, worker_class, manifest: JobManifest, report: RayJobReport, options: RayOptions):
    return dataset.map_batches(
        worker_class,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=report.used_workers, max_tasks_in_flight_per_actor=1),
        fn_constructor_kwargs={
            "job": str(manifest.folder),
            "run": report.run,
            "threads": options.worker_threads,
            "device": options.device,
        },
        num_cpus=options.cpus_per_worker,
        num_gpus=options.gpus_per_worker or None,
        max_restarts=options.max_restarts,
        max_task_retries=options.max_task_retries,
    )


def _plain(value: Any) -> Any:
    """A status value as plain Python (Ray Data hands back numpy scalars)."""
    return value.item() if hasattr(value, "item") else value


def default_shards(num_images: int, chunk_size: int, workers: int) -> int:
    """:data:`SHARDS_PER_WORKER` shards per worker, at most one per chunk of images."""
    return max(1, min(math.ceil(num_images / chunk_size), SHARDS_PER_WORKER * workers))


def default_job_folder(output: str | os.PathLike) -> Path:
    """Where ``match --ray -o RESULT`` plans its job when ``--job`` is not given: ``RESULT.job/`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".job")


def match_on_ray(
    images: str | os.PathLike | Sequence[str | os.PathLike],
    captions: str | os.PathLike | Sequence[str],
    output: str | os.PathLike | None,
    job: str | os.PathLike | None = None,
    shards: int | None = None,
    options: RayOptions | None = None,
    engine: EngineSpec | None = None,
    match_options: MatchOptions | None = None,
    **legacy,
):
    """Plan a job (:func:`~dsdkit.jobs.shards.plan_job` of ``engine`` and ``match_options``; a job already planned
    there with the same inputs and options is continued), score it on Ray (:func:`run_job_on_ray`) and merge it into
    ``output``. ``legacy`` takes :func:`~dsdkit.jobs.match.match`'s keyword arguments of the earlier signature
    (``model=``, ``config=``, ``chunk_size=``, ...), as ``match`` and ``plan_job`` do.

    Returns ``(MatchResult, RayJobReport)``.
    """
    if output is None and job is None:
        raise ConfigError(
            "a run on Ray needs an `output` (the merged result) or a `job` folder (where the shards are kept)",
            field="output",
        )
    if legacy:
        from .match import specs_from_keywords

        engine, match_options = specs_from_keywords(engine, match_options, legacy)
    options = options or RayOptions()
    engine = engine or EngineSpec()
    folder = Path(job) if job is not None else default_job_folder(output)
    if shards is None and (folder / "job.json").exists():
        shards = load_job(folder).num_shards  # continuing: the job keeps its shards whatever --workers is now
    if shards is None:
        count = len(gather_inputs(images, captions).images)
        shards = default_shards(count, engine.chunk_size, options.workers)
    manifest = plan_job(images, captions, folder, shards, engine, match_options)
    report = run_job_on_ray(manifest, options)
    result = merge_job(manifest, output) if output is not None else None
    return result, report
