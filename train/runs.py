"""What every from-scratch training run of dsdkit shares (the demo world model, its mini-CLIP): the run folder with
its recipe, atomic checkpoints and ``latest.json``; per-step randomness that is a pure function of (seed, phase,
step); the learning-rate schedule; and the bookkeeping that ends each optimizer step.

A run killed at any point and resumed from its latest checkpoint (weights and optimizer moments) ends with
bit-identical weights at the same thread count: everything a step draws comes from :func:`step_random`, never from a
generator that carries state across steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import ConfigError, ModelError, TrainingError
from ..runtime.files import atomic_write_text, output_error, staged_folder

__all__ = ["RunFolder", "PhaseProgress", "begin_run", "step_random", "cosine_lr", "resumed_ema"]

logger = logging.getLogger(__name__)

#: ``on_step(phase, step, total, smoothed_loss)`` after each optimizer step.
StepCallback = Callable[[str, int, int, float], None]


def begin_run(folder: Path, recipe, resume: bool, resumable: frozenset[str], kind: str) -> None:
    """Start the run in ``folder`` (writing ``recipe.json``) or, with ``resume``, check that the recipe is the run's
    own (but for the ``resumable`` fields); a finished or started run is never overwritten."""
    recipe_path = folder / "recipe.json"
    if recipe_path.is_file():
        if not resume:
            raise ConfigError(
                f"{folder} already holds a {kind} run; pass `resume` to continue it, or a new folder", field="resume"
            )
        saved = type(recipe).from_file(recipe_path)
        differing = [
            f.name
            for f in dataclasses.fields(recipe)
            if f.name not in resumable and getattr(saved, f.name) != getattr(recipe, f.name)
        ]
        if differing:
            raise ConfigError(
                f"{folder}: `resume` with a different recipe ({', '.join(differing)}); resume with the run's own "
                "recipe.json"
            )
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    atomic_write_text(recipe_path, json.dumps(recipe.to_dict(), indent=1) + "\n")


def step_random(seed: int, phase_index: int, step: int):
    """The numpy rng and torch generator of one step: a pure function of (seed, phase, step)."""
    import torch

    sequence = np.random.SeedSequence([seed, phase_index, step])
    rng = np.random.default_rng(sequence)
    generator = torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0] >> 1))
    return rng, generator


def cosine_lr(peak: float, total: int, warmup: int, floor: float, step: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` x ``peak`` at step ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def resumed_ema(log: list[dict], phase: str, start: int) -> float | None:
    """The smoothed loss of the checkpoint a phase resumes from (logged exactly), so a resumed run logs the same."""
    if start > 0 and log and log[-1].get("phase", phase) == phase and log[-1]["step"] == start:
        return float(log[-1]["loss_ema"])
    return None


class PhaseProgress:
    """What ends every optimizer step of a phase: the NaN guard, the smoothed loss, progress, and at each checkpoint
    a log entry and the atomic save (``save(steps_done)``)."""

    def __init__(
        self,
        phase: str,
        total: int,
        checkpoint_every: int,
        log: list[dict],
        save: Callable[[int], Any],
        on_step: StepCallback | None = None,
        decay: float = 0.98,
        smoothed: float | None = None,
    ):
        self.phase, self.total, self.every = phase, total, checkpoint_every
        self.log, self.save, self.on_step, self.decay = log, save, on_step, decay
        self.smoothed = smoothed

    def end(self, step: int, loss, extra: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> None:
        """After step ``step`` (0-based) with ``loss``; ``extra``: more log fields (a callable: computed only at a
        checkpoint)."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"{self.phase} loss became {value} at step {step}; the last checkpoint is kept")
        self.smoothed = value if self.smoothed is None else self.decay * self.smoothed + (1 - self.decay) * value
        done = step + 1
        if self.on_step is not None:
            self.on_step(self.phase, done, self.total, self.smoothed)
        if done % self.every == 0 or done == self.total:
            fields = extra() if callable(extra) else (extra or {})
            self.log.append({"phase": self.phase, "step": done, "loss_ema": self.smoothed, **fields})
            self.save(done)


class RunFolder:
    """The run folder: ``recipe.json``, ``checkpoints/<phase>-<step>/`` (weights, AdamW moments, ``state.json``)
    and ``latest.json``, each written atomically; ``phases`` orders checkpoints of different phases."""

    def __init__(self, folder: Path, phases: Sequence[str]):
        self.folder = Path(folder)
        self.phases = tuple(phases)

    def latest(self) -> tuple[str, int, Path] | None:
        pointer = self.folder / "latest.json"
        if not pointer.is_file():
            return None
        try:
            data = json.loads(pointer.read_text(encoding="utf-8"))
            phase, step, path = data["phase"], int(data["step"]), self.folder / data["path"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ModelError(f"{pointer} is damaged; delete it to start the run over") from None
        if not (path / "state.json").is_file():
            raise ModelError(f"{pointer} points at {path}, which is incomplete; delete latest.json to start over")
        return phase, step, path

    def save(self, phase: str, step: int, modules: dict, optimizer, log: list[dict], **meta: Any) -> Path:
        """A checkpoint of ``modules`` (their tensors prefixed by name) and the optimizer; ``meta`` goes into its
        ``state.json``. Earlier checkpoints are dropped once it is in place."""
        import torch
        from safetensors.torch import save

        from .checkpoint import optimizer_tensors

        final = self.folder / "checkpoints" / f"{phase}-{step:08d}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise output_error(final.parent, exc) from None
        tensors = {
            f"{name}.{key}": value.detach().cpu().contiguous()
            for name, module in modules.items()
            for key, value in module.state_dict().items()
        }
        optim, optim_meta = optimizer_tensors(optimizer)
        state = {"phase": phase, "step": step, "optimizer": optim_meta, "log": log, **meta}
        state["threads"] = torch.get_num_threads()
        with staged_folder(final) as tmp:
            (tmp / "weights.safetensors").write_bytes(save(tensors))
            (tmp / "optimizer.safetensors").write_bytes(save(optim))
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        atomic_write_text(
            self.folder / "latest.json",
            json.dumps({"phase": phase, "step": step, "path": str(final.relative_to(self.folder))}) + "\n",
        )
        # Each checkpoint holds all weights; a later one, left by a run restarted from an earlier pointer, is kept.
        for old in (self.folder / "checkpoints").glob("*-*"):
            if (
                old != final
                and old.is_dir()
                and not old.name.startswith(".")
                and self._order(old) < self._order(final)
            ):
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _order(self, path: Path) -> tuple[int, int]:
        phase, _, step = path.name.rpartition("-")
        return (self.phases.index(phase), int(step)) if phase in self.phases and step.isdigit() else (-1, -1)

    def load(self, path: Path, modules: dict, optimizer=None) -> dict[str, Any]:
        """Restore ``modules`` (and the optimizer's moments) from a checkpoint; returns its ``state.json``."""
        import torch
        from safetensors.torch import load_file

        from .checkpoint import restore_optimizer

        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if optimizer is not None and state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            logger.warning(
                "%s was written with %d threads, this run uses %d: floating-point sums may round differently, so the "
                "result will not be bit-identical to an uninterrupted run (pass --threads %d for that)",
                path,
                state["threads"],
                torch.get_num_threads(),
                state["threads"],
            )
        weights = load_file(str(path / "weights.safetensors"))
        for name, module in modules.items():
            prefix = f"{name}."
            module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
        if optimizer is not None:
            restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
        return state
