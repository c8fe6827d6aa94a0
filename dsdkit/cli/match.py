"""Matching: ``match`` (in this process, one shard of a planned job, on Ray, or a dry run), ``plan`` and ``merge``.

``match`` builds an :class:`~dsdkit.jobs.specs.EngineSpec` and :class:`~dsdkit.jobs.specs.MatchOptions` from its
options and hands them to one library function, chosen by the scale-out options: ``jobs.match.match``,
``jobs.shards.run_shard``, ``jobs.ray_runner.match_on_ray`` / ``run_job_on_ray``, or ``jobs.dry_run.estimate_match``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..jobs.specs import EngineSpec, MatchOptions
from ..runtime.errors import ConfigError
from ..runtime.inputs import IMAGE_SUFFIXES
from .app import app, command
from .options import (
    CREATES_FOLDERS,
    IO_PANEL,
    SCALE_PANEL,
    Declared,
    argument,
    engine_options,
    match_options,
    option,
    option_group,
    prepare_output,
)
from .ui import ProgressBar, print_summary, say

if TYPE_CHECKING:
    from ..jobs.ray_runner import RayOptions
    from ..runtime.results import MatchResult

ImagesArgument = Annotated[
    Path | None,
    argument(
        "IMAGES",
        help="A folder of images, or a text file with one image path per line (not with --job).",
        show_default=False,
    ),
]
CaptionsArgument = Annotated[
    Path | None,
    argument("CAPTIONS", help="A text file with one caption per line (UTF-8; not with --job).", show_default=False),
]


# -- scale-out ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleOut:
    """Where a ``match`` runs: a shard of a planned job (``job``, ``shard``) or Ray (``ray`` and its pool)."""

    job: Path | None = None
    shard: str | None = None
    ray: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    shards: int | None = None

    def __post_init__(self) -> None:
        if self.ray is None:
            given = [
                name for name, on in (("--workers", self.workers != 1), ("--shards", self.shards is not None)) if on
            ]
            given += ["--gpus-per-worker"] if self.gpus_per_worker else []
            given += ["--cpus-per-worker"] if self.cpus_per_worker != 1.0 else []
            if given:
                raise ConfigError(f"{', '.join(given)} go with --ray (dsdkit match ... --ray local --workers N)")
        elif self.shard is not None:
            raise ConfigError(
                "--shard is for one worker of a planned job; --ray schedules every shard itself: drop it"
            )

    def ray_options(self, engine: EngineSpec) -> RayOptions:
        from ..jobs.ray_runner import RayOptions

        return RayOptions(
            address=self.ray,
            workers=self.workers,
            gpus_per_worker=self.gpus_per_worker,
            cpus_per_worker=self.cpus_per_worker,
            threads=engine.threads,
            device=None if engine.device == "auto" else engine.device,
        )


_SCALE = {
    "job": Declared(
        Annotated[
            Path | None,
            option(
                "--job",
                help="Score one shard of a job made by dsdkit plan (with --shard; every other option is the job's).",
                panel=SCALE_PANEL,
            ),
        ]
    ),
    "shard": Declared(
        Annotated[
            str | None,
            option(
                "--shard",
                help="With --job: i/N (0-based), or auto (Slurm array task, else RANK of WORLD_SIZE). A finished "
                "shard is skipped.",
                panel=SCALE_PANEL,
            ),
        ]
    ),
    "ray": Declared(
        Annotated[
            str | None,
            option(
                "--ray",
                help="Run on Ray Data: local (a cluster on this machine) or a cluster address (auto, HOST:PORT, "
                "ray://HOST:10001). Plans a sharded job in --job (default: OUTPUT.job/), scores the shards not done "
                "on --workers actors and merges them into -o; rerun the same command to continue after a failure.",
                panel=SCALE_PANEL,
            ),
        ]
    ),
    "workers": Declared(
        Annotated[int, option("--workers", min=1, help="With --ray: actors in the pool.", panel=SCALE_PANEL)], 1
    ),
    "gpus_per_worker": Declared(
        Annotated[
            float,
            option(
                "--gpus-per-worker",
                min=0,
                help="With --ray: GPUs each worker reserves (0: CPU workers).",
                panel=SCALE_PANEL,
            ),
        ],
        0.0,
    ),
    "cpus_per_worker": Declared(
        Annotated[
            float,
            option(
                "--cpus-per-worker",
                help="With --ray: CPUs each worker reserves; also its threads unless --threads.",
                panel=SCALE_PANEL,
            ),
        ],
        1.0,
    ),
    "shards": Declared(
        Annotated[
            int | None,
            option(
                "--shards",
                min=1,
                help="With --ray: shards to plan (default: 4 per worker, at most one per chunk).",
                panel=SCALE_PANEL,
            ),
        ]
    ),
}

#: What `match --job` takes from the command line: where it runs. Everything else is the job's (its manifest).
_WORKER_OPTIONS = frozenset({"job", "shard", "device", "threads"})


# -- the arguments ------------------------------------------------------------------------------------------------


def _holds_images(path: Path) -> bool:
    """Whether ``path`` looks like an IMAGES argument: a folder, an image file, or a list whose first lines name
    image files."""
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096).splitlines()[:5]
    except OSError:
        return False
    lines = [line.strip() for line in head if line.strip() and not line.startswith("#")]
    return bool(lines) and all(Path(line).suffix.lower() in IMAGE_SUFFIXES for line in lines)


def check_argument_order(images: Path, captions: Path, name: str) -> None:
    """Refuse IMAGES and CAPTIONS given the other way round, saying so: otherwise the captions file is read as an
    image list, and the error speaks of image paths that do not exist."""
    if _holds_images(captions) and not _holds_images(images):
        raise ConfigError(
            f"IMAGES and CAPTIONS look swapped: {captions} holds images and {images} does not; the images come "
            f"first: dsdkit {name} {captions} {images} ..."
        )


def _inputs(images: Path | None, captions: Path | None) -> tuple[Path, Path]:
    if images is None or captions is None:
        raise ConfigError("match needs IMAGES and CAPTIONS (or --job JOB --shard i/N for a shard of a planned job)")
    check_argument_order(images, captions, "match")
    return images, captions


def _refuse_job_options(ctx: typer.Context, job: Path, allowed: frozenset[str], worker_options: str) -> None:
    """Refuse every option given on the command line that a planned job fixes (its manifest holds them)."""
    given = [
        param
        for param in ctx.command.params
        if param.name not in allowed
        # By name: typer may bring its own copy of click, whose ParameterSource is not click's.
        and getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"
    ]
    if given:
        names = ", ".join(param.opts[0] if param.opts[0].startswith("-") else param.name.upper() for param in given)
        raise ConfigError(
            f"{names}: match --job takes its inputs and options from {job / 'job.json'} (only {worker_options}, "
            "--device and --threads are the worker's); plan a new job with dsdkit plan to change them"
        )


# -- match --------------------------------------------------------------------------------------------------------


@command(app, "match", "Score every image against every caption.")
@match_options()
@engine_options()
@option_group("scale", _SCALE, ScaleOut)
def match_command(
    ctx: typer.Context,
    images: ImagesArgument = None,
    captions: CaptionsArgument = None,
    *,
    options: MatchOptions,
    engine: EngineSpec,
    scale: ScaleOut,
    dry_run: Annotated[
        bool,
        option(
            "--dry-run", help="Print pairs, UNet evaluations and an estimated time; score nothing.", panel=IO_PANEL
        ),
    ] = False,
) -> None:
    """Score every image against every caption and show the best caption per image.

    Unusable images (unreadable, corrupt, truncated, over the pixel limit) and blank caption lines are skipped with
    a one-line reason and listed in <output stem>.skipped.json; --strict makes them an error instead.
    """
    if scale.ray is None and (scale.job is not None or scale.shard is not None):
        return _score_shard(ctx, scale, engine)
    if scale.ray is not None and scale.job is not None and images is None and captions is None:
        return _score_job_on_ray(ctx, scale, engine, options.output)
    images, captions = _inputs(images, captions)
    if dry_run:
        return _dry_run(images, captions, engine, options)
    prepare_output(options.output, "--output")
    if scale.ray is not None:
        return _match_on_ray(images, captions, engine, options, scale)
    return _match_here(images, captions, engine, options)


def _match_here(images: Path, captions: Path, engine: EngineSpec, options: MatchOptions) -> None:
    from ..jobs.match import match

    with ProgressBar() as progress:
        result = match(images, captions, engine, options, progress=progress)
    print_summary(result)
    if options.output is not None:
        say(_wrote_line(result, options.output))


def _wrote_line(result: MatchResult, output: str) -> str:
    from ..jobs.match import skipped_report_path

    line = f"wrote {len(result.images)} x {len(result.captions)} scores to {output}"
    if result.meta.get("skipped_report"):  # written only when it has something in it
        skipped, warned = result.meta["skipped"], len(result.meta.get("image_warnings", []))
        line += (
            f" ({len(skipped['images'])} images and {len(skipped['caption_lines'])} caption lines skipped, "
            f"{len(result.meta.get('truncated_captions', {}))} captions truncated"
            + (f", {warned} images with decoder warnings" if warned else "")
            + f": {skipped_report_path(output)})"
        )
    return line


def _dry_run(images: Path, captions: Path, engine: EngineSpec, options: MatchOptions) -> None:
    from ..jobs.dry_run import estimate_match

    # The estimate ranks per image (a ranking per caption costs the same evaluations) and never resumes.
    adaptive = options.adaptive if options.per == "image" else None
    plan = estimate_match(images, captions, engine, options.replace(adaptive=adaptive, per="image", resume=False))
    typer.echo(_format_plan(plan))


def _format_plan(plan: dict) -> str:
    def clock(seconds: float) -> str:
        seconds = int(round(seconds))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    t = plan["calibration"]
    skipped = f" ({plan['skipped_images']} unusable images skipped)" if plan.get("skipped_images") else ""
    adaptive = (
        f" (adaptive {plan['adaptive']}; exhaustive: {plan['exhaustive_unet_evaluations']:,})"
        if "adaptive" in plan
        else ""
    )
    return "\n".join(
        [
            f"job        {plan['images']} images x {plan['captions']} captions = {plan['pairs']:,} pairs, "
            f"S = {plan['timesteps']} timesteps{skipped}",
            f"work       {plan['unet_evaluations']:,} UNet evaluations in batches of {plan['batch_size']}{adaptive}",
            f"calibrated {plan['engine']}: {t['batch_s']:.3g} s per batch, {t['image_s']:.3g} s per image encoding, "
            f"{t['caption_s']:.3g} s per caption encoding",
            f"estimate   {clock(plan['estimated_seconds'])} (h:mm:ss) for the whole job",
        ]
    )


def _score_shard(ctx: typer.Context, scale: ScaleOut, engine: EngineSpec) -> None:
    """``match --job JOB --shard i/N|auto``: refuse every option the job fixes, then score the shard."""
    if scale.job is None or scale.shard is None:
        raise ConfigError("--job and --shard go together: dsdkit match --job JOB --shard i/N (or --shard auto)")
    _refuse_job_options(ctx, scale.job, _WORKER_OPTIONS, "--shard")
    from ..jobs.shards import run_shard

    with ProgressBar() as progress:
        report = run_shard(scale.job, scale.shard, device=engine.device, progress=progress)
    marker, label = report.marker, f"shard {report.index}/{report.num_shards} of {scale.job}"
    if report.already_done:
        say(f"{label} was already done ({marker['rows']} rows in {report.part}); nothing to do")
        return
    skipped = len(marker["skipped"])
    say(
        f"{label}: wrote {marker['rows']} rows to {report.part} ({marker['unet_evaluations']:,} UNet evaluations"
        + (f", {skipped} images skipped" if skipped else "")
        + ")"
    )


def _score_job_on_ray(ctx: typer.Context, scale: ScaleOut, engine: EngineSpec, output: str | None) -> None:
    """``match --job JOB --ray ADDRESS``: score a planned job's shards on Ray, then merge them into -o (if given)."""
    allowed = _WORKER_OPTIONS | {"output", "ray", "workers", "gpus_per_worker", "cpus_per_worker"}
    _refuse_job_options(ctx, scale.job, allowed, "--ray, --workers, --gpus-per-worker, --cpus-per-worker, -o")
    from ..jobs.ray_runner import run_job_on_ray
    from ..jobs.shards import merge_job

    prepare_output(output, "--output")
    report = run_job_on_ray(scale.job, scale.ray_options(engine))
    if output is not None:
        print_summary(merge_job(scale.job, output))
    _say_ray_report(report, output)


