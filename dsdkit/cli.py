"""The `dsdkit` command: a thin typer layer over the library functions.

Each command parses its options, builds a config and calls one library function. Heavy imports (torch, diffusers)
happen inside the commands, so `dsdkit --help` is instant. User errors print one line and exit with the code of
their class (see :data:`dsdkit.errors.EXIT_CODES`); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

# The config module and its enums are light (no torch), so the CLI's choices are the library's own enums.
from .acceleration import COMPILE_MODES
from .config import (
    PRESETS,
    HeadWeighting,
    LayerSet,
    Normalization,
    Pooling,
    ResizeMode,
    ScoringConfig,
    TimestepSchedule,
    TokenSet,
    resolve_scoring,
)
from .errors import ConfigError
from .models import Precision
from .runtime.bundle import Bundle
from .runtime.errors import EXIT_CODES, DsdkitError, Interrupted, missing_dependency
from .runtime.files import atomic_write_text
from .runtime.threads import configure_threads, use_passive_waiting

app = typer.Typer(
    name="dsdkit",
    help="Discriminative Stable Diffusion image-text matching: score, train, export, run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
logger = logging.getLogger("dsdkit")


class _State:
    debug = False
    quiet = False


def _say(text: str) -> None:
    """Print a command's report on stdout, unless ``-q`` asked for errors only."""
    if not _State.quiet:
        typer.echo(text)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = (
        logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("dsdkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Upstream libraries are noisy at INFO (loading bars, hints); show their warnings only when asked for detail.
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose > 1 else logging.ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsdkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _State.debug = debug
    _State.quiet = quiet
    _configure_logging(verbose, quiet)
    # Before any command imports torch: libgomp reads its wait policy once, when it loads (runtime/threads.py).
    use_passive_waiting()


def cli_errors(command):
    """Turn dsdkit errors into one line on stderr and the documented exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DsdkitError as exc:
            if _State.debug:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            if _State.debug:
                raise
            if isinstance(exc, Interrupted):  # a job that kept its finished chunks says how to continue
                typer.echo(f"{exc}; continue with: {_resume_command()}" if exc.resumable else str(exc), err=True)
            else:
                typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else is our bug; say so in one line
            if _State.debug:
                raise
            missing = missing_dependency(exc)
            if missing is not None:  # an extra the user did not install is not our bug
                typer.echo(f"error: {missing}", err=True)
                raise typer.Exit(missing.exit_code) from None
            typer.echo(
                f"internal error: {type(exc).__name__}: {exc} "
                "(a dsdkit bug: rerun with --debug and report the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def _resume_command() -> str:
    """The command line that continues this interrupted run: the same arguments with ``--resume``."""
    import shlex

    arguments = sys.argv[1:]
    return shlex.join(["dsdkit", *arguments, *([] if "--resume" in arguments else ["--resume"])])


# -- option types ---------------------------------------------------------------------------------------------


PresetName = Enum("PresetName", {name: name for name in PRESETS}, type=str)


# torch.compile modes of the PyTorch scorer (dsdkit.acceleration imports no torch at module level).
CompileMode = Enum("CompileMode", {mode.replace("-", "_"): mode for mode in COMPILE_MODES}, type=str)
CompileOption = Annotated[
    CompileMode | None,
    typer.Option(
        "--compile",
        help="PyTorch scorer: torch.compile the scoring UNet in this mode (--compile alone: auto, CUDA graphs on "
        "a GPU) with channels-last weights; the first batch compiles (minutes).",
    ),
]

# Every command that computes takes --threads and calls _use_threads first, before it imports torch.
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for torch and ONNX Runtime (default: OMP_NUM_THREADS, else the CPUs this process may "
        "use: its affinity and cgroup quota). Lower it when other work shares the CPUs.",
    ),
]


def _use_threads(threads: int | None) -> int:
    """Apply --threads (and passive waiting) for the command; a count below 1 is a one-line ConfigError."""
    return configure_threads(threads)


class TinySize(str, Enum):
    micro = "micro"
    tiny = "tiny"
    full = "full"


def _value(option):
    return option.value if isinstance(option, Enum) else option


# -- commands -------------------------------------------------------------------------------------------------


@app.command("tiny-model")
@cli_errors
def tiny_model(
    folder: Annotated[Path, typer.Argument(help="Where to write the model folder (must be new or empty).")],
    size: Annotated[
        TinySize, typer.Option(help="micro / tiny: seconds, ~20-50 MB; full: SD2-2.1-base size, ~5 GB.")
    ] = TinySize.tiny,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a folder made earlier by tiny-model.")] = False,
) -> None:
    """Write a random-weight model with SD2's architecture, for trying dsdkit offline. Its scores are meaningless."""
    from .tiny import write_tiny_model

    write_tiny_model(folder, size=size.value, seed=seed, overwrite=overwrite)
    _say(f"wrote {size.value} random-weight SD2-architecture model to {folder} (for testing: scores are meaningless)")


@app.command("tiny-data")
@cli_errors
def tiny_data(
    folder: Annotated[Path, typer.Argument(help="Where to write images/ and data.jsonl.")],
    train: Annotated[int, typer.Option(min=1, help="Training examples.")] = 256,
    test: Annotated[int, typer.Option(min=1, help="Held-out examples.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the generated images.")] = 0,
) -> None:
    """Write a synthetic task (coloured shapes vs. colour captions) for trying training offline."""
    from .world import write_colour_shapes

    path = write_colour_shapes(folder, train=train, test=test, seed=seed)
    _say(f"wrote {path} ({train} train + {test} test examples: which of 4 colour captions fits each shape)")


@app.command("demo-data")
@cli_errors
def demo_data(
    folder: Annotated[Path, typer.Argument(help="Where to write the demo world's files.")],
    items: Annotated[int, typer.Option(min=1, help="Benchmark items per subset.")] = 200,
    shots: Annotated[int, typer.Option(help="Few-shot training items per few-shot subset.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the generated scenes.")] = 0,
) -> None:
    """Write demo-world files for --model demo: example images and captions (match), benchmark.jsonl (eval),
    fewshot.jsonl (train)."""
    from .world import BENCHMARK_SUBSETS, write_demo_data

    paths = write_demo_data(folder, per_subset=items, shots=shots, seed=seed)
    _say(
        f"wrote {paths['examples']}/ and {paths['captions']} (dsdkit match), {paths['benchmark']} "
        f"({items} items x {len(BENCHMARK_SUBSETS)} subsets, dsdkit eval) and {paths['fewshot']} (dsdkit train)"
    )


world_app = typer.Typer(
    help="The demo world model: train it (the recipe of the shipped --model demo).", no_args_is_help=True
)
app.add_typer(world_app, name="world")


@world_app.command("train")
@cli_errors
def world_train(
    output: Annotated[Path, typer.Argument(help="Run folder (checkpoints); the model is written to OUTPUT/model.")],
    steps: Annotated[int | None, typer.Option(help="UNet + text encoder steps; default: the recipe's.")] = None,
    vae_steps: Annotated[int | None, typer.Option(help="VAE steps; default: the recipe's.")] = None,
    scenes: Annotated[int | None, typer.Option(help="Training scenes; default: the recipe's.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Diffusion batch size; default: the recipe's.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed; default: the recipe's.")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Steps between checkpoints; default: the recipe's.")
    ] = None,
    threads: ThreadsOption = None,
    recipe_file: Annotated[
        Path | None, typer.Option("--recipe", help="A recipe JSON (fields of WorldRecipe); options override it.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUTPUT from its latest checkpoint.")] = False,
    eval_items: Annotated[
        int, typer.Option(help="Benchmark items per subset for the accuracy written beside the model (0: skip).")
    ] = 100,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Continue a trained world model (a folder or `demo`): its weights are the start, the VAE phase "
            "is skipped, and --steps are further diffusion steps. The recipe must be its architecture."
        ),
    ] = None,
) -> None:
    """Train the demo world model (VAE; optionally a contrastive text tower; then UNet + text encoder, or the UNet
    alone with the text encoder frozen) into a plain SD2 diffusers folder, or continue one (--init-from)."""
    threads = _use_threads(threads)  # before torch loads; the count is recorded with the checkpoints
    from .train.world import WorldRecipe, measure_world_model, train_world_model

    overrides = {
        "steps": steps,
        "vae_steps": vae_steps,
        "scenes": scenes,
        "batch_size": batch_size,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
    }
    if recipe_file is None and resume and (output / "recipe.json").is_file():
        recipe_file = output / "recipe.json"  # a resumed run keeps its own recipe unless told otherwise
    base = WorldRecipe() if recipe_file is None else WorldRecipe.from_file(recipe_file)
    recipe = WorldRecipe.from_dict({**base.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})

    def evaluate(folder: Path) -> dict:
        return measure_world_model(folder, per_subset=eval_items)

    with _phase_progress() as on_step:
        folder = train_world_model(
            output,
            recipe,
            resume=resume,
            threads=threads,
            evaluate=evaluate if eval_items > 0 else None,
            on_step=on_step,
            init_from=init_from,
        )
    _say(f"wrote the world model to {folder} (load it with --model {folder})")


