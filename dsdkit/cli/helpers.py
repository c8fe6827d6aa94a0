"""Helpers for tests, docs and scripts: ``tiny-model``, ``tiny-data`` and ``exit-codes`` (listed last in
``dsdkit --help``)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..runtime.errors import EXIT_CODES
from .app import HELPERS_PANEL, app, command
from .options import CREATES_FOLDERS, argument, option, prepare_output
from .ui import say


class TinySize(str, Enum):
    micro = "micro"
    tiny = "tiny"
    full = "full"


class TinyArch(str, Enum):
    sd2 = "sd2"
    sd1 = "sd1"
    sd2_v = "sd2-v"


@command(app, "tiny-model", "Write a random-weight Stable Diffusion model (tests).", panel=HELPERS_PANEL)
def tiny_model(
    folder: Annotated[
        Path, argument("FOLDER", help="Where to write the model folder (must be new or empty). " + CREATES_FOLDERS)
    ],
    size: Annotated[
        TinySize,
        option("--size", help="micro / tiny: seconds, ~20-50 MB; full: SD2-2.1-base size, ~5 GB.", metavar="NAME"),
    ] = TinySize.tiny,
    seed: Annotated[int, option("--seed", help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, option("--overwrite", help="Replace a folder made earlier by tiny-model.")] = False,
    arch: Annotated[
        TinyArch,
        option(
            "--arch",
            help="sd2 (SD2-1-base), sd1 (SD1.x: conv projections, quick-GELU text encoder, end-token padding) or "
            "sd2-v (SD2-1 768-v: v-prediction).",
            metavar="NAME",
        ),
    ] = TinyArch.sd2,
) -> None:
    """Write a random-weight model of the Stable Diffusion family, for trying dsdkit offline. Its scores are
    meaningless."""
    from ..pytorch.tiny import write_tiny_model

    prepare_output(folder, "FOLDER")
    write_tiny_model(folder, size=size.value, seed=seed, overwrite=overwrite, arch=arch.value)
    say(f"wrote {size.value} random-weight {arch.value} model to {folder} (for testing: scores are meaningless)")


@command(app, "tiny-data", "Write a synthetic colour-shape task (tests).", panel=HELPERS_PANEL)
def tiny_data(
    folder: Annotated[Path, argument("FOLDER", help="Where to write images/ and data.jsonl. " + CREATES_FOLDERS)],
    train: Annotated[int, option("--train", min=1, help="Training examples.")] = 256,
    test: Annotated[int, option("--test", min=1, help="Held-out examples.")] = 100,
    seed: Annotated[int, option("--seed", help="Seed of the generated images.")] = 0,
) -> None:
    """Write a synthetic task (coloured shapes vs. colour captions) for trying training offline."""
    from ..world.scenes import write_colour_shapes

    prepare_output(folder, "FOLDER")
    path = write_colour_shapes(folder, train=train, test=test, seed=seed)
    say(f"wrote {path} ({train} train + {test} test examples: which of 4 colour captions fits each shape)")


@command(app, "exit-codes", "List the exit codes of the dsdkit command.", panel=HELPERS_PANEL)
def exit_codes() -> None:
    """List the exit codes of the dsdkit command."""
    for code, meaning in EXIT_CODES.items():
        typer.echo(f"{code:>4}  {meaning}")  # asked for: printed under -q too
