"""The terminal side of the commands: their report lines, tables and progress bars.

Everything a command shows goes through here: :func:`say` for report lines on stdout (silent under ``-q``), rich
tables for summaries, and progress bars on stderr that are drawn only on a terminal. Rich decides colour per stream
(no ANSI codes when a stream is a file or a pipe), and text that comes from the user or the library (file names,
captions, warnings) is printed with markup off, so a ``[`` in a caption is shown as typed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from ..runtime.results import MatchResult

__all__ = [
    "State",
    "say",
    "console",
    "started_progress",
    "ProgressBar",
    "TrainingProgress",
    "PhaseProgress",
    "StageProgress",
    "BenchBars",
    "format_metrics",
    "print_metrics",
    "print_summary",
    "count",
]

logger = logging.getLogger("dsdkit")


class State:
    """What the global options asked for (set once per invocation by the app's callback)."""

    debug = False
    quiet = False


def say(text: str) -> None:
    """Print a command's report on stdout, unless ``-q`` asked for errors only."""
    if not State.quiet:
        typer.echo(text)


def console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr), at least 100 columns wide so that a summary row stays one line when the
    output goes to a file; colour and cursor codes only when the stream is a terminal."""
    from rich.console import Console

    return Console(stderr=stderr, width=None if stderr else max(100, Console().width))


def count(n: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- progress bars ------------------------------------------------------------------------------------------------


def started_progress(label: str, status: str) -> Progress:
    """A started rich progress display on stderr (label, bar, done/total, status, time elapsed and estimated time
    left, each labelled); silent when stderr is not a terminal or under ``-q``, and gone when it ends."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    err = console(stderr=True)
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
        console=err,
        disable=State.quiet or not err.is_terminal,
        transient=True,
    )
    progress.__enter__()
    return progress


class ProgressBar:
    """A bar over a job's UNet evaluations; yields the library's ``progress(total, done) -> advance`` factory."""

    def __init__(self, label: str = "scoring", unit: str = "UNet evals"):
        self.label, self.unit = label, unit

    def __enter__(self):
        self._progress = started_progress(self.label, self.unit)
        return self.make

    def make(self, total: int, done: int):
        task = self._progress.add_task("score", total=total, completed=done)
        return lambda advance: self._progress.advance(task, advance)

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class TrainingProgress:
    """A bar over optimizer steps with the running loss and accuracy; yields the trainer's callbacks."""

    def __enter__(self):
        self._progress = started_progress("training", "{task.fields[status]}")
        self._task = None
        self._losses: list[float] = []
        self._correct: list[float] = []
        return {"on_step_end": [self._on_step], "on_eval_end": [self._on_eval]}

    def _on_step(self, trainer, step: int, loss: float, accuracy: float) -> None:
        if self._task is None:
            self._task = self._progress.add_task("train", total=trainer.total_steps, completed=step - 1, status="")
        self._losses = (self._losses + [loss])[-50:]
        self._correct = (self._correct + [accuracy])[-50:]
        status = f"loss {sum(self._losses) / len(self._losses):.4f}  acc {sum(self._correct) / len(self._correct):.2f}"
        self._progress.update(self._task, completed=step, status=status)

    def _on_eval(self, trainer, metrics: dict, zero_shot: bool) -> None:
        label = "zero-shot" if zero_shot else f"epoch {trainer.state.epoch}"
        logger.info("%s held-out: %s", label, format_metrics(metrics))

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class PhaseProgress:
    """A bar per training phase (VAE, diffusion) with the smoothed loss; yields the step callback."""

    def __enter__(self):
        self._progress = started_progress("{task.description}", "{task.fields[status]}")
        self._tasks: dict[str, Any] = {}
        return self._on_step

    def _on_step(self, phase: str, step: int, total: int, loss: float) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total, completed=step - 1, status="")
        self._progress.update(self._tasks[phase], completed=step, status=f"loss {loss:.4f}")
        if step % 500 == 0 or step == total:  # a log line now and then for runs whose stderr is a file
            logger.info("%s step %d/%d: smoothed loss %.5f", phase, step, total, loss)

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class StageProgress:
    """A bar over a job's steps whose status names the step running now; yields the ``progress(stage, done,
    total)`` callback of :func:`dsdkit.export.export_bundle`."""

    def __init__(self, label: str):
        self.label = label

    def __enter__(self):
        self._progress = started_progress(self.label, "{task.fields[status]}")
        self._task = None
        return self._on_stage

    def _on_stage(self, stage: str, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._progress.add_task(self.label, total=total, completed=done, status=stage)
        else:
            self._progress.update(self._task, completed=done, total=total, status=stage)

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)


class BenchBars:
    """One bar over a benchmark table's jobs (when there are several) and, per job, one over its rows (an engine at
    a batch size) whose status says what runs now: the row, its warm-up, its UNet evaluations."""

    def __init__(self, jobs: int):
        self.jobs = jobs

    def __enter__(self):
        self._bars = started_progress("{task.description}", "{task.fields[status]}")
        self._jobs_bar = self._bars.add_task("bench jobs", total=self.jobs, status="") if self.jobs > 1 else None
        self._rows: list[Any] = []
        return self

    def job_status(self, text: str) -> None:
        if self._jobs_bar is not None:
            self._bars.update(self._jobs_bar, status=text)

    def rows(self, number: int):
        """The ``progress(total, done)`` and ``status(text)`` callbacks of :func:`dsdkit.jobs.bench.run_bench`
        for job ``number``."""
        self._rows = []

        def progress(total: int, done: int):
            name = f"job {number} rows" if self.jobs > 1 else "bench rows"
            self._rows.append(self._bars.add_task(name, total=total, completed=done, status=""))
            return lambda n: self._bars.advance(self._rows[0], n)

        def status(text: str) -> None:
            if self._rows:
                self._bars.update(self._rows[0], status=text)

        return progress, status

    def job_done(self) -> None:
        for task in self._rows:
            self._bars.remove_task(task)
        if self._jobs_bar is not None:
            self._bars.advance(self._jobs_bar, 1)

    def __exit__(self, *exc):
        self._bars.stop()