# -- the options of match and plan (one declaration each, so the two commands cannot drift apart) ---------------

ModelOption = Annotated[
    str | None,
    typer.Option(help="Diffusers SD2 folder or hub id. Default: stabilityai/stable-diffusion-2-1-base."),
]
PresetOption = Annotated[
    PresetName | None,
    typer.Option(help="Scoring preset (discffusion or paper). Default: the adapter's, else discffusion."),
]
TimestepsOption = Annotated[int | None, typer.Option(help="S for the discffusion timestep table (default 30).")]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="UNet batch size (scores do not depend on it).")]
TopKOption = Annotated[
    int,
    typer.Option(
        min=1, help="Best captions per image / images per caption in JSON outputs; with --adaptive, kept exact."
    ),
]
AdaptiveOption = Annotated[
    bool,
    typer.Option(
        help="Rank by successive elimination: the --top-k best get exact scores for a fraction of the "
        "evaluations (README: Adaptive ranking)."
    ),
]
AdaptiveScheduleOption = Annotated[
    str | None,
    typer.Option(
        help="Elimination stages, e.g. keep=8,3,1:steps=2,6,all or keep=50%,25%,k:steps=1,4,all "
        "(implies --adaptive; default: the measured default)."
    ),
]
AdaptivePerOption = Annotated[
    str,
    typer.Option(
        help="What ranks with --adaptive: image (its captions) or caption (its images; use --normalize uncond)."
    ),
]
PairsOption = Annotated[
    Path | None,
    typer.Option(
        help="Score only the pairs listed in this .csv / .jsonl / .json (image and caption by index, name or "
        "text); with --adaptive each image ranks its listed captions."
    ),
]
AdaptersOption = Annotated[Path | None, typer.Option(help="Adapter file from `dsdkit train` (default: zero-shot).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DtypeOption = Annotated[Precision, typer.Option(help="UNet precision; scores are pooled in fp32.")]
PoolingOption = Annotated[Pooling | None, typer.Option(help="Override the preset's pooling.")]
LambdaOption = Annotated[float | None, typer.Option("--lambda", help="LogSumExp temperature λ.")]
TokensOption = Annotated[TokenSet | None, typer.Option(help="Which text positions are pooled.")]
LayersOption = Annotated[LayerSet | None, typer.Option(help="Which cross-attention layers are scored.")]
HeadsOption = Annotated[HeadWeighting | None, typer.Option(help="Head weighting.")]
ScheduleOption = Annotated[TimestepSchedule | None, typer.Option(help="Timestep schedule.")]
NoiseLevelsOption = Annotated[
    str | None, typer.Option(help="Comma-separated noise levels for --schedule noise-levels, e.g. 0.2,0.4.")
]
DenoiseOption = Annotated[
    bool | None, typer.Option("--denoise/--no-denoise", help="Add the denoising term (discffusion default: on).")
]
UncondInAttentionOption = Annotated[
    bool | None,
    typer.Option("--uncond-in-attention/--no-uncond-in-attention", help="Mix empty-caption rows in (authors' B3)."),
]
NormalizeOption = Annotated[
    Normalization | None, typer.Option(help="uncond: subtract the empty caption's score (for ranking images).")
]
ResizeOption = Annotated[ResizeMode | None, typer.Option(help="squash (default) or center-crop.")]
ResolutionOption = Annotated[int | None, typer.Option(help="Image size fed to the VAE; default: the model's.")]
SeedOption = Annotated[int | None, typer.Option(help="Seed of the fixed noise bank.")]
BundleOption = Annotated[
    Path | None, typer.Option(help="Score with an exported bundle (torch-free runtime) instead of --model.")
]
BackendOption = Annotated[str, typer.Option(help="Bundle backend: auto, onnxruntime or tensorrt.")]
ChunkSizeOption = Annotated[
    int, typer.Option(min=1, help="Images per chunk (memory stays flat; the unit of --resume and of shards).")
]
StrictOption = Annotated[
    bool, typer.Option(help="Fail on the first unusable image or blank caption line instead of skipping it.")
]


def _scoring_config(
    bundle: Path | None,
    model: str | None,
    adapters: Path | None,
    dtype: Precision,
    preset: PresetName | None,
    timesteps: int | None,
    knobs: dict[str, tuple[str, object]],
) -> ScoringConfig | None:
    """The job's scoring config from match / plan options (``None`` for a bundle, whose config is fixed), refusing
    knobs that a bundle cannot take. ``knobs``: option name -> (scoring field, value) of the knob options."""
    given = ["--preset"] if preset is not None else []
    given += [name for name, (_, value) in knobs.items() if value is not None]
    given += [
        name
        for name, value in {
            "--adapters": adapters,
            "--model": model,
            "--dtype": None if dtype is Precision.fp32 else dtype,
        }.items()
        if value is not None
    ]
    if bundle is not None and given:
        raise ConfigError(
            f"{', '.join(given)}: a bundle fixes the model, adapter and scoring config at export "
            "(only --timesteps can change); re-export with `dsdkit export` to change them"
        )
    if bundle is not None:
        return None
    overrides = {field: _value(value) for field, value in knobs.values()}
    raw_levels = overrides.get("noise_levels")
    if raw_levels is not None:
        try:
            overrides["noise_levels"] = tuple(float(v) for v in raw_levels.split(",") if v.strip())
        except ValueError:
            raise ConfigError(
                f"--noise-levels {raw_levels!r}: expected comma-separated numbers like 0.2,0.4"
            ) from None
    from .adapters import read_adapter_header

    # Explicit knobs over the adapter's header over the preset (the one rule every command uses).
    return resolve_scoring(
        _value(preset),
        read_adapter_header(adapters)["scoring"] if adapters is not None else None,
        dict(num_timesteps=timesteps, **overrides),
        source=str(adapters),
    )


def _knobs(
    pooling: Pooling | None,
    lse_lambda: float | None,
    tokens: TokenSet | None,
    layers: LayerSet | None,
    heads: HeadWeighting | None,
    schedule: TimestepSchedule | None,
    noise_levels: str | None,
    denoise: bool | None,
    uncond_in_attention: bool | None,
    normalize: Normalization | None,
    resize: ResizeMode | None,
    resolution: int | None,
    seed: int | None,
) -> dict[str, tuple[str, object]]:
    """The knob options of match and plan: option name -> (scoring-config field, value given or ``None``)."""
    return {
        "--pooling": ("pooling", pooling),
        "--lambda": ("lse_lambda", lse_lambda),
        "--tokens": ("tokens", tokens),
        "--layers": ("layers", layers),
        "--heads": ("heads", heads),
        "--schedule": ("timesteps", schedule),
        "--noise-levels": ("noise_levels", noise_levels),
        "--denoise/--no-denoise": ("denoise_term", denoise),
        "--uncond-in-attention": ("uncond_in_attention", uncond_in_attention),
        "--normalize": ("normalize", normalize),
        "--resize": ("resize", resize),
        "--resolution": ("resolution", resolution),
        "--seed": ("noise_seed", seed),
    }


#: What `match --job` takes from the command line: where it runs. Everything else is the job's (its manifest).
_WORKER_OPTIONS = frozenset({"job", "shard", "device", "threads"})


@app.command("match")
@cli_errors
def match_command(
    ctx: typer.Context,
    images: Annotated[
        Path | None,
        typer.Argument(help="A folder of images, or a text file with one image path per line (not with --job)."),
    ] = None,
    captions: Annotated[
        Path | None, typer.Argument(help="A text file with one caption per line (UTF-8; not with --job).")
    ] = None,
    model: ModelOption = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Result file: .csv (matrix), .json or .jsonl (matrix + top-k), .parquet (a row per pair).",
        ),
    ] = None,
    preset: PresetOption = None,
    timesteps: TimestepsOption = None,
    batch_size: BatchSizeOption = 8,
    top_k: TopKOption = 5,
    per_layer: Annotated[
        bool, typer.Option(help="Also write each scored layer's attention term (JSON outputs).")
    ] = False,
    adaptive: AdaptiveOption = False,
    adaptive_schedule: AdaptiveScheduleOption = None,
    adaptive_per: AdaptivePerOption = "image",
    pairs: PairsOption = None,
    adapters: AdaptersOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = Precision.fp32,
    pooling: PoolingOption = None,
    lse_lambda: LambdaOption = None,
    tokens: TokensOption = None,
    layers: LayersOption = None,
    heads: HeadsOption = None,
    schedule: ScheduleOption = None,
    noise_levels: NoiseLevelsOption = None,
    denoise: DenoiseOption = None,
    uncond_in_attention: UncondInAttentionOption = None,
    normalize: NormalizeOption = None,
    resize: ResizeOption = None,
    resolution: ResolutionOption = None,
    seed: SeedOption = None,
    bundle: BundleOption = None,
    backend: BackendOption = "auto",
    chunk_size: ChunkSizeOption = 64,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from <output>.partial/.")] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Print pairs, UNet evaluations and an estimated time; score nothing.")
    ] = False,
    strict: StrictOption = False,
    compile: CompileOption = None,
    threads: ThreadsOption = None,
    job: Annotated[
        Path | None,
        typer.Option(
            help="Score one shard of a job made by `dsdkit plan` (with --shard; every other option is the job's)."
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="With --job: i/N (0-based), or auto (Slurm array task, else RANK of WORLD_SIZE). A finished shard "
            "is skipped."
        ),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on Ray Data: local (a cluster on this machine) or a cluster address (auto, HOST:PORT, "
            "ray://HOST:10001). Plans a sharded job in --job (default: OUTPUT.job/), scores the shards not done on "
            "--workers actors and merges them into -o; rerun the same command to continue after a failure.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="With --ray: actors in the pool.")] = 1,
    gpus_per_worker: Annotated[
        float, typer.Option(min=0, help="With --ray: GPUs each worker reserves (0: CPU workers).")
    ] = 0.0,
    cpus_per_worker: Annotated[
        float, typer.Option(help="With --ray: CPUs each worker reserves; also its threads unless --threads.")
    ] = 1.0,
    shards: Annotated[
        int | None,
        typer.Option(min=1, help="With --ray: shards to plan (default: 4 per worker, at most one per chunk)."),
    ] = None,
) -> None:
    """Score every image against every caption and show the best caption per image.

    Unusable images (unreadable, corrupt, truncated, over the pixel limit) and blank caption lines are skipped with
    a one-line reason and listed in <output stem>.skipped.json; --strict makes them an error instead.
    """
    _use_threads(threads)
    if ray is None:
        ray_only = [name for name, value in (("--workers", workers != 1), ("--shards", shards is not None)) if value]
        ray_only += ["--gpus-per-worker"] if gpus_per_worker else []
        ray_only += ["--cpus-per-worker"] if cpus_per_worker != 1.0 else []
        if ray_only:
            raise ConfigError(f"{', '.join(ray_only)} go with --ray (dsdkit match ... --ray local --workers N)")
    if ray is None and (job is not None or shard is not None):
        _match_shard(ctx, job, shard, device)
        return
    if ray is not None and shard is not None:
        raise ConfigError("--shard is for one worker of a planned job; --ray schedules every shard itself: drop it")
    if ray is not None and images is None and captions is None and job is not None:
        _run_job_on_ray(ctx, job, output, ray, workers, gpus_per_worker, cpus_per_worker, threads, device)
        return
    if images is None or captions is None:
        raise ConfigError("match needs IMAGES and CAPTIONS (or --job JOB --shard i/N for a shard of a planned job)")
    from .matching import match

    config = _scoring_config(
        bundle,
        model,
        adapters,
        dtype,
        preset,
        timesteps,
        _knobs(
            pooling,
            lse_lambda,
            tokens,
            layers,
            heads,
            schedule,
            noise_levels,
            denoise,
            uncond_in_attention,
            normalize,
            resize,
            resolution,
            seed,
        ),
    )
    if dry_run:
        from .matching import plan_match

        plan = plan_match(
            images,
            captions,
            model=model,
            config=config,
            batch_size=batch_size,
            device=device,
            dtype=dtype.value,
            adapters=adapters,
            bundle=bundle,
            backend=backend,
            num_timesteps=timesteps if bundle is not None else None,
            compile=_value(compile),
            adaptive=_adaptive_schedule(adaptive, adaptive_schedule) if adaptive_per == "image" else None,
            top_k=top_k,
        )
        typer.echo(_format_plan(plan))
        return
    if ray is not None:
        refused = [name for name, value in (("--resume", resume), ("--per-layer", per_layer)) if value]
        if refused:
            raise ConfigError(
                f"{', '.join(refused)}: not with --ray (its shards resume by themselves; rerun the same command)"
            )
        from .ray_runner import RayOptions, match_on_ray

        options = RayOptions(
            address=ray,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            threads=threads,
            device=None if device == "auto" else device,
        )
        result, report = match_on_ray(
            images,
            captions,
            output,
            job=job,
            shards=shards,
            options=options,
            model=model,
            config=config,
            adapters=adapters,
            bundle=bundle,
            backend=backend,
            batch_size=batch_size,
            device=device,
            dtype=dtype.value if bundle is None else None,
            num_timesteps=timesteps if bundle is not None else None,
            chunk_size=chunk_size,
            compile=_value(compile),
            top_k=top_k,
            adaptive=_adaptive_schedule(adaptive, adaptive_schedule),
            per=adaptive_per,
            pairs=pairs,
            strict=strict,
        )
        if result is not None:
            _print_summary(result)
        _say_ray_report(report, output)
        return
    with _progress_bar() as progress:
        result = match(
            images,
            captions,
            model=model,
            config=config,
            output=output,
            top_k=top_k,
            batch_size=batch_size,
            device=device,
            dtype=dtype.value,
            progress=progress,
            per_layer=per_layer,
            adapters=adapters,
            bundle=bundle,
            backend=backend,
            num_timesteps=timesteps if bundle is not None else None,
            chunk_size=chunk_size,
            resume=resume,
            strict=strict,
            compile=_value(compile),
            adaptive=_adaptive_schedule(adaptive, adaptive_schedule),
            per=adaptive_per,
            pairs=pairs,
        )
    _print_summary(result)
    if output is not None:
        from .matching import skipped_report_path

        skipped = result.meta["skipped"]
        line = f"wrote {len(result.images)} x {len(result.captions)} scores to {output}"
        if result.meta.get("skipped_report"):  # written only when it has something in it
            warned = len(result.meta.get("image_warnings", []))
            line += (
                f" ({len(skipped['images'])} images and {len(skipped['caption_lines'])} caption lines skipped, "
                f"{len(result.meta.get('truncated_captions', {}))} captions truncated"
                + (f", {warned} images with decoder warnings" if warned else "")
                + f": {skipped_report_path(output)})"
            )
        _say(line)


def _run_job_on_ray(
    ctx: typer.Context,
    job: Path,
    output: Path | None,
    address: str,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    threads: int | None,
    device: str,
) -> None:
    """`match --job JOB --ray ADDRESS`: score a planned job's shards on Ray, then merge them into -o (if given)."""
    allowed = _WORKER_OPTIONS | {"output", "ray", "workers", "gpus_per_worker", "cpus_per_worker"}
    _refuse_job_options(ctx, job, allowed, "--ray, --workers, --gpus-per-worker, --cpus-per-worker, -o")
    from .ray_runner import RayOptions, run_job_on_ray
    from .shards import merge_job

    options = RayOptions(
        address=address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        threads=threads,
        device=None if device == "auto" else device,
    )
    report = run_job_on_ray(job, options)
    if output is not None:
        result = merge_job(job, output)
        _print_summary(result)
    _say_ray_report(report, output)


def _say_ray_report(report, output: Path | None) -> None:
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
    _say(f"{line}; {after}")


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


def _match_shard(ctx: typer.Context, job: Path | None, shard: str | None, device: str) -> None:
    """`match --job JOB --shard i/N|auto`: refuse every option the job fixes, then score the shard."""
    if job is None or shard is None:
        raise ConfigError("--job and --shard go together: dsdkit match --job JOB --shard i/N (or --shard auto)")
    _refuse_job_options(ctx, job, _WORKER_OPTIONS, "--shard")
    from .shards import run_shard

    with _progress_bar() as progress:
        report = run_shard(job, shard, device=device, progress=progress)
    marker = report.marker
    label = f"shard {report.index}/{report.num_shards} of {job}"
    if report.already_done:
        _say(f"{label} was already done ({marker['rows']} rows in {report.part}); nothing to do")
        return
    skipped = len(marker["skipped"])
    _say(
        f"{label}: wrote {marker['rows']} rows to {report.part} ({marker['unet_evaluations']:,} UNet evaluations"
        + (f", {skipped} images skipped" if skipped else "")
        + ")"
    )


@app.command("plan")
@cli_errors
def plan_command(
    images: Annotated[Path, typer.Argument(help="A folder of images, or a text file with one image path per line.")],
    captions: Annotated[Path, typer.Argument(help="A text file with one caption per line (UTF-8).")],
    shards: Annotated[int, typer.Option(min=1, help="How many shards (each whole chunks of --chunk-size images).")],
    out: Annotated[Path, typer.Option("--out", help="The job folder to write (job.json; scores/ as shards finish).")],
    content_hash: Annotated[
        bool,
        typer.Option(help="Fingerprint the inputs by their bytes (sha256) instead of sizes and modification times."),
    ] = False,
    model: ModelOption = None,
    bundle: BundleOption = None,
    preset: PresetOption = None,
    timesteps: TimestepsOption = None,
    batch_size: BatchSizeOption = 8,
    top_k: TopKOption = 5,
    adaptive: AdaptiveOption = False,
    adaptive_schedule: AdaptiveScheduleOption = None,
    adaptive_per: AdaptivePerOption = "image",
    pairs: PairsOption = None,
    adapters: AdaptersOption = None,
    device: Annotated[str, typer.Option(help="Where the model is opened to record its identity: auto, cpu, ...")] = (
        "auto"
    ),
    dtype: DtypeOption = Precision.fp32,
    pooling: PoolingOption = None,
    lse_lambda: LambdaOption = None,
    tokens: TokensOption = None,
    layers: LayersOption = None,
    heads: HeadsOption = None,
    schedule: ScheduleOption = None,
    noise_levels: NoiseLevelsOption = None,
    denoise: DenoiseOption = None,
    uncond_in_attention: UncondInAttentionOption = None,
    normalize: NormalizeOption = None,
    resize: ResizeOption = None,
    resolution: ResolutionOption = None,
    seed: SeedOption = None,
    backend: BackendOption = "auto",
    chunk_size: ChunkSizeOption = 64,
    strict: StrictOption = False,
    compile: CompileOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Plan a sharded match job: write JOB/job.json (inputs, their fingerprint, the model or bundle, the scoring
    options, shard ranges). Then run `dsdkit match --job JOB --shard i/N` per shard, anywhere, and `dsdkit merge`."""
    _use_threads(threads)
    from .shards import plan_job

    config = _scoring_config(
        bundle,
        model,
        adapters,
        dtype,
        preset,
        timesteps,
        _knobs(
            pooling,
            lse_lambda,
            tokens,
            layers,
            heads,
            schedule,
            noise_levels,
            denoise,
            uncond_in_attention,
            normalize,
            resize,
            resolution,
            seed,
        ),
    )
    manifest = plan_job(
        images,
        captions,
        out,
        shards,
        model=model,
        config=config,
        adapters=adapters,
        bundle=bundle,
        backend=backend,
        batch_size=batch_size,
        device=device,
        dtype=dtype.value if bundle is None else None,
        num_timesteps=timesteps if bundle is not None else None,
        chunk_size=chunk_size,
        compile=_value(compile),
        top_k=top_k,
        adaptive=_adaptive_schedule(adaptive, adaptive_schedule),
        per=adaptive_per,
        pairs=pairs,
        strict=strict,
        content_hash=content_hash,
    )
    sizes = sorted({stop - start for start, stop in manifest.shards})
    _say(
        f"planned {out}: {len(manifest.images)} images x {len(manifest.captions)} captions in {manifest.num_shards} "
        f"shard(s) of {'-'.join(str(s) for s in (sizes[0], sizes[-1]) if s) if len(sizes) > 1 else sizes[0]} images; "
        f"run dsdkit match --job {out} --shard i/{manifest.num_shards} (i = 0..{manifest.num_shards - 1}, or "
        f"--shard auto in a Slurm array), then dsdkit merge {out} -o RESULT"
    )


@app.command("serve")
@cli_errors
def serve_command(
    bundle: Annotated[Path, typer.Argument(help="The bundle to serve (from dsdkit export).")],
    replicas: Annotated[int, typer.Option(min=1, help="Replicas, each with its own engine.")] = 1,
    gpus_per_replica: Annotated[
        float, typer.Option(min=0, help="GPUs per replica (0: CPU replicas; above 0 the engine runs on cuda).")
    ] = 0.0,
    cpus_per_replica: Annotated[
        float, typer.Option(help="CPUs per replica; also its threads unless --threads.")
    ] = 1.0,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The HTTP port.")] = 8000,
    host: Annotated[
        str, typer.Option(help="The interface to listen on (0.0.0.0 for other machines; there is no authentication).")
    ] = "127.0.0.1",
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray", help="The Ray cluster: local (a new one on this machine), auto, HOST:PORT (default: Ray's own)."
        ),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option(help='Folder that {"path": ...} images are read from (default: uploads only).')
    ] = None,
    timesteps: Annotated[int | None, typer.Option(min=1, help="S of the bundle's timestep table.")] = None,
    max_batch_items: Annotated[
        int, typer.Option(min=1, help="A scorer batch's size in pairs x timesteps (requests are split to fit).")
    ] = 256,
    batch_wait: Annotated[
        float, typer.Option(min=0, help="Seconds a scorer batch waits for more requests' pairs after its first.")
    ] = 0.01,
    max_ongoing_requests: Annotated[int, typer.Option(min=1, help="Requests one replica holds at once.")] = 32,
    threads: ThreadsOption = None,
) -> None:
    """Serve a bundle over HTTP with Ray Serve until Ctrl-C or SIGTERM (both delete the app and leave Ray):
    POST /rank-captions, /rank-images, /score-pairs (JSON; images as base64 or paths under --image-root),
    GET /health. A client: examples/serve_client.py."""
    from .serving import ServeConfig, serve

    config = ServeConfig(
        image_root=None if image_root is None else str(image_root),
        num_timesteps=timesteps,
        max_batch_items=max_batch_items,
        batch_wait_timeout_s=batch_wait,
    )
    serve(
        bundle,
        replicas=replicas,
        gpus_per_replica=gpus_per_replica,
        cpus_per_replica=cpus_per_replica,
        port=port,
        host=host,
        config=config,
        address=ray,
        threads=threads,
        max_ongoing_requests=max_ongoing_requests,
    )


@app.command("merge")
@cli_errors
def merge_command(
    job: Annotated[Path, typer.Argument(help="A job folder from `dsdkit plan` whose shards are all done.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Result file: .parquet (a row per pair), .csv (matrix), .json or .jsonl (matrix + top-k).",
        ),
    ],
    top_k: Annotated[
        int | None, typer.Option(min=1, help="Length of the JSON top-k lists (default: the job's --top-k).")
    ] = None,
) -> None:
    """Merge a job's shards into one result (refused while shards are missing; top-k per caption is across
    shards)."""
    from .shards import merge_job

    result = merge_job(job, output, top_k=top_k)
    line = f"merged {result.meta['job']['shards']} shard(s) of {job}: {len(result.images)} x {len(result.captions)} "
    line += f"scores to {output}"
    if result.meta.get("skipped_report"):
        from .matching import skipped_report_path

        line += f" (skipped and truncated inputs: {skipped_report_path(output)})"
    _say(line)


def _adaptive_schedule(adaptive: bool, schedule: str | None) -> str | None:
    """The schedule ``--adaptive`` / ``--adaptive-schedule`` ask for: a schedule given implies ``--adaptive``;
    ``--adaptive`` alone is the default one; neither is exhaustive scoring (``None``)."""
    return schedule or ("default" if adaptive else None)


def _format_plan(plan: dict) -> str:
    def clock(seconds: float) -> str:
        seconds = int(round(seconds))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    t = plan["calibration"]
    return "\n".join(
        [
            f"job        {plan['images']} images x {plan['captions']} captions = {plan['pairs']:,} pairs, "
            f"S = {plan['timesteps']} timesteps"
            + (f" ({plan['skipped_images']} unusable images skipped)" if plan.get("skipped_images") else ""),
            f"work       {plan['unet_evaluations']:,} UNet evaluations in batches of {plan['batch_size']}"
            + (
                f" (adaptive {plan['adaptive']}; exhaustive: {plan['exhaustive_unet_evaluations']:,})"
                if "adaptive" in plan
                else ""
            ),
            f"calibrated {plan['engine']}: {t['batch_s']:.3g} s per batch, {t['image_s']:.3g} s per image encoding, "
            f"{t['caption_s']:.3g} s per caption encoding",
            f"estimate   {clock(plan['estimated_seconds'])} (h:mm:ss) for the whole job",
        ]
    )


def parse_knobs(values: list[str] | None) -> dict:
    """``--set knob=value`` pairs as scoring-config overrides (numbers, true/false and comma lists are parsed)."""

    knobs = {}
    for item in values or []:
        name, sep, raw = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(f"--set {item!r}: expected knob=value, e.g. --set lse_lambda=3")
        raw = raw.strip()
        if name == "noise_levels":
            try:
                knobs[name] = tuple(float(v) for v in raw.split(",") if v.strip())
            except ValueError:
                raise ConfigError(f"--set {item!r}: noise levels are numbers, e.g. 0.2,0.4") from None
            continue
        lowered = raw.lower()
        if lowered in ("true", "false", "on", "off"):
            knobs[name] = lowered in ("true", "on")
            continue
        try:
            knobs[name] = int(raw)
        except ValueError:
            try:
                knobs[name] = float(raw)
            except ValueError:
                knobs[name] = raw
    return knobs


class AdapterChoice(str, Enum):
    kv_prompt = "kv-prompt"
    lora = "lora"


class LossChoice(str, Enum):
    ce = "ce"
    bce = "bce"
    hinge = "hinge"


class FormatChoice(str, Enum):
    auto = "auto"
    jsonl = "jsonl"
    comvg = "comvg"
    sugarcrepe = "sugarcrepe"
    winoground = "winoground"
    refcocog = "refcocog"
    vqa = "vqa"


SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Any scoring knob as knob=value (repeatable), e.g. --set lse_lambda=3 --set tokens=all."
    ),
]


@app.command("train")
@cli_errors
def train_command(
    data: Annotated[
        Path, typer.Argument(help="Dataset file (JSONL, ComVG CSV, SugarCrepe JSON, Winoground, RefCOCOg).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder (checkpoints, final adapter).")] = Path(
        "dsd-run"
    ),
    model: Annotated[str | None, typer.Option(help="SD2 folder or hub id.")] = None,
    data_format: Annotated[FormatChoice, typer.Option("--format", help="Dataset format.")] = FormatChoice.auto,
    image_root: Annotated[Path | None, typer.Option(help="Folder image paths are relative to.")] = None,
    adapter: Annotated[AdapterChoice, typer.Option(help="Adapter kind.")] = AdapterChoice.kv_prompt,
    rank: Annotated[int | None, typer.Option(min=1, help="Adapter rank (default 8 kv-prompt, 4 lora).")] = None,
    preset: Annotated[PresetName, typer.Option(help="Scoring preset.")] = PresetName.discffusion,
    timesteps: Annotated[int | None, typer.Option(help="S of the discffusion table.")] = None,
    denoise: Annotated[bool | None, typer.Option("--denoise/--no-denoise", help="Denoising term.")] = None,
    knobs: SetOption = None,
    loss: Annotated[
        LossChoice, typer.Option(help="ce (default), bce (paper Eq. 6) or hinge (authors').")
    ] = LossChoice.ce,
    margin: Annotated[float, typer.Option(help="Hinge margin.")] = 0.1,
    shots: Annotated[int | None, typer.Option(min=1, help="Train on this many examples (seeded random).")] = None,
    fraction: Annotated[float | None, typer.Option(help="Train on this fraction of the examples.")] = None,
    first: Annotated[
        bool, typer.Option(help="Take the first rows instead of a random sample (authors' splits).")
    ] = False,
    train_split: Annotated[str | None, typer.Option(help="Split to train on.")] = None,
    eval_split: Annotated[str | None, typer.Option(help="Held-out split evaluated after each epoch.")] = None,
    eval_fraction: Annotated[float, typer.Option(help="Held-out fraction when the dataset has no splits.")] = 0.2,
    max_eval: Annotated[
        int | None, typer.Option(min=1, help="Evaluate on at most this many held-out examples.")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training examples.")] = 1,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Stop after this many optimizer steps.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-2,
    precision: Annotated[Precision, typer.Option(help="Frozen UNet precision (adapters stay fp32).")] = Precision.fp32,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute UNet activations in backward.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of sampling, noise and adapter init.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Optimizer steps between checkpoints.")] = 100,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate the held-out split after each epoch.")
    ] = True,
    resume: Annotated[bool, typer.Option(help="Continue the run in --output from its latest checkpoint.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Train a few-shot adapter on a frozen SD2 model."""
    _use_threads(threads)
    from .train import TrainConfig, train

    scoring = {k: v for k, v in {"num_timesteps": timesteps, "denoise_term": denoise}.items() if v is not None}
    scoring.update(parse_knobs(knobs))
    config = TrainConfig(
        data=str(data),
        output=str(output),
        model=model,
        format=data_format.value,
        image_root=None if image_root is None else str(image_root),
        adapter=adapter.value,
        rank=rank,
        preset=preset.value,
        scoring=scoring,
        loss=loss.value,
        margin=margin,
        shots=shots,
        fraction=fraction,
        first=first,
        train_split=train_split,
        eval_split=eval_split,
        eval_fraction=eval_fraction,
        max_eval_examples=max_eval,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        precision=precision.value,
        gradient_checkpointing=gradient_checkpointing,
        device=device,
        seed=seed,
        checkpoint_every=checkpoint_every,
        eval_every_epoch=evaluate,
        resume=resume,
    )
    with _training_progress() as callbacks:
        result = train(config, callbacks=callbacks)
    if result.zero_shot_metrics:
        _say(f"zero-shot: {_format_metrics(result.zero_shot_metrics)}")
    if result.final_metrics:
        _say(f"trained:   {_format_metrics(result.final_metrics)}")
    _say(f"wrote {result.adapter_path} after {result.steps} steps")


@app.command("eval")
@cli_errors
def eval_command(
    data: Annotated[
        Path, typer.Argument(help="Benchmark file (JSONL, ComVG CSV, SugarCrepe JSON/folder, Winoground, RefCOCOg).")
    ],
    model: Annotated[str | None, typer.Option(help="SD2 folder or hub id.")] = None,
    adapters: Annotated[
        Path | None, typer.Option(help="Adapter file from `dsdkit train` (default: zero-shot).")
    ] = None,
    data_format: Annotated[FormatChoice, typer.Option("--format", help="Dataset format.")] = FormatChoice.auto,
    image_root: Annotated[Path | None, typer.Option(help="Folder image paths are relative to.")] = None,
    split: Annotated[str | None, typer.Option(help="Evaluate only this split.")] = None,
    subset: Annotated[
        list[str] | None, typer.Option(help="Evaluate only examples of this subset (repeatable; JSONL 'subset').")
    ] = None,
    max_examples: Annotated[int | None, typer.Option(min=1, help="Evaluate the first N examples only.")] = None,
    preset: Annotated[
        PresetName | None, typer.Option(help="Scoring preset (default: the adapter's, else discffusion).")
    ] = None,
    timesteps: Annotated[int | None, typer.Option(help="S of the discffusion table.")] = None,
    denoise: Annotated[bool | None, typer.Option("--denoise/--no-denoise", help="Denoising term.")] = None,
    normalize: Annotated[Normalization | None, typer.Option(help="uncond for image-choice tasks.")] = None,
    knobs: SetOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="UNet batch size.")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Precision, typer.Option(help="UNet precision.")] = Precision.fp32,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write metrics and per-example scores (JSON).")
    ] = None,
    adaptive: Annotated[
        bool, typer.Option(help="Rank candidate sets by successive elimination (top-1 exact; README: Adaptive).")
    ] = False,
    adaptive_schedule: Annotated[
        str | None, typer.Option(help="Elimination stages, e.g. keep=50%,25%,k:steps=1,4,all (implies --adaptive).")
    ] = None,
    compile: CompileOption = None,
    threads: ThreadsOption = None,
) -> None:
    """Evaluate zero-shot or with adapters on a benchmark and report its own metrics."""
    _use_threads(threads)
    from .evaluation import evaluate, write_report
    from .scorer import build_scorer

    overrides = {"num_timesteps": timesteps, "denoise_term": denoise, "normalize": _value(normalize)}
    overrides.update(parse_knobs(knobs))
    from .datasets import load_dataset

    dataset = load_dataset(data, data_format.value, image_root)
    scorer = build_scorer(
        model,
        adapters,
        None if preset is None else preset.value,
        overrides,
        batch_size,
        device,
        dtype.value,
        compile=_value(compile),
    )
    with _progress_bar("evaluating", "UNet evals") as progress:
        report = evaluate(
            scorer,
            dataset,
            split=split,
            max_examples=max_examples,
            progress=progress,
            subsets=subset or None,
            adaptive=_adaptive_schedule(adaptive, adaptive_schedule),
        )
    report.meta = {
        "model": scorer.model.describe(),
        "adapters": None if adapters is None else str(adapters),
        "scoring": scorer.config.to_dict(),
        "compile": scorer.acceleration.compile,
    }
    _print_metrics(report.metrics, f"{dataset.format}: {report.source}" + (f", split {split}" if split else ""))
    if report.evaluations:
        ran = report.evaluations["conditional"] + report.evaluations["unconditional"]
        exhaustive = report.evaluations["exhaustive_conditional"] + report.evaluations["exhaustive_unconditional"]
        _say(f"adaptive: {ran:,} UNet evaluations instead of {exhaustive:,} ({exhaustive / max(ran, 1):.1f}x fewer)")
    # Skips were logged once as the dataset was read (the first few by name); here only their count.
    if output is not None:
        write_report(report, output)
        _say(f'wrote {output} ({len(report.skipped)} rows or examples skipped, listed under "skipped")')
    elif report.skipped:
        _say(f"{len(report.skipped)} rows or examples skipped (the first named above; -o writes every reason)")


