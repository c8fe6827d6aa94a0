"""Few-shot adapters: ``train``, ``eval`` and the ``adapters`` group (``info``, ``import-discffusion``)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..jobs.specs import EngineSpec
from .app import app, command
from .options import (
    ADAPTIVE_PANEL,
    CREATES_FOLDERS,
    IO_PANEL,
    PERFORMANCE_PANEL,
    DtypeName,
    adaptive_schedule,
    argument,
    engine_options,
    markup_safe,
    option,
    prepare_output,
)
from .ui import ProgressBar, TrainingProgress, format_metrics, print_metrics, say

adapters_app = typer.Typer(help=markup_safe("Inspect and convert adapter files."))
app.add_typer(adapters_app, name="adapters", short_help="Inspect and convert adapter files.", no_args_is_help=True)


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


FormatOption = Annotated[
    FormatChoice, option("--format", help="Dataset format.", panel=IO_PANEL, choices=FormatChoice)
]
ImageRootOption = Annotated[
    Path | None, option("--image-root", help="Folder image paths are relative to.", panel=IO_PANEL)
]


@command(app, "train", "Train a few-shot adapter on a frozen SD2 model.")
@engine_options(only=("model", "device", "threads"), scoring={"exclude": ("noise_seed",)})
def train_command(
    data: Annotated[
        Path, argument("DATA", help="Dataset file (JSONL, ComVG CSV, SugarCrepe JSON, Winoground, RefCOCOg).")
    ],
    engine: EngineSpec,
    output: Annotated[
        Path,
        option("--output", "-o", help="Run folder (checkpoints, final adapter). " + CREATES_FOLDERS, panel=IO_PANEL),
    ] = Path("dsd-run"),
    data_format: FormatOption = FormatChoice.auto,
    image_root: ImageRootOption = None,
    adapter: Annotated[
        AdapterChoice, option("--adapter", help="Adapter kind.", choices=AdapterChoice)
    ] = AdapterChoice.kv_prompt,
    rank: Annotated[int | None, option("--rank", min=1, help="Adapter rank (default 8 kv-prompt, 4 lora).")] = None,
    loss: Annotated[
        LossChoice, option("--loss", help="ce (default), bce (paper Eq. 6) or hinge (authors').")
    ] = LossChoice.ce,
    margin: Annotated[float, option("--margin", help="Hinge margin.")] = 0.1,
    shots: Annotated[int | None, option("--shots", min=1, help="Train on this many examples (seeded random).")] = None,
    fraction: Annotated[float | None, option("--fraction", help="Train on this fraction of the examples.")] = None,
    first: Annotated[
        bool, option("--first", help="Take the first rows instead of a random sample (authors' splits).")
    ] = False,
    train_split: Annotated[str | None, option("--train-split", help="Split to train on.")] = None,
    eval_split: Annotated[
        str | None, option("--eval-split", help="Held-out split evaluated after each epoch.")
    ] = None,
    eval_fraction: Annotated[
        float, option("--eval-fraction", help="Held-out fraction when the dataset has no splits.")
    ] = 0.2,
    max_eval: Annotated[
        int | None, option("--max-eval", min=1, help="Evaluate on at most this many held-out examples.")
    ] = None,
    epochs: Annotated[int, option("--epochs", min=1, help="Passes over the training examples.")] = 1,
    max_steps: Annotated[
        int | None, option("--max-steps", min=1, help="Stop after this many optimizer steps.")
    ] = None,
    batch_size: Annotated[int, option("--batch-size", min=1, help="Examples per optimizer step.")] = 1,
    lr: Annotated[float, option("--lr", help="AdamW learning rate.")] = 1e-4,
    weight_decay: Annotated[float, option("--weight-decay", help="AdamW weight decay.")] = 1e-2,
    precision: Annotated[
        DtypeName,
        option(
            "--precision",
            help="Frozen UNet precision (adapters stay fp32).",
            panel=PERFORMANCE_PANEL,
            choices=DtypeName,
        ),
    ] = DtypeName.fp32,
    gradient_checkpointing: Annotated[
        bool,
        option("--gradient-checkpointing", help="Recompute UNet activations in backward.", panel=PERFORMANCE_PANEL),
    ] = False,
    seed: Annotated[
        int, option("--seed", help="Seed of sampling, noise and adapter init (--set noise_seed=N: the noise bank's).")
    ] = 0,
    checkpoint_every: Annotated[
        int, option("--checkpoint-every", min=1, help="Optimizer steps between checkpoints.")
    ] = 100,
    evaluate: Annotated[
        bool, option("--eval/--no-eval", help="Evaluate the held-out split after each epoch (default: on).")
    ] = True,
    resume: Annotated[
        bool, option("--resume", help="Continue the run in --output from its latest checkpoint.")
    ] = False,
) -> None:
    """Train a few-shot adapter on a frozen SD2 model."""
    from ..train import TrainConfig, train

    prepare_output(output, "--output")
    config = TrainConfig(
        data=str(data),
        output=str(output),
        model=engine.model,
        format=data_format.value,
        image_root=None if image_root is None else str(image_root),
        adapter=adapter.value,
        rank=rank,
        preset=engine.preset or "discffusion",
        scoring=engine.knobs,
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
        device=engine.device,
        seed=seed,
        checkpoint_every=checkpoint_every,
        eval_every_epoch=evaluate,
        resume=resume,
    )
    with TrainingProgress() as callbacks:
        result = train(config, callbacks=callbacks)
    if result.zero_shot_metrics:
        say(f"zero-shot: {format_metrics(result.zero_shot_metrics)}")
    if result.final_metrics:
        say(f"trained:   {format_metrics(result.final_metrics)}")
    say(f"wrote {result.adapter_path} after {result.steps} steps")


@command(app, "eval", "Evaluate on a benchmark, zero-shot or with adapters.")
@engine_options(only=("model", "adapters", "device", "dtype", "compile", "threads", "batch_size"))
def eval_command(
    data: Annotated[
        Path, argument("DATA", help="Benchmark file (JSONL, ComVG CSV, SugarCrepe JSON/folder, Winoground, RefCOCOg).")
    ],
    engine: EngineSpec,
    output: Annotated[
        Path | None,
        option(
            "--output", "-o", help="Write metrics and per-example scores (JSON). " + CREATES_FOLDERS, panel=IO_PANEL
        ),
    ] = None,
    data_format: FormatOption = FormatChoice.auto,
    image_root: ImageRootOption = None,
    split: Annotated[str | None, option("--split", help="Evaluate only this split.", panel=IO_PANEL)] = None,
    subset: Annotated[
        list[str] | None,
        option("--subset", help="Evaluate only examples of this subset (repeatable; JSONL 'subset').", panel=IO_PANEL),
    ] = None,
    max_examples: Annotated[
        int | None, option("--max-examples", min=1, help="Evaluate the first N examples only.", panel=IO_PANEL)
    ] = None,
    adaptive: Annotated[
        bool,
        option(
            "--adaptive",
            help="Rank candidate sets by successive elimination (top-1 exact; docs/match.md: Adaptive).",
            panel=ADAPTIVE_PANEL,
        ),
    ] = False,
    schedule: Annotated[
        str | None,
        option(
            "--adaptive-schedule",
            help="Elimination stages, e.g. keep=50%,25%,k:steps=1,4,all (implies --adaptive).",
            panel=ADAPTIVE_PANEL,
        ),
    ] = None,
    shortlist: Annotated[
        str | None,
        option(
            "--shortlist",
            help="Rank each candidate set within a CLIP model's top --shortlist-k (a CLIPModel folder, a hub id or "
            "demo); the report gives the shortlist's recall.",
            panel=ADAPTIVE_PANEL,
        ),
    ] = None,
    shortlist_k: Annotated[
        int, option("--shortlist-k", min=1, help="Candidates the shortlist keeps per query.", panel=ADAPTIVE_PANEL)
    ] = 8,
) -> None:
    """Evaluate zero-shot or with adapters on a benchmark and report its own metrics."""
    from ..jobs.datasets import load_dataset
    from ..jobs.engines import open_engine
    from ..jobs.evaluation import evaluate, write_report

    prepare_output(output, "--output")
    dataset = load_dataset(data, data_format.value, image_root)  # a bad dataset is refused before the model loads
    with open_engine(engine) as scorer, ProgressBar("evaluating", "UNet evals") as progress:
        shortlister = None
        if shortlist is not None:
            from ..jobs.shortlists import open_embedder
            from ..jobs.specs import ShortlistSpec
            from ..runtime.shortlist import Shortlister

            spec = ShortlistSpec(model=shortlist, k=shortlist_k)
            shortlister = Shortlister(open_embedder(spec, scorer), shortlist_k)
        report = evaluate(
            scorer,
            dataset,
            split=split,
            max_examples=max_examples,
            progress=progress,
            subsets=subset or None,
            adaptive=adaptive_schedule(adaptive, schedule),
            shortlist=shortlister,
        )
        report.meta = scorer.describe().to_dict()
        if shortlister is not None:
            report.meta["shortlist"] = {"model": shortlist, "k": shortlist_k}
    print_metrics(report.metrics, f"{dataset.format}: {report.source}" + (f", split {split}" if split else ""))
    if report.evaluations:
        ran = report.evaluations["conditional"] + report.evaluations["unconditional"]
        exhaustive = report.evaluations["exhaustive_conditional"] + report.evaluations["exhaustive_unconditional"]
        say(f"adaptive: {ran:,} UNet evaluations instead of {exhaustive:,} ({exhaustive / max(ran, 1):.1f}x fewer)")
    # Skips were logged once as the dataset was read (the first few by name); here only their count.
    if output is not None:
        write_report(report, output)
        say(f'wrote {output} ({len(report.skipped)} rows or examples skipped, listed under "skipped")')
    elif report.skipped:
        say(f"{len(report.skipped)} rows or examples skipped (the first named above; -o writes every reason)")


@command(adapters_app, "import-discffusion", "Convert the authors' LoRA checkpoint safely.")
def import_discffusion(
    source: Annotated[
        Path, argument("SOURCE", help="The authors' pytorch_model.bin (or a .safetensors with the same keys).")
    ],
    destination: Annotated[
        Path, argument("DESTINATION", help="Where to write the dsdkit adapter (.safetensors). " + CREATES_FOLDERS)
    ],
    model: Annotated[
        str | None, option("--model", help="The SD2 model the LoRA was trained on (default SD2-1-base).")
    ] = None,
) -> None:
    """Convert the authors' released LoRA checkpoint without executing pickled code."""
    from ..pytorch.adapters import import_discffusion_lora, save_adapter
    from ..pytorch.models import load_model
    from ..runtime.config import ScoringConfig

    prepare_output(destination, "DESTINATION")
    sd2 = load_model(model, device="cpu")
    scoring = ScoringConfig()
    adapter = import_discffusion_lora(source, sd2, scoring)
    save_adapter(adapter, destination, sd2.identity(), scoring, extra={"imported_from": source.name})
    say(
        f"wrote {destination}: LoRA rank {adapter.config.rank} on {len(adapter.layer_names)} attention modules "
        f"({adapter.num_parameters():,} parameters)"
    )


@command(adapters_app, "info", "Print an adapter file's header.")
def adapter_info(path: Annotated[Path, argument("PATH", help="An adapter file.")]) -> None:
    """Print an adapter file's header."""
    from ..pytorch.adapters import read_adapter_header

    typer.echo(json.dumps(read_adapter_header(path), indent=1))  # asked for: printed under -q too