# -- tables -------------------------------------------------------------------------------------------------------


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if k != "examples" else f"n={int(v)}" for k, v in metrics.items())


def print_metrics(metrics: dict, title: str) -> None:
    if State.quiet:
        return
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, str(int(value)) if name == "examples" else f"{value:.4f}")
    out = console()
    out.print(title, markup=False, highlight=False)
    out.print(table, markup=False, highlight=False)


SCORE_LEGEND = (
    "score: how well the caption fits the image, higher is better (comparable within one image; not a "
    "probability); margin: best minus second-best score"
)


def _tail(name: str, width: int) -> str:
    """A long path shortened from the left, so that the file name (its distinctive end) stays visible."""
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _summary_rows(result: MatchResult, max_rows: int, text_width: int, with_margin: bool) -> list[list[str]]:
    """One row per image (its best caption, the score, the margin to the runner-up), at most ``max_rows``."""
    scores, exact = result.scores, result.exact
    best_two = result.top(2, axis=1)
    rows = []
    for i, name in enumerate(result.images[:max_rows]):
        ranked = best_two[i]
        if not len(ranked):
            rows.append([_tail(name, text_width), "(no pair listed)", "", *([""] if with_margin else [])])
            continue
        best = ranked[0]
        row = [_tail(name, text_width), result.captions[best], f"{scores[i, best]:.4f}"]
        if with_margin:
            if len(ranked) < 2:
                row.append("")
            elif exact[i, ranked[1]]:
                row.append(f"{scores[i, best] - scores[i, ranked[1]]:.4f}")
            else:
                row.append("-")  # the runner-up left an adaptive race early: its score is partial
        rows.append(row)
    return rows


def _summary_notes(result: MatchResult) -> list[str]:
    """The lines under the summary table: warnings, what adaptive ranking saved, the skip count."""
    meta = result.meta
    notes = [f"note: {warning}" for warning in meta.get("warnings", [])]
    spent = meta.get("evaluations")
    if spent and "adaptive" in meta:
        ran = spent["conditional"] + spent["unconditional"]
        exhaustive = spent["exhaustive_conditional"] + spent["exhaustive_unconditional"]
        adaptive = meta["adaptive"]
        notes.append(
            f"adaptive ({adaptive['schedule']}): {ran:,} UNet evaluations instead of {exhaustive:,} "
            f"({exhaustive / max(ran, 1):.1f}x fewer; the top {adaptive['top_k']} per {adaptive['per']} are exact)"
        )
    shortlist = meta.get("shortlist")
    if shortlist:
        ran, exhaustive = shortlist["unet_evaluations"], shortlist["exhaustive_unet_evaluations"]
        notes.append(
            f"shortlist ({shortlist['model']}, top {shortlist['k']} per {shortlist['per']}): DSD scored "
            f"{shortlist['pairs']:,} pairs in {ran:,} UNet evaluations instead of {exhaustive:,} for every pair "
            f"({exhaustive / max(ran, 1):.1f}x fewer); a true caption the shortlist missed cannot be found"
        )
    # Each skip was logged once as it happened (the first few by name), so no second list here: only the count,
    # when no report holds them all (with one, the command's "wrote" line counts them and names the report).
    skipped = meta.get("skipped", {})
    images, lines = len(skipped.get("images", [])), len(skipped.get("caption_lines", []))
    if (images or lines) and not meta.get("skipped_report"):
        notes.append(
            f"skipped {images} images and {lines} caption lines (named above; -o writes every reason to a report)"
        )
    return notes


def print_summary(result: MatchResult, max_rows: int = 20) -> None:
    """The best caption per image as a table on stdout, with a legend that explains its columns."""
    if State.quiet:
        return
    from rich.table import Table
    from rich.text import Text

    out = console()
    with_margin = len(result.captions) > 1  # one caption has no runner-up to compare with
    # The two text columns share what the number columns and the borders leave (each at most 60 wide).
    text_width = min(60, (out.width - 28) // 2)
    legend = SCORE_LEGEND if with_margin else SCORE_LEGEND.partition("; margin")[0]
    if result.held is not None and result.partial.any():
        legend += "; margin -: the runner-up left the adaptive race early (its score is partial)"
    title = f"{count(len(result.images), 'image')} x {count(len(result.captions), 'caption')}: best caption per image"
    table = Table(title=Text(title), caption=Text(legend), caption_justify="left")
    # One row per image stays about one line: long names and captions are shortened (the result file has them
    # whole), instead of wrapping a row over many lines.
    table.add_column("image", no_wrap=True, overflow="ellipsis", max_width=text_width)
    table.add_column("best caption", no_wrap=True, overflow="ellipsis", max_width=text_width)
    table.add_column("score", justify="right", no_wrap=True, min_width=7)
    if with_margin:
        table.add_column("margin", justify="right", no_wrap=True, min_width=7)
    for row in _summary_rows(result, max_rows, text_width, with_margin):
        table.add_row(*row)
    out.print(table, markup=False, highlight=False)
    if len(result.images) > max_rows:
        out.print(f"... {count(len(result.images) - max_rows, 'more image')} in the result file", markup=False)
    for note in _summary_notes(result):
        out.print(note, markup=False, highlight=False)