adapters_app = typer.Typer(help="Inspect and convert adapter files.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("import-discffusion")
@cli_errors
def import_discffusion(
    source: Annotated[
        Path, typer.Argument(help="The authors' pytorch_model.bin (or a .safetensors with the same keys).")
    ],
    destination: Annotated[Path, typer.Argument(help="Where to write the dsdkit adapter (.safetensors).")],
    model: Annotated[
        str | None, typer.Option(help="The SD2 model the LoRA was trained on (default SD2-1-base).")
    ] = None,
) -> None:
    """Convert the authors' released LoRA checkpoint without executing pickled code."""
    from .adapters import import_discffusion_lora, save_adapter
    from .models import load_model

    sd2 = load_model(model, device="cpu")
    scoring = ScoringConfig()
    adapter = import_discffusion_lora(source, sd2, scoring)
    save_adapter(adapter, destination, sd2.identity(), scoring, extra={"imported_from": source.name})
    _say(
        f"wrote {destination}: LoRA rank {adapter.config.rank} on {len(adapter.layer_names)} attention modules "
        f"({adapter.num_parameters():,} parameters)"
    )


@adapters_app.command("info")
@cli_errors
def adapter_info(path: Annotated[Path, typer.Argument(help="An adapter file.")]) -> None:
    """Print an adapter file's header."""

    from .adapters import read_adapter_header

    typer.echo(json.dumps(read_adapter_header(path), indent=1))


class HeatScale(str, Enum):
    shared = "shared"
    token = "token"


@app.command("explain")
@cli_errors
def explain_command(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    caption: Annotated[str, typer.Argument(help="The caption to explain.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write: one heat-map panel per word token.")] = Path(
        "heat.png"
    ),
    model: Annotated[str | None, typer.Option(help="SD2 folder or hub id.")] = None,
    adapters: Annotated[Path | None, typer.Option(help="Adapter file from `dsdkit train`.")] = None,
    preset: Annotated[
        PresetName | None, typer.Option(help="Scoring preset (default: the adapter's, else discffusion).")
    ] = None,
    timesteps: Annotated[int | None, typer.Option(help="S of the discffusion table (default 30).")] = None,
    knobs: SetOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Precision, typer.Option(help="UNet precision.")] = Precision.fp32,
    scale: Annotated[
        HeatScale, typer.Option(help="shared: one colour scale for all tokens; token: each token's own range.")
    ] = HeatScale.shared,
    threads: ThreadsOption = None,
) -> None:
    """Per-word cross-attention heat maps of one image-caption pair (the attention the score pools)."""
    _use_threads(threads)
    from .explain import explain, render_heat_maps
    from .scorer import build_scorer

    overrides = parse_knobs(knobs)
    if timesteps is not None:
        overrides["num_timesteps"] = timesteps
    scorer = build_scorer(
        model, adapters, None if preset is None else preset.value, overrides, device=device, dtype=dtype.value
    )
    with _progress_bar("explaining", "UNet passes") as progress:
        explanation = explain(scorer, image, caption, progress=progress)
    render_heat_maps(explanation, out, caption=caption, scale=scale.value)
    _say(
        f"wrote {out}: {len(explanation.tokens)} panels ({', '.join(explanation.tokens)}), "
        f"{len(explanation.timesteps)} timesteps, {len(scorer.layer_names)} layers, score {explanation.score:.4f}"
    )


