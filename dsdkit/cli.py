"""The `dsdkit` command: a thin typer layer over the library functions.

Each command parses its options, builds a config and calls one library function. Heavy imports (torch, diffusers)
happen inside the commands, so `dsdkit --help` is instant. User errors print one line and exit with the code of
their class (see :data:`dsdkit.errors.EXIT_CODES`); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

# The config module and its enums are light (no torch), so the CLI's choices are the library's own enums.
from .config import PRESETS, HeadWeighting, LayerSet, Normalization, Pooling, ResizeMode, TimestepSchedule, TokenSet
from .models import Precision
from .runtime.errors import EXIT_CODES, DsdkitError

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


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
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
    _configure_logging(verbose, quiet)


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
        except KeyboardInterrupt:
            if _State.debug:
                raise
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - anything else is our bug; say so in one line
            if _State.debug:
                raise
            typer.echo(
                f"internal error: {type(exc).__name__}: {exc} (a dsdkit bug: rerun with --debug and report the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None

    return wrapper


# -- option types ---------------------------------------------------------------------------------------------


PresetName = Enum("PresetName", {name: name for name in PRESETS}, type=str)


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
    size: Annotated[TinySize, typer.Option(help="micro / tiny: seconds, ~20-50 MB; full: SD2-2.1-base size, ~5 GB.")] = TinySize.tiny,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a folder made earlier by tiny-model.")] = False,
) -> None:
    """Write a random-weight model with SD2's architecture, for trying dsdkit offline. Its scores are meaningless."""
    from .tiny import write_tiny_model

    write_tiny_model(folder, size=size.value, seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {size.value} random-weight SD2-architecture model to {folder} (for testing: scores are meaningless)")


@app.command("match")
@cli_errors
def match_command(
    images: Annotated[Path, typer.Argument(help="A folder of images, or a text file with one image path per line.")],
    captions: Annotated[Path, typer.Argument(help="A text file with one caption per line (UTF-8).")],
    model: Annotated[
        str | None, typer.Option(help="Diffusers SD2 folder or hub id. Default: stabilityai/stable-diffusion-2-1-base.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Result file: .csv (matrix), .json or .jsonl (matrix + top-k).")
    ] = None,
    preset: Annotated[PresetName, typer.Option(help="Scoring preset (DESIGN.md).")] = PresetName("discffusion"),
    timesteps: Annotated[int | None, typer.Option(help="S for the discffusion timestep table (default 30).")] = None,
    batch_size: Annotated[int, typer.Option(help="UNet batch size (scores do not depend on it).")] = 8,
    top_k: Annotated[int, typer.Option(help="Best captions per image / images per caption in JSON outputs.")] = 5,
    per_layer: Annotated[bool, typer.Option(help="Also write each scored layer's attention term (JSON outputs).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[Precision, typer.Option(help="UNet precision; scores are pooled in fp32.")] = Precision.fp32,
    pooling: Annotated[Pooling | None, typer.Option(help="Override the preset's pooling.")] = None,
    lse_lambda: Annotated[float | None, typer.Option("--lambda", help="LogSumExp temperature λ.")] = None,
    tokens: Annotated[TokenSet | None, typer.Option(help="Which text positions are pooled.")] = None,
    layers: Annotated[LayerSet | None, typer.Option(help="Which cross-attention layers are scored.")] = None,
    heads: Annotated[HeadWeighting | None, typer.Option(help="Head weighting.")] = None,
    schedule: Annotated[TimestepSchedule | None, typer.Option(help="Timestep schedule.")] = None,
    noise_levels: Annotated[
        str | None, typer.Option(help="Comma-separated noise levels for --schedule noise-levels, e.g. 0.2,0.4.")
    ] = None,
    denoise: Annotated[
        bool | None, typer.Option("--denoise/--no-denoise", help="Add the denoising term (discffusion default: on).")
    ] = None,
    uncond_in_attention: Annotated[
        bool | None,
        typer.Option("--uncond-in-attention/--no-uncond-in-attention", help="Mix empty-caption rows in (authors' B3)."),
    ] = None,
    normalize: Annotated[
        Normalization | None, typer.Option(help="uncond: subtract the empty caption's score (for ranking images).")
    ] = None,
    resize: Annotated[ResizeMode | None, typer.Option(help="squash (default) or center-crop.")] = None,
    resolution: Annotated[int | None, typer.Option(help="Image size fed to the VAE; default: the model's.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the fixed noise bank.")] = None,
) -> None:
    """Score every image against every caption and show the best caption per image."""
    from .config import ScoringConfig
    from .errors import ConfigError
    from .matching import match

    levels = None
    if noise_levels is not None:
        try:
            levels = tuple(float(v) for v in noise_levels.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--noise-levels {noise_levels!r}: expected comma-separated numbers like 0.2,0.4") from None
    config = ScoringConfig.from_preset(
        preset.value,
        num_timesteps=timesteps,
        pooling=_value(pooling),
        lse_lambda=lse_lambda,
        tokens=_value(tokens),
        layers=_value(layers),
        heads=_value(heads),
        timesteps=_value(schedule),
        noise_levels=levels,
        denoise_term=denoise,
        uncond_in_attention=uncond_in_attention,
        normalize=_value(normalize),
        resize=_value(resize),
        resolution=resolution,
        noise_seed=seed,
    )
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
        )
    _print_summary(result)
    if output is not None:
        typer.echo(f"wrote {len(result.images)} x {len(result.captions)} scores to {output}")


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes of the dsdkit command."""
    for code, meaning in EXIT_CODES.items():
        typer.echo(f"{code:>4}  {meaning}")


# -- terminal output ------------------------------------------------------------------------------------------


class _progress_bar:
    """A rich progress bar over UNet evaluations, on stderr; silent when stderr is not a terminal."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("UNet evals"), TimeRemainingColumn(),
            console=console, disable=not console.is_terminal, transient=True,
        )
        self._progress.__enter__()
        return self.make

    def make(self, total: int, done: int):
        task = self._progress.add_task("score", total=total, completed=done)
        return lambda advance: self._progress.advance(task, advance)

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


def _print_summary(result, max_rows: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    from .runtime.results import top_k

    scores = result.scores
    best_two = top_k(scores, 2, axis=1)
    table = Table(title=f"{len(result.images)} images x {len(result.captions)} captions: best caption per image")
    table.add_column("image", overflow="fold")
    table.add_column("best caption", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("margin", justify="right")
    for i, name in enumerate(result.images[:max_rows]):
        best = best_two[i, 0]
        margin = scores[i, best] - scores[i, best_two[i, 1]] if best_two.shape[1] > 1 else float("nan")
        table.add_row(name, result.captions[best], f"{scores[i, best]:.4f}", f"{margin:.4f}")
    console = Console(width=max(100, Console().width))
    console.print(table)
    if len(result.images) > max_rows:
        console.print(f"... {len(result.images) - max_rows} more images in the result file")
    for warning in result.meta.get("warnings", []):
        console.print(f"note: {warning}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