def _match_on_ray(images: Path, captions: Path, engine: EngineSpec, options: MatchOptions, scale: ScaleOut) -> None:
    refused = [name for name, given in (("--resume", options.resume), ("--per-layer", options.per_layer)) if given]
    if refused:
        raise ConfigError(
            f"{', '.join(refused)}: not with --ray (its shards resume by themselves; rerun the same command)"
        )
    from ..jobs.ray_runner import match_on_ray

    result, report = match_on_ray(
        images,
        captions,
        options.output,
        job=scale.job,
        shards=scale.shards,
        options=scale.ray_options(engine),
        engine=engine,
        match_options=options,
    )
    if result is not None:
        print_summary(result)
    _say_ray_report(report, options.output)


def _say_ray_report(report, output: str | None) -> None:
    ran = [s for s in report.shards if not s["already_done"]]
    rows = sum(s["rows"] for s in ran)
    evaluations = sum(s["unet_evaluations"] for s in ran)
    restarted = sum(1 for w in report.workers if w["restarted"])
    line = (
        f"Ray: {len(ran)} shard(s) of {report.job} scored on {report.used_workers} worker(s) in "
        f"{report.seconds:.1f} s ({rows} rows, {evaluations:,} UNet evaluations"
        + (f", {restarted} worker(s) restarted" if restarted else "")
        + f"); {len(report.already_done)} were done before"
    )
    after = f"merged into {output}" if output is not None else f"merge with dsdkit merge {report.job} -o RESULT"
    say(f"{line}; {after}")