@app.command("bench")
@cli_errors
def bench_command(
    model: Annotated[str | None, typer.Option(help="SD2 folder (default: a random-weight model of --size).")] = None,
    size: Annotated[TinySize, typer.Option(help="Random-weight model size when no --model is given.")] = TinySize.tiny,
    preset: Annotated[PresetName, typer.Option(help="Scoring preset.")] = PresetName.discffusion,
    timesteps: Annotated[int, typer.Option(help="S of the discffusion table.")] = 10,
    denoise: Annotated[bool, typer.Option("--denoise/--no-denoise", help="Denoising term.")] = False,
    images: Annotated[int, typer.Option(min=1, help="N generated images.")] = 2,
    captions: Annotated[int, typer.Option(min=1, help="M captions.")] = 2,
    batch_size: Annotated[list[int] | None, typer.Option(min=1, help="UNet batch size (repeatable).")] = None,
    engine: Annotated[
        list[str] | None,
        typer.Option(
            help="pytorch, pytorch-adaptive, pytorch-compiled, reference, onnxruntime, tensorrt (repeatable; "
            "default pytorch + reference)."
        ),
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="Bundle for the onnxruntime and tensorrt engines.")] = None,
    compile_mode: Annotated[
        CompileMode, typer.Option(help="torch.compile mode of pytorch-compiled (auto: CUDA graphs on a GPU).")
    ] = CompileMode.auto,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    dtype: Annotated[Precision, typer.Option(help="UNet precision.")] = Precision.fp32,
    table: Annotated[bool, typer.Option(help="Run the README's scaling table instead of one job.")] = False,
    adaptive_schedule: Annotated[
        str, typer.Option(help="The pytorch-adaptive engine's schedule (e.g. keep=8,3,k:steps=2,6,all).")
    ] = "default",
    top_k: Annotated[int, typer.Option(min=1, help="Captions per image pytorch-adaptive keeps exact.")] = 1,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the JSON record(s) here.")] = None,
    threads: ThreadsOption = None,
) -> None:
    """Throughput of our engines vs the authors' cost structure, side by side, with counted UNet FLOPs."""
    _use_threads(threads)
    from .bench import SCALING_TABLE, BenchConfig, format_record, run_bench

    base = dict(
        preset=preset.value,
        timesteps=timesteps,
        denoise=denoise,
        batch_sizes=batch_size or [8],
        engines=engine or ["pytorch", "reference"],
        bundle=None if bundle is None else str(bundle),
        device=device,
        dtype=dtype.value,
        compile_mode=compile_mode.value,
        adaptive_schedule=adaptive_schedule,
        top_k=top_k,
    )
    if not table:
        jobs = [BenchConfig(model=model, size=size.value, images=images, captions=captions, **base)]
    else:
        base["timesteps"] = 4
        jobs = [
            BenchConfig(size=s, images=n, captions=m, **{**base, "timesteps": steps})
            for s, n, m, steps in SCALING_TABLE
        ]
    records = []
    folders: dict[str, Path] = {}

    # One bar over the table's jobs (when there are several) and, per job, one over its rows (an engine at a batch
    # size), whose status says what runs now: the row, its warm-up, its UNet evaluations.
    bars = _started_progress("{task.description}", "{task.fields[status]}")
    jobs_bar = bars.add_task("bench jobs", total=len(jobs), status="") if len(jobs) > 1 else None
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for number, job in enumerate(jobs, 1):
                started = time.perf_counter()
                if job.model is None and job.size not in folders:
                    from .tiny import write_tiny_model

                    if jobs_bar is not None:
                        bars.update(jobs_bar, status=f"writing the random-weight {job.size} model")
                    folders[job.size] = write_tiny_model(Path(scratch) / job.size, size=job.size)
                if jobs_bar is not None:
                    bars.update(jobs_bar, status=f"{job.size} model, {job.images}x{job.captions}, S={job.timesteps}")
                rows_bar = []

                def rows(total, done, number=number, rows_bar=rows_bar):
                    name = f"job {number} rows" if len(jobs) > 1 else "bench rows"
                    rows_bar.append(bars.add_task(name, total=total, completed=done, status=""))
                    return lambda n: bars.advance(rows_bar[0], n)

                def status(text, rows_bar=rows_bar):
                    if rows_bar:
                        bars.update(rows_bar[0], status=text)

                record = run_bench(job, folder=folders.get(job.size), progress=rows, status=status)
                for task in rows_bar:
                    bars.remove_task(task)
                if jobs_bar is not None:
                    bars.advance(jobs_bar, 1)
                record["row_wall_s"] = round(time.perf_counter() - started, 1)
                records.append(record)
                _say(format_record(record))
                _say(f"(this job took {record['row_wall_s']:.0f} s wall, model writing included)\n")
    finally:
        bars.stop()
    if output is not None:
        atomic_write_text(output, json.dumps(records if table else records[0], indent=1) + "\n")
        _say(f"wrote {output}")


