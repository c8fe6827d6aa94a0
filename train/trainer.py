"""The few-shot trainer: adapters on a frozen SD2, a short loop with callbacks (minGPT style).

One optimizer step takes ``batch_size`` examples. For each example one timestep (from the scoring config's set) and
one noise ε are drawn and shared by all its candidates, so the candidates are compared under identical noise; all
candidates (and, where the loss needs them, the unconditional passes of their images) of all examples of the step
run as **one** UNet batch, followed by one backward.

Events (``trainer.add_callback(event, fn)``; ``fn(trainer, **info)``): ``on_step_end`` (step, loss, accuracy),
``on_eval_end`` (metrics), ``on_checkpoint`` (path), ``on_epoch_end`` (epoch).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..jobs.datasets import Dataset, Example, TaskKind, few_shot, load_dataset
from ..jobs.evaluation import compute_metrics, score_examples
from ..pytorch.adapters import AdapterConfig, adapter_file_bytes, create_adapter
from ..pytorch.forward import ScoringForward
from ..pytorch.models import SD2Model, load_model
from ..pytorch.scorer import Scorer
from ..runtime.config import resolve_scoring
from ..runtime.errors import ConfigError, TrainingError
from ..runtime.files import atomic_write_bytes, atomic_write_text
from .checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .losses import CandidateLoss

__all__ = ["Trainer", "TrainResult", "train", "split_for_training", "primary_metric"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    zero_shot_metrics: dict[str, float] = field(default_factory=dict)


def split_for_training(dataset: Dataset, config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples.

    ``eval_split`` given: those examples are held out (and ``train_split``, if given, trains; else the rest).
    Otherwise a dataset with a ``train`` split trains on it and holds out ``val`` (or ``test``); a dataset without
    splits holds out a seeded ``eval_fraction`` of its examples.
    """
    splits = dataset.splits()
    if config.eval_split is not None:
        held_out = dataset.select(config.eval_split)
        if config.train_split is not None:
            training = dataset.select(config.train_split)
        else:
            training = [e for e in dataset.examples if e.split != config.eval_split]
    elif config.train_split is not None or "train" in splits:
        training = dataset.select(config.train_split or "train")
        other = next((s for s in ("val", "validation", "test") if s in splits), None)
        held_out = dataset.select(other) if other else []
    else:
        order = np.random.default_rng(config.seed).permutation(len(dataset.examples))
        count = int(round(config.eval_fraction * len(order)))
        held_index = set(order[:count].tolist())
        held_out = [e for i, e in enumerate(dataset.examples) if i in held_index]
        training = [e for i, e in enumerate(dataset.examples) if i not in held_index]
    if not training:
        raise TrainingError(f"{dataset.source}: no training examples left after holding out the evaluation split")
    return training, held_out


def _trainable(examples: list[Example], loss: str) -> list[Example]:
    """Winoground-style groups train as two image-to-text examples; labelled pairs need the bce loss."""
    out = []
    for example in examples:
        if example.kind is TaskKind.group:
            for i in range(2):
                out.append(
                    Example(
                        TaskKind.image_to_text,
                        [example.images[i]],
                        list(example.texts),
                        positive=i,
                        split=example.split,
                        id=f"{example.id}/image{i}",
                    )
                )
        elif example.kind is TaskKind.pair and loss != "bce":
            raise ConfigError(
                "the dataset holds labelled pairs, which have no candidates to compare; use bce as `loss`",
                field="loss",
            )
        else:
            out.append(example)
    return out


