"""Looking into the score: ``explain`` (per-word heat maps of one pair) and ``bench`` (throughput and FLOPs)."""

from __future__ import annotations

import json
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

from ..jobs.specs import EngineSpec
from ..runtime.files import atomic_write_text
from .app import app, command
from .helpers import TinySize
from .options import (
    CREATES_FOLDERS,
    IO_PANEL,
    PERFORMANCE_PANEL,
    CompileMode,
    Scoring,
    argument,
    engine_options,
    option,
    prepare_output,
    scoring_options,
)
from .ui import BenchBars, ProgressBar, say


class HeatScale(str, Enum):
    shared = "shared"
    token = "token"


@command(app, "explain", "Draw per-word attention heat maps of one pair.")
@engine_options(only=("model", "adapters", "device", "dtype", "threads"))
def explain_command(
    image: Annotated[Path, argument("IMAGE", help="An image file.")],
    caption: Annotated[str, argument("CAPTION", help="The caption to explain.")],
    engine: EngineSpec,
    out: Annotated[
        Path,
        option(
            "--out", "-o", help="PNG to write: one heat-map panel per word token. " + CREATES_FOLDERS, panel=IO_PANEL
        ),
    ] = Path("heat.png"),
    scale: Annotated[
        HeatScale, option("--scale", help="shared: one colour scale for all tokens; token: each token's own range.")
    ] = HeatScale.shared,
) -> None:
    """Per-word cross-attention heat maps of one image-caption pair (the attention the score pools)."""
    from ..jobs.engines import open_engine
    from ..pytorch.explain import explain, render_heat_maps

    prepare_output(out, "--out")
    with open_engine(engine) as scorer, ProgressBar("explaining", "UNet passes") as progress:
        explanation = explain(scorer, image, caption, progress=progress)
        layers = len(scorer.layer_names)
    render_heat_maps(explanation, out, caption=caption, scale=scale.value)
    say(
        f"wrote {out}: {len(explanation.tokens)} panels ({', '.join(explanation.tokens)}), "
        f"{len(explanation.timesteps)} timesteps, {layers} layers, score {explanation.score:.4f}"
    )


def _bench_jobs(config: dict, model: str | None, size: TinySize, images: int, captions: int, table: bool) -> list:
    """One job, or the scaling table of docs/performance.md (each row its model size, images x captions and S)."""
    from ..jobs.bench import SCALING_TABLE, BenchConfig

    if not table:
        return [BenchConfig(model=model, size=size.value, images=images, captions=captions, **config)]
    return [
        BenchConfig(size=s, images=n, captions=m, **{**config, "timesteps": steps}) for s, n, m, steps in SCALING_TABLE
    ]


@command(app, "bench", "Time our engines against the authors' cost structure.")
@engine_options(only=("device", "dtype", "threads"), defaults={"device": "cpu"}, scoring={"only": ()})
@scoring_options(
    only=("preset", "num_timesteps", "denoise_term"), defaults={"num_timesteps": 10, "denoise_term": False}
)
def bench_command(
    engine: EngineSpec,
    scoring: Scoring,
    model: Annotated[
        str | None, option("--model", help="SD2 folder (default: a random-weight model of --size).")
    ] = None,
    size: Annotated[
        TinySize, option("--size", help="Random-weight model size when no --model is given.", choices=TinySize)
    ] = TinySize.tiny,
    images: Annotated[int, option("--images", min=1, help="N generated images.")] = 2,
    captions: Annotated[int, option("--captions", min=1, help="M captions.")] = 2,
    batch_size: Annotated[
        list[int] | None, option("--batch-size", min=1, help="UNet batch size (repeatable).", panel=PERFORMANCE_PANEL)
    ] = None,
    engine_names: Annotated[
        list[str] | None,
        option(
            "--engine",
            help="pytorch, pytorch-adaptive, pytorch-compiled, reference, onnxruntime, tensorrt (repeatable; "
            "default pytorch + reference).",
        ),
    ] = None,
    bundle: Annotated[Path | None, option("--bundle", help="Bundle for the onnxruntime and tensorrt engines.")] = None,
    compile_mode: Annotated[
        CompileMode,
        option(
            "--compile-mode",
            help="torch.compile mode of pytorch-compiled (auto: CUDA graphs on a GPU).",
            choices=CompileMode,
            metavar="MODE",
        ),
    ] = CompileMode.auto,
    table: Annotated[
        bool, option("--table", help="Run the scaling table of docs/performance.md instead of one job.")
    ] = False,
    adaptive_schedule: Annotated[
        str,
        option("--adaptive-schedule", help="The pytorch-adaptive engine's schedule, e.g. keep=8,3,k:steps=2,6,all"),
    ] = "default",
    top_k: Annotated[int, option("--top-k", min=1, help="Captions per image pytorch-adaptive keeps exact.")] = 1,
    output: Annotated[
        Path | None, option("--output", "-o", help="Write the JSON record(s) here. " + CREATES_FOLDERS, panel=IO_PANEL)
    ] = None,
) -> None:
    """Throughput of our engines vs the authors' cost structure, side by side, with counted UNet FLOPs."""
    from ..jobs.bench import format_record, run_bench

    prepare_output(output, "--output")
    config = dict(
        preset=scoring.preset or "discffusion",
        timesteps=scoring.knobs["num_timesteps"],
        denoise=scoring.knobs["denoise_term"],
        batch_sizes=batch_size or [8],
        engines=engine_names or ["pytorch", "reference"],
        bundle=None if bundle is None else str(bundle),
        device=engine.device,
        dtype=engine.dtype,
        compile_mode=compile_mode.value,
        adaptive_schedule=adaptive_schedule,
        top_k=top_k,
    )
    jobs = _bench_jobs(config, model, size, images, captions, table)
    records, folders = [], {}
    with tempfile.TemporaryDirectory() as scratch, BenchBars(len(jobs)) as bars:
        for number, job in enumerate(jobs, 1):
            started = time.perf_counter()
            if job.model is None and job.size not in folders:
                from ..pytorch.tiny import write_tiny_model

                bars.job_status(f"writing the random-weight {job.size} model")
                folders[job.size] = write_tiny_model(Path(scratch) / job.size, size=job.size)
            bars.job_status(f"{job.size} model, {job.images}x{job.captions}, S={job.timesteps}")
            progress, status = bars.rows(number)
            record = run_bench(job, folder=folders.get(job.size), progress=progress, status=status)
            bars.job_done()
            record["row_wall_s"] = round(time.perf_counter() - started, 1)
            records.append(record)
            say(format_record(record))
            say(f"(this job took {record['row_wall_s']:.0f} s wall, model writing included)\n")
    if output is not None:
        atomic_write_text(output, json.dumps(records if table else records[0], indent=1) + "\n")
        say(f"wrote {output}")