class ExporterChoice(str, Enum):
    dynamo = "dynamo"
    torchscript = "torchscript"


@app.command("export")
@cli_errors
def export_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle folder to write.")],
    model: Annotated[str | None, typer.Option(help="SD2 folder or hub id (default SD2-1-base).")] = None,
    adapters: Annotated[
        Path | None, typer.Option(help="Adapter file from `dsdkit train`, folded into the graphs.")
    ] = None,
    preset: Annotated[
        PresetName | None, typer.Option(help="Scoring preset (default: the adapter's own config, else discffusion).")
    ] = None,
    timesteps: Annotated[int | None, typer.Option(help="Default S of the discffusion table for the runtime.")] = None,
    knobs: SetOption = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="fp16 scorer graph with fp32 score islands.")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    batch: Annotated[str, typer.Option(help="Batch profile MIN:OPT:MAX (OPT is the runtime's batch).")] = "1:8:32",
    engines: Annotated[
        bool | None,
        typer.Option(
            "--engines/--no-engines", help="Build TensorRT engines (default: when TensorRT and a GPU are here)."
        ),
    ] = None,
    exporter: Annotated[ExporterChoice, typer.Option(help="torch ONNX exporter.")] = ExporterChoice.dynamo,
    device: Annotated[str, typer.Option(help="Where the PyTorch side runs: cpu or cuda.")] = "cpu",
    parity_size: Annotated[int, typer.Option(help="Parity check on N generated images x N captions.")] = 4,
    parity_timesteps: Annotated[int, typer.Option(help="Timesteps of the end-to-end parity check.")] = 1,
    licence: Annotated[
        str | None, typer.Option("--license", help="The base model's licence, if its folder does not state it.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle at --out.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Export ONNX scoring graphs (adapters folded), check parity with PyTorch, build engines: a bundle."""
    _use_threads(threads)
    from .export import ExportConfig, ParitySettings, export_bundle, parse_batch

    if parity_size < 1 or parity_timesteps < 1:
        raise ConfigError("--parity-size and --parity-timesteps must be >= 1 (parity is always checked)")
    overrides = parse_knobs(knobs)
    if timesteps is not None:
        overrides["num_timesteps"] = timesteps
    config = ExportConfig(
        precision="fp16" if fp16 else "fp32",
        opset=opset,
        batch=parse_batch(batch),
        exporter=exporter.value,
        engines=engines,
        device=device,
        licence=licence,
        parity=ParitySettings(images=parity_size, captions=parity_size, timesteps=parity_timesteps),
    )
    with _stage_progress("exporting") as progress:
        manifest = export_bundle(
            model,
            out,
            adapters=adapters,
            preset=None if preset is None else preset.value,
            overrides=overrides,
            config=config,
            overwrite=overwrite,
            progress=progress,
        )
    _say(_bundle_summary(out, manifest, verified=True))


@app.command("inspect")
@cli_errors
def inspect_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder from `dsdkit export`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole manifest as JSON.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every file's size and sha256.")] = True,
) -> None:
    """Print a bundle's manifest readably, then every file with its size and sha256 (verified unless
    --no-verify)."""

    opened = Bundle.open(bundle, verify=verify)
    if as_json:
        typer.echo(json.dumps(opened.manifest, indent=1))
        return
    typer.echo(_bundle_summary(bundle, opened.manifest, verified=verify))
    files = opened.manifest.get("files", {})
    width = max((len(name) for name in files), default=0)
    for name, record in sorted(files.items()):
        typer.echo(f"  {name:<{width}}  {record['size']:>14,} B  sha256 {record['sha256']}")


@app.command("build-engines")
@cli_errors
def build_engines_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder from `dsdkit export`.")],
    workspace_gb: Annotated[float | None, typer.Option(help="TensorRT builder workspace limit in GB.")] = None,
) -> None:
    """Build TensorRT engines into a bundle, on the GPU machine that will run them."""
    from .export import add_engines

    manifest = add_engines(bundle, workspace_gb)
    _say(_bundle_summary(bundle, manifest, verified=True))


