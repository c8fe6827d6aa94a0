"""The training configuration, plain data written next to every checkpoint (``train_config.json``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..runtime.errors import ConfigError
from ..runtime.records import record_from_dict

__all__ = ["TrainConfig", "LOSSES", "RESUMABLE_CHANGES"]

LOSSES = ("ce", "bce", "hinge")
#: Fields that may differ between a run and its resumption (everything else must match the checkpoint's config).
RESUMABLE_CHANGES = frozenset({"resume", "epochs", "max_steps", "checkpoint_every", "device", "max_eval_examples"})


@dataclass
class TrainConfig:
    """Everything a training run depends on.

    Attributes:
        data: dataset file (or SugarCrepe folder); see :mod:`dsdkit.jobs.datasets`.
        output: run folder: ``train_config.json``, ``checkpoints/``, ``latest.json``, ``history.jsonl`` and the final
            ``adapter.safetensors``.
        model: SD2 folder or hub id (default: stabilityai/stable-diffusion-2-1-base).
        format, image_root: how to read ``data`` (``auto`` guesses the format; images default to its folder).
        adapter, rank: ``kv-prompt`` (default, rank 8) or ``lora`` (rank 4).
        preset, scoring: the scoring preset and knob overrides (``{"num_timesteps": 10, "denoise_term": False}``).
        loss: ``ce`` (softmax over candidates, default), ``bce`` (paper Eq. 6 with a learned affine calibration) or
            ``hinge`` (the authors': margin on the hardest negative).
        shots, fraction, first: few-shot selection of the training examples (seeded random unless ``first``).
        train_split, eval_split, eval_fraction: which examples train and which are held out (see
            :func:`split_for_training`).
        epochs, max_steps, batch_size: examples per optimizer step (all their candidates in one UNet batch).
        lr, weight_decay, grad_clip: AdamW and gradient clipping (the authors': 1e-4, 1e-2, 1.0).
        precision: the frozen UNet's precision (fp32, bf16, fp16 on CUDA); adapters and optimizer stay fp32.
        gradient_checkpointing: trade compute for activation memory in the UNet.
        checkpoint_every: optimizer steps between checkpoints (a checkpoint is also written after each epoch).
        eval_every_epoch: evaluate on the held-out examples after each epoch.
        resume: continue from the run folder's latest checkpoint.
    """

    data: str
    output: str = "dsd-run"
    model: str | None = None
    format: str = "auto"
    image_root: str | None = None
    adapter: str = "kv-prompt"
    rank: int | None = None
    preset: str = "discffusion"
    scoring: dict[str, Any] = field(default_factory=dict)
    loss: str = "ce"
    margin: float = 0.1
    shots: int | None = None
    fraction: float | None = None
    first: bool = False
    train_split: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.2
    max_eval_examples: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    device: str | None = None
    seed: int = 0
    checkpoint_every: int = 100
    eval_every_epoch: bool = True
    eval_batch_size: int = 16
    resume: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ConfigError("epochs, batch_size and checkpoint_every must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return record_from_dict(cls, data, "training config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields that differ from ``other`` and may not change when a run is resumed."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k])
