"""The demo world's commands: ``demo-data`` (its files for trying dsdkit), ``world train`` (the recipe of the shipped
``--model demo``) and ``world clip`` (its mini-CLIP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..runtime.threads import configure_threads
from .app import app, command
from .options import CREATES_FOLDERS, ThreadsOption, argument, option, prepare_output
from .ui import PhaseProgress, say

world_app = typer.Typer(help="The demo world model: train it (the recipe of the shipped --model demo) and its CLIP.")
app.add_typer(world_app, name="world", short_help="Train the demo world model or its mini-CLIP.", no_args_is_help=True)

RecipeOption = Annotated[
    Path | None, option("--recipe", help="A recipe JSON (its class's fields); the options below override it.")
]
ResumeOption = Annotated[bool, option("--resume", help="Continue the run in OUTPUT from its latest checkpoint.")]


@command(app, "demo-data", "Write the demo world's images, benchmark and few shots.")
def demo_data(
    folder: Annotated[Path, argument("FOLDER", help="Where to write the demo world's files. " + CREATES_FOLDERS)],
    items: Annotated[int, option("--items", min=1, help="Benchmark items per subset.")] = 200,
    shots: Annotated[int, option("--shots", help="Few-shot training items per few-shot subset.")] = 64,
    seed: Annotated[int, option("--seed", help="Seed of the generated scenes.")] = 0,
) -> None:
    """Write demo-world files for --model demo: example images and captions (match), benchmark.jsonl (eval),
    fewshot.jsonl (train)."""
    from ..world.scenes import BENCHMARK_SUBSETS, write_demo_data

    prepare_output(folder, "FOLDER")
    paths = write_demo_data(folder, per_subset=items, shots=shots, seed=seed)
    say(
        f"wrote {paths['examples']}/ and {paths['captions']} (dsdkit match), {paths['benchmark']} "
        f"({items} items x {len(BENCHMARK_SUBSETS)} subsets, dsdkit eval) and {paths['fewshot']} (dsdkit train)"
    )


def _recipe_file(recipe_file: Path | None, output: Path, resume: bool) -> Path | None:
    """A resumed run keeps its own recipe unless told otherwise."""
    if recipe_file is None and resume and (output / "recipe.json").is_file():
        return output / "recipe.json"
    return recipe_file


@command(world_app, "train", "Train the demo world model (VAE, text tower, UNet).")
def world_train(
    output: Annotated[
        Path,
        argument("OUTPUT", help="Run folder (checkpoints); the model is written to OUTPUT/model. " + CREATES_FOLDERS),
    ],
    steps: Annotated[int | None, option("--steps", help="UNet + text encoder steps; default: the recipe's.")] = None,
    vae_steps: Annotated[int | None, option("--vae-steps", help="VAE steps; default: the recipe's.")] = None,
    scenes: Annotated[int | None, option("--scenes", help="Training scenes; default: the recipe's.")] = None,
    batch_size: Annotated[
        int | None, option("--batch-size", min=1, help="Diffusion batch size; default: the recipe's.")
    ] = None,
    seed: Annotated[int | None, option("--seed", help="Seed; default: the recipe's.")] = None,
    checkpoint_every: Annotated[
        int | None, option("--checkpoint-every", help="Steps between checkpoints; default: the recipe's.")
    ] = None,
    threads: ThreadsOption = None,
    recipe_file: RecipeOption = None,
    resume: ResumeOption = False,
    eval_items: Annotated[
        int,
        option("--eval-items", help="Benchmark items per subset for the accuracy written beside the model (0: skip)."),
    ] = 100,
    init_from: Annotated[
        str | None,
        option(
            "--init-from",
            help="Continue a trained world model (a folder or `demo`): its weights are the start, the VAE phase "
            "is skipped, and --steps are further diffusion steps. The recipe must be its architecture.",
        ),
    ] = None,
) -> None:
    """Train the demo world model (VAE; optionally a contrastive text tower; then UNet + text encoder, or the UNet
    alone with the text encoder frozen) into a plain SD2 diffusers folder, or continue one (--init-from)."""
    threads = configure_threads(threads)  # before torch loads; the count is recorded with the checkpoints
    from ..train.world import WorldRecipe, measure_world_model, train_world_model

    prepare_output(output, "OUTPUT")
    overrides = {"steps": steps, "vae_steps": vae_steps, "scenes": scenes, "batch_size": batch_size, "seed": seed}
    overrides["checkpoint_every"] = checkpoint_every
    recipe_file = _recipe_file(recipe_file, output, resume)
    base = WorldRecipe() if recipe_file is None else WorldRecipe.from_file(recipe_file)
    recipe = WorldRecipe.from_dict({**base.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})

    def evaluate(folder: Path) -> dict:
        return measure_world_model(folder, per_subset=eval_items)

    with PhaseProgress() as on_step:
        folder = train_world_model(
            output,
            recipe,
            resume=resume,
            threads=threads,
            evaluate=evaluate if eval_items > 0 else None,
            on_step=on_step,
            init_from=init_from,
        )
    say(f"wrote the world model to {folder} (load it with --model {folder})")


@command(world_app, "clip", "Train the demo world's mini-CLIP.")
def world_clip(
    output: Annotated[
        Path,
        argument("OUTPUT", help="Run folder (checkpoints); the CLIP is written to OUTPUT/clip. " + CREATES_FOLDERS),
    ],
    threads: ThreadsOption = None,
    recipe_file: RecipeOption = None,
    steps: Annotated[int | None, option("--steps", help="Training steps; default: the recipe's.")] = None,
    resume: ResumeOption = False,
    eval_items: Annotated[
        int, option("--eval-items", help="Benchmark items per subset for the towers-alone accuracy (0: skip).")
    ] = 200,
) -> None:
    """Train the demo world's mini-CLIP (a Hugging Face CLIPModel whose text tower is the demo diffusion model's
    text-encoder architecture) into OUTPUT/clip: seeded, resumable, loadable by transformers offline."""
    threads = configure_threads(threads)
    from ..train.clip import ClipRecipe, train_world_clip

    prepare_output(output, "OUTPUT")
    recipe_file = _recipe_file(recipe_file, output, resume)
    recipe = ClipRecipe() if recipe_file is None else ClipRecipe.from_file(recipe_file)
    if steps is not None:
        recipe = ClipRecipe.from_dict({**recipe.to_dict(), "steps": steps})
    with PhaseProgress() as on_step:
        folder = train_world_clip(
            output, recipe, resume=resume, threads=threads, on_step=on_step, evaluate_items=eval_items
        )
    say(f"wrote the mini-CLIP to {folder}")