def _bundle_summary(path: Path, manifest: dict, verified: bool) -> str:
    """A bundle's manifest in a few readable lines."""
    model, scoring, files = manifest["model"], manifest["scoring"], manifest.get("files", {})
    size = sum(record["size"] for record in files.values())
    adapter = manifest.get("adapter")
    lines = [
        f"bundle    {path}  ({manifest['format']}, dsdkit {manifest['dsdkit_version']}, "
        f"{manifest.get('created', '?')})",
        f"model     {model['source']}  identity {model['identity'][:12]}  {model['resolution']}px  "
        f"licence: {model['licence']}",
        "adapter   "
        + (
            f"{adapter['file']} ({adapter['header'].get('kind', '?')}, sha256 {adapter['sha256'][:12]}), folded"
            if adapter
            else "none (zero-shot)"
        ),
        f"scoring   preset {scoring['preset']}, pooling {scoring['pooling']}, layers {len(manifest['layers'])}, "
        f"heads {scoring['heads']}, timesteps {scoring['timesteps']}"
        + (f" S={scoring['num_timesteps']}" if scoring["timesteps"] == "discffusion" else "")
        + f", denoise {'on' if scoring['denoise_term'] else 'off'}, normalize {scoring['normalize']}",
        f"export    {manifest['precision']}, {manifest['export']['exporter']} exporter, "
        f"opset {manifest['export']['opset']}, "
        f"batch {':'.join(map(str, manifest['export']['batch']))}, noise bank {manifest['noise']['bank_size']}",
    ]
    for name, graph in manifest["graphs"].items():
        inputs = ", ".join(f"{k}{v['shape']}" for k, v in graph["inputs"].items())
        outputs = ", ".join(f"{k}{v['shape']}" for k, v in graph["outputs"].items())
        lines.append(f"graph     {name} ({graph['precision']}): {inputs} -> {outputs}")
    parity = manifest.get("parity", {})
    for name, outputs in parity.get("graphs", {}).items():
        worst = max(outputs.items(), key=lambda item: item[1]["max_abs"])
        lines.append(
            f"parity    {name}: max abs {worst[1]['max_abs']:.2g} ({worst[0]}), "
            f"{'ok' if all(o['ok'] for o in outputs.values()) else 'FAILED'}"
        )
    if parity.get("end_to_end"):
        end = parity["end_to_end"]
        lines.append(
            f"parity    scores {end['matrix'][0]}x{end['matrix'][1]} at t={end['timesteps']}: max abs "
            f"{end['scores']['max_abs']:.2g}, max rel {end['scores']['max_rel']:.2g}, top-1 agreement "
            f"{end['ranking']['top1_agreement']:.3f}, Spearman {end['ranking']['spearman_mean']:.4f}"
        )
    engines = manifest.get("engines", {})
    if engines.get("built"):
        lines.append(
            f"engines   TensorRT {engines['tensorrt']} for {engines['gpu']} (sm {engines['compute_capability']}): "
            + ", ".join(engines["graphs"])
        )
    else:
        lines.append(f"engines   none ({engines.get('reason', 'not built')})")
    state = "verified (size and sha256)" if verified else "not verified"
    lines.append(f"files     {len(files)} files, {size / 1e6:.1f} MB, {state}")
    return "\n".join(lines)


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes of the dsdkit command."""
    for code, meaning in EXIT_CODES.items():
        typer.echo(f"{code:>4}  {meaning}")


# -- terminal output ------------------------------------------------------------------------------------------


def _started_progress(label: str, status: str):
    """A started rich progress display on stderr (label, bar, done/total, status, time elapsed and estimated time
    left, each labelled); silent when stderr is not a terminal, and gone when it ends."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(status),
        # A bare clock would not say which time it is: elapsed and estimated remaining get their words.
        TimeElapsedColumn(),
        TextColumn("elapsed,"),
        TimeRemainingColumn(),
        TextColumn("left"),
        console=console,
        disable=_State.quiet or not console.is_terminal,
        transient=True,
    )
    progress.__enter__()
    return progress