# -- plan and merge -----------------------------------------------------------------------------------------------


@command(app, "plan", "Plan a sharded match job for workers anywhere.")
@match_options(
    only=(
        "top_k",
        "strict",
        "adaptive",
        "adaptive_schedule",
        "adaptive_per",
        "pairs",
        "shortlist",
        "shortlist_k",
        "shortlist_fuse",
    )
)
@engine_options()
def plan_command(
    images: Annotated[
        Path, argument("IMAGES", help="A folder of images, or a text file with one image path per line.")
    ],
    captions: Annotated[Path, argument("CAPTIONS", help="A text file with one caption per line (UTF-8).")],
    *,
    shards: Annotated[
        int,
        option(
            "--shards", min=1, help="How many shards (each whole chunks of --chunk-size images).", panel=SCALE_PANEL
        ),
    ],
    out: Annotated[
        Path,
        option(
            "--out",
            help="The job folder to write (job.json; scores/ as shards finish). " + CREATES_FOLDERS,
            panel=IO_PANEL,
        ),
    ],
    content_hash: Annotated[
        bool,
        option(
            "--content-hash",
            help="Fingerprint the inputs by their bytes (sha256) instead of sizes and modification times.",
            panel=IO_PANEL,
        ),
    ] = False,
    options: MatchOptions,
    engine: EngineSpec,
) -> None:
    """Plan a sharded match job: write JOB/job.json (inputs, their fingerprint, the model or bundle, the scoring
    options, shard ranges). Then run `dsdkit match --job JOB --shard i/N` per shard, anywhere, and `dsdkit merge`.

    --device is where the model is opened to record its identity; each worker picks its own --device and --threads.
    """
    from ..jobs.shards import plan_job

    check_argument_order(images, captions, "plan")
    prepare_output(out, "--out")
    manifest = plan_job(
        images, captions, out, shards, engine.replace(threads=None), options, content_hash=content_hash
    )
    sizes = sorted({stop - start for start, stop in manifest.shards})
    sized = "-".join(str(s) for s in (sizes[0], sizes[-1]) if s) if len(sizes) > 1 else sizes[0]
    say(
        f"planned {out}: {len(manifest.images)} images x {len(manifest.captions)} captions in {manifest.num_shards} "
        f"shard(s) of {sized} images; run dsdkit match --job {out} --shard i/{manifest.num_shards} "
        f"(i = 0..{manifest.num_shards - 1}, or --shard auto in a Slurm array), then dsdkit merge {out} -o RESULT"
    )


@command(app, "merge", "Merge a planned job's shards into one result.")
def merge_command(
    job: Annotated[Path, argument("JOB", help="A job folder from dsdkit plan whose shards are all done.")],
    output: Annotated[
        Path,
        option(
            "--output",
            "-o",
            help="Result file: .parquet (a row per pair), .csv (matrix), .json or .jsonl (matrix + top-k). "
            + CREATES_FOLDERS,
            panel=IO_PANEL,
        ),
    ],
    top_k: Annotated[
        int | None,
        option("--top-k", min=1, help="Length of the JSON top-k lists (default: the job's --top-k).", panel=IO_PANEL),
    ] = None,
) -> None:
    """Merge a job's shards into one result (refused while shards are missing; top-k per caption is across
    shards)."""
    from ..jobs.shards import merge_job

    prepare_output(output, "--output")
    result = merge_job(job, output, top_k=top_k)
    line = f"merged {result.meta['job']['shards']} shard(s) of {job}: {len(result.images)} x {len(result.captions)} "
    line += f"scores to {output}"
    if result.meta.get("skipped_report"):
        from ..jobs.match import skipped_report_path

        line += f" (skipped and truncated inputs: {skipped_report_path(output)})"
    say(line)