def primary_metric(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The headline number of a metrics dict (for progress lines and model selection)."""
    for name in ("accuracy/overall", "top1", "group", "auc", "accuracy/best_threshold"):
        if name in metrics:
            return name, metrics[name]
    return None


class Trainer:
    """Trains one adapter; see the module docstring. Build it, add callbacks, call :meth:`run`."""

    def __init__(self, config: TrainConfig, model: SD2Model | None = None):
        self.config = config
        self.run_dir = Path(config.output)
        self.callbacks: dict[str, list[Callable]] = defaultdict(list)
        self._model = model
        self.state = TrainerState(history=[])

    def add_callback(self, event: str, callback: Callable) -> None:
        self.callbacks[event].append(callback)

    def trigger(self, event: str, **info) -> None:
        for callback in self.callbacks[event]:
            callback(self, **info)

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        resolve_scoring(cfg.preset, None, cfg.scoring)  # bad knobs are refused before anything loads
        self.dataset = load_dataset(cfg.data, cfg.format, cfg.image_root, seed=cfg.seed)
        training, held_out = split_for_training(self.dataset, cfg)
        training = few_shot(training, cfg.shots, cfg.fraction, cfg.first, seed=cfg.seed)
        self.train_examples = _trainable(training, cfg.loss)
        self.eval_examples = held_out[: cfg.max_eval_examples] if cfg.max_eval_examples else held_out
        logger.info("training on %d examples, evaluating on %d", len(self.train_examples), len(self.eval_examples))

        self.model = self._model or load_model(cfg.model, device=cfg.device, dtype=cfg.precision)
        # Under the context the model declares, so the adapter's header pins the score it was trained with.
        self.scoring = resolve_scoring(cfg.preset, None, cfg.scoring, model=self.model.declaration)
        if cfg.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.encoder = Scorer(self.model, self.scoring, batch_size=cfg.eval_batch_size)
        self.adapter = create_adapter(
            self.model, self.scoring, AdapterConfig(kind=cfg.adapter, rank=cfg.rank, init_seed=cfg.seed)
        )
        self.forward = ScoringForward(self.model, self.scoring, self.adapter, self.encoder.layer_names)
        self.loss_fn = CandidateLoss(cfg.loss, cfg.margin).to(self.model.device)
        parameters = list(self.adapter.parameters()) + list(self.loss_fn.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        use_scaler = cfg.precision == "fp16" and self.model.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.steps_per_epoch = math.ceil(len(self.train_examples) / cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self._prepare_run_folder()

    def _prepare_run_folder(self) -> None:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        saved_config = self.run_dir / "train_config.json"
        latest = latest_checkpoint(self.run_dir)
        if latest is not None and not cfg.resume:
            raise ConfigError(
                f"{self.run_dir} already holds a run (latest checkpoint {latest.name}); pass `resume` to continue it "
                "or choose another `output`"
            )
        if latest is not None:
            if not saved_config.is_file():
                raise ConfigError(
                    f"{self.run_dir} has checkpoints but no train_config.json; it cannot be resumed safely"
                )
            previous = TrainConfig.from_dict(json.loads(saved_config.read_text(encoding="utf-8")))
            changed = cfg.differences(previous)
            if changed:
                raise ConfigError(
                    f"cannot resume {self.run_dir}: {', '.join(changed)} differ from the saved run's "
                    "train_config.json; resume with the same settings or choose another `output`"
                )
            self.state = load_checkpoint(latest, self.adapter, self.optimizer, self.loss_fn, self.generator)
            logger.info("resumed %s at step %d (epoch %d)", self.run_dir, self.state.step, self.state.epoch)
        elif cfg.resume:
            logger.info("%s has no checkpoint yet: starting a new run", self.run_dir)
        atomic_write_text(saved_config, cfg.to_json() + "\n")
        # The rows and examples training leaves out (bad rows, unusable images), next to the run's other records.
        skipped = [{"where": where, "reason": why} for where, why in self.dataset.skipped]
        atomic_write_text(self.run_dir / "skipped.json", json.dumps(skipped, indent=1, ensure_ascii=False) + "\n")

    # -- one step ------------------------------------------------------------------------------------------------

    def _step(self, examples: list[Example]) -> tuple[float, int]:
        """One optimizer step on ``examples``; returns (mean loss, number correct)."""
        cfg, scoring, encoder = self.config, self.scoring, self.encoder
        latents, states, masks, steps, noises = [], [], [], [], []
        plans = []  # per example: cond item indices per candidate, uncond item index per candidate (or None)
        empty = encoder.empty_caption
        for example in examples:
            step = int(torch.randint(len(encoder.timesteps), (1,), generator=self.generator))
            noise = torch.randn(encoder.noise.shape[1:], generator=self.generator).to(self.model.device)
            images = encoder.encode_images(example.images)
            texts = encoder.encode_texts(
                example.texts, where=[f"{example.id} caption {j}" for j in range(len(example.texts))]
            )

            def add(latent, text_states, text_mask, step=step, noise=noise):
                latents.append(latent)
                states.append(text_states)
                masks.append(text_mask)
                steps.append(step)
                noises.append(noise)
                return len(latents) - 1

            cond = [add(images[i].latent, texts[j].states, texts[j].mask) for i, j in example.candidate_pairs()]
            # With a shift-invariant loss on candidates of one image, the image's unconditional terms cancel.
            needs_uncond = scoring.needs_unconditional_pass and not (
                example.kind is TaskKind.image_to_text and cfg.loss != "bce"
            )
            uncond = None
            if needs_uncond:
                slots = {
                    i: add(images[i].latent, empty.states, empty.mask)
                    for i in sorted({i for i, _ in example.candidate_pairs()})
                }
                uncond = [slots[i] for i, _ in example.candidate_pairs()]
            plans.append((example, cond, uncond))

        # Encodings are cached inference tensors; clone them so autograd may save them.
        batch_latents = torch.stack(latents).clone()
        noising = encoder.noising(torch.tensor(steps))._replace(noise=torch.stack(noises))
        layers, errors = self.forward(batch_latents, noising, torch.stack(states).clone(), torch.stack(masks).clone())
        losses, correct = [], 0
        for example, cond, uncond in plans:
            c_layers, c_errors = layers[cond][:, None, :], errors[cond][:, None]
            if uncond is not None:
                u_layers, u_errors = layers[uncond][:, None, :], errors[uncond][:, None]
            else:
                u_layers, u_errors = torch.zeros_like(c_layers), torch.zeros_like(c_errors)
            per_step, _, _ = self.forward.combine(c_layers, c_errors, u_layers, u_errors)
            scores = per_step[:, 0]
            losses.append(self.loss_fn(scores, example.positive, example.label))
            correct += self.loss_fn.correct(scores.detach(), example.positive, example.label)
        loss = torch.stack(losses).mean()
        if not torch.isfinite(loss):
            latest = latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
            raise TrainingError(
                f"loss became {loss.item()} at step {self.state.step + 1}; {kept}; lower `lr` or use fp32 as "
                "`precision`"
            )
        self.optimizer.zero_grad(set_to_none=True)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, cfg.grad_clip)
            self.optimizer.step()
        return float(loss.detach()), correct

    # -- evaluation and checkpoints ------------------------------------------------------------------------------

    def evaluate(self, zero_shot: bool = False) -> dict[str, float]:
        """Metrics on the held-out examples with the adapter being trained (or none, ``zero_shot``)."""
        if not self.eval_examples:
            return {}
        scorer = self.encoder.with_adapter(None if zero_shot else self.adapter)
        matrices = score_examples(scorer, self.eval_examples)
        return compute_metrics(self.dataset.format, self.eval_examples, matrices)

    def _adapter_bytes(self) -> bytes:
        return adapter_file_bytes(
            self.adapter,
            self.model.identity(),
            self.scoring,
            extra={"trained_steps": self.state.step, "loss": self.config.loss},
        )

    def checkpoint(self) -> Path:
        path = save_checkpoint(
            self.run_dir, self._adapter_bytes(), self.optimizer, self.loss_fn, self.generator, self.state
        )
        atomic_write_text(
            self.run_dir / "history.jsonl", "".join(json.dumps(h) + "\n" for h in self.state.history or [])
        )
        self.trigger("on_checkpoint", path=path)
        return path

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        if not hasattr(self, "adapter"):
            self.setup()
        cfg, state = self.config, self.state
        zero_shot = {}
        if state.step == 0 and cfg.eval_every_epoch and self.eval_examples:
            zero_shot = self.evaluate(zero_shot=True)
            state.history.append({"step": 0, "epoch": 0, "eval": zero_shot, "zero_shot": True})
            self.trigger("on_eval_end", metrics=zero_shot, zero_shot=True)
        while state.step < self.total_steps and state.epoch < cfg.epochs:
            order = np.random.default_rng([cfg.seed, state.epoch]).permutation(len(self.train_examples))
            while state.position < len(order) and state.step < self.total_steps:
                batch = [self.train_examples[i] for i in order[state.position : state.position + cfg.batch_size]]
                loss, correct = self._step(batch)
                state.step += 1
                state.position += len(batch)
                state.epoch_loss_sum += loss
                state.epoch_steps += 1
                state.epoch_correct += correct
                state.epoch_seen += len(batch)
                if state.step % cfg.checkpoint_every == 0 and state.step < self.total_steps:
                    self.checkpoint()
                self.trigger("on_step_end", step=state.step, loss=loss, accuracy=correct / len(batch))
            if state.position >= len(order):
                summary = {
                    "step": state.step,
                    "epoch": state.epoch + 1,
                    "train_loss": state.epoch_loss_sum / max(state.epoch_steps, 1),
                    "train_accuracy": state.epoch_correct / max(state.epoch_seen, 1),
                }
                state.epoch += 1
                state.position = 0
                state.epoch_loss_sum, state.epoch_steps, state.epoch_correct, state.epoch_seen = 0.0, 0, 0, 0
                if cfg.eval_every_epoch and self.eval_examples:
                    summary["eval"] = self.evaluate()
                    self.trigger("on_eval_end", metrics=summary["eval"], zero_shot=False)
                state.history.append(summary)
                self.trigger("on_epoch_end", epoch=state.epoch)
                if state.step < self.total_steps:
                    self.checkpoint()
        self.checkpoint()
        final = self.run_dir / "adapter.safetensors"
        atomic_write_bytes(final, self._adapter_bytes())
        last_eval = next((h["eval"] for h in reversed(state.history) if "eval" in h and not h.get("zero_shot")), {})
        zero_shot = next((h["eval"] for h in state.history if h.get("zero_shot")), zero_shot)
        logger.info("wrote %s after %d steps", final, state.step)
        return TrainResult(final, state.step, list(state.history), last_eval, zero_shot)


def train(
    config: TrainConfig, callbacks: dict[str, list[Callable]] | None = None, model: SD2Model | None = None
) -> TrainResult:
    """Train an adapter as ``config`` says; the library form of ``dsdkit train``.

    Args:
        config: the run's configuration.
        callbacks: ``{event: [fn, ...]}`` attached before the run (see the module docstring).
        model: an already loaded model to train on (else ``config.model`` is loaded).
    """
    trainer = Trainer(config, model=model)
    for event, functions in (callbacks or {}).items():
        for function in functions:
            trainer.add_callback(event, function)
    trainer.setup()
    return trainer.run()