class _progress_bar:
    """A rich progress bar on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str = "scoring", unit: str = "UNet evals"):
        self.label, self.unit = label, unit

    def __enter__(self):
        self._progress = _started_progress(self.label, self.unit)
        return self.make

    def make(self, total: int, done: int):
        task = self._progress.add_task("score", total=total, completed=done)
        return lambda advance: self._progress.advance(task, advance)

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class _training_progress:
    """Progress bar over optimizer steps with running loss and accuracy; yields the trainer callbacks."""

    def __enter__(self):
        self._progress = _started_progress("training", "{task.fields[status]}")
        self._task = None
        self._losses, self._correct = [], []

        def on_step(trainer, step, loss, accuracy):
            if self._task is None:
                self._task = self._progress.add_task("train", total=trainer.total_steps, completed=step - 1, status="")
            self._losses = (self._losses + [loss])[-50:]
            self._correct = (self._correct + [accuracy])[-50:]
            status = (
                f"loss {sum(self._losses) / len(self._losses):.4f}  acc {sum(self._correct) / len(self._correct):.2f}"
            )
            self._progress.update(self._task, completed=step, status=status)

        def on_eval(trainer, metrics, zero_shot):
            label = "zero-shot" if zero_shot else f"epoch {trainer.state.epoch}"
            logger.info("%s held-out: %s", label, _format_metrics(metrics))

        return {"on_step_end": [on_step], "on_eval_end": [on_eval]}

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class _phase_progress:
    """A progress bar per training phase (VAE, diffusion) with the smoothed loss; yields the step callback."""

    def __enter__(self):
        self._progress = _started_progress("{task.description}", "{task.fields[status]}")
        self._tasks: dict[str, int] = {}

        def on_step(phase, step, total, loss):
            if phase not in self._tasks:
                self._tasks[phase] = self._progress.add_task(phase, total=total, completed=step - 1, status="")
            self._progress.update(self._tasks[phase], completed=step, status=f"loss {loss:.4f}")
            if step % 500 == 0 or step == total:
                logger.info("%s step %d/%d: smoothed loss %.5f", phase, step, total, loss)

        return on_step

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class _stage_progress:
    """A bar over a job's steps whose status names the step running now; yields the ``progress(stage, done,
    total)`` callback of :func:`dsdkit.export.export_bundle`."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self._progress = _started_progress(self.label, "{task.fields[status]}")
        self._task = None

        def on_stage(stage: str, done: int, total: int):
            if self._task is None:
                self._task = self._progress.add_task(self.label, total=total, completed=done, status=stage)
            else:
                self._progress.update(self._task, completed=done, total=total, status=stage)

        return on_stage

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


def _format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if k != "examples" else f"n={int(v)}" for k, v in metrics.items())


def _print_metrics(metrics: dict, title: str) -> None:
    if _State.quiet:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, str(int(value)) if name == "examples" else f"{value:.4f}")
    console = Console(width=max(100, Console().width))
    console.print(title, markup=False, highlight=False)
    console.print(table)


_SCORE_LEGEND = (
    "score: how well the caption fits the image, higher is better (comparable within one image; not a "
    "probability); margin: best minus second-best score"
)


def _count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _tail(name: str, width: int) -> str:
    """A long path shortened from the left, so that the file name (its distinctive end) stays visible."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _print_summary(result, max_rows: int = 20) -> None:
    if _State.quiet:
        return
    from rich.console import Console
    from rich.table import Table

    scores = result.scores
    best_two = result.top(2, axis=1)
    exact = result.exact
    with_margin = len(result.captions) > 1  # one caption has no runner-up to compare with
    console = Console(width=max(100, Console().width))
    # The two text columns share what the number columns and the borders leave (each at most 60 wide).
    text_width = min(60, (console.width - 28) // 2)
    legend = _SCORE_LEGEND if with_margin else _SCORE_LEGEND.partition("; margin")[0]
    if result.held is not None and result.partial.any():
        legend += "; margin -: the runner-up left the adaptive race early (its score is partial)"
    table = Table(
        title=f"{_count(len(result.images), 'image')} x {_count(len(result.captions), 'caption')}: "
        "best caption per image",
        caption=legend,
        caption_justify="left",
    )
    # One row per image stays about one line: long names and captions are shortened (the result file has them
    # whole), instead of wrapping a row over many lines.
    table.add_column("image", no_wrap=True, overflow="ellipsis", max_width=text_width)
    table.add_column("best caption", no_wrap=True, overflow="ellipsis", max_width=text_width)
    table.add_column("score", justify="right", no_wrap=True, min_width=7)
    if with_margin:
        table.add_column("margin", justify="right", no_wrap=True, min_width=7)
    for i, name in enumerate(result.images[:max_rows]):
        ranked = best_two[i]
        if not len(ranked):
            table.add_row(_tail(name, text_width), "(no pair listed)", "", *([""] if with_margin else []))
            continue
        best = ranked[0]
        row = [_tail(name, text_width), result.captions[best], f"{scores[i, best]:.4f}"]
        if with_margin:
            if len(ranked) < 2:
                row.append("")
            elif exact[i, ranked[1]]:
                row.append(f"{scores[i, best] - scores[i, ranked[1]]:.4f}")
            else:
                row.append("-")
        table.add_row(*row)
    console.print(table, markup=False, highlight=False)
    if len(result.images) > max_rows:
        more = len(result.images) - max_rows
        console.print(f"... {_count(more, 'more image')} in the result file", markup=False, highlight=False)
    for warning in result.meta.get("warnings", []):
        console.print(f"note: {warning}")
    spent = result.meta.get("evaluations")
    if spent and "adaptive" in result.meta:
        ran = spent["conditional"] + spent["unconditional"]
        exhaustive = spent["exhaustive_conditional"] + spent["exhaustive_unconditional"]
        console.print(
            f"adaptive ({result.meta['adaptive']['schedule']}): {ran:,} UNet evaluations instead of {exhaustive:,} "
            f"({exhaustive / max(ran, 1):.1f}x fewer; the top {result.meta['adaptive']['top_k']} per "
            f"{result.meta['adaptive']['per']} are exact)",
            markup=False,
            highlight=False,
        )
    # Each skip was logged once as it happened (the first few by name), so no second list here: only the count,
    # when no report holds them all (with one, the final "wrote" line counts them and names the report).
    skipped = result.meta.get("skipped", {})
    images, lines = len(skipped.get("images", [])), len(skipped.get("caption_lines", []))
    if (images or lines) and not result.meta.get("skipped_report"):
        console.print(
            f"skipped {images} images and {lines} caption lines (named above; -o writes every reason to a report)",
            markup=False,
            highlight=False,
        )


def expand_bare_compile(arguments: list[str]) -> list[str]:
    """``--compile`` given without a mode means ``--compile auto``: the mode is filled in when the next argument is
    not one (typer options cannot have an optional value)."""
    expanded = []
    for index, argument in enumerate(arguments):
        expanded.append(argument)
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if argument == "--compile" and following not in COMPILE_MODES:
            expanded.append(CompileMode.auto.value)
    return expanded


def main() -> None:
    """Console-script entry point."""
    sys.argv[1:] = expand_bare_compile(sys.argv[1:])
    use_passive_waiting()  # first of all (the callback does it again for apps embedding `app`)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
