"""Training checkpoints: safetensors and JSON only (nothing is pickled), written atomically.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding

- ``adapter.safetensors``: the adapter, with its JSON header (usable on its own, like the final adapter);
- ``state.safetensors``: optimizer moments, loss calibration, the noise generator's state;
- ``state.json``: step, epoch, position in the epoch, optimizer hyper-parameters, history.

It is written to a temporary folder beside it (``runtime.files.staged_folder``: fsynced, then renamed into place);
``latest.json`` (itself replaced atomically) then points at it. A crash at any moment leaves the previous checkpoint
and ``latest.json`` intact; a full disk is an ``OutputError`` naming the checkpoint, with nothing half-written left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..runtime.errors import ModelError
from ..runtime.files import atomic_write_text, output_error, staged_folder

__all__ = [
    "TrainerState",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "optimizer_tensors",
    "restore_optimizer",
]


@dataclass
class TrainerState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of the current epoch already consumed
    history: list[dict[str, Any]] | None = None
    # Running sums of the current epoch (part of the state, so a resumed epoch reports the same summary).
    epoch_loss_sum: float = 0.0
    epoch_steps: int = 0
    epoch_correct: int = 0
    epoch_seen: int = 0


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    run: Path, adapter_bytes: bytes, optimizer, loss_module, generator: torch.Generator, state: TrainerState
) -> Path:
    """Write a checkpoint for ``state.step`` and point ``latest.json`` at it."""
    from safetensors.torch import save

    folder = run / "checkpoints"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    final = folder / f"step-{state.step:08d}"
    tensors, optimizer_meta = optimizer_tensors(optimizer)
    for name, value in loss_module.state_dict().items():
        tensors[f"loss.{name}"] = value.detach().cpu().contiguous()
    tensors["generator.state"] = generator.get_state()
    meta = {
        "step": state.step,
        "epoch": state.epoch,
        "position": state.position,
        "epoch_loss_sum": state.epoch_loss_sum,
        "epoch_steps": state.epoch_steps,
        "epoch_correct": state.epoch_correct,
        "epoch_seen": state.epoch_seen,
        "optimizer": optimizer_meta,
        "history": state.history or [],
    }
    with staged_folder(final) as tmp:
        (tmp / "adapter.safetensors").write_bytes(adapter_bytes)
        (tmp / "state.safetensors").write_bytes(save(tensors))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    atomic_write_text(
        run / "latest.json", json.dumps({"step": state.step, "path": str(final.relative_to(run))}) + "\n"
    )
    return final


def latest_checkpoint(run: Path) -> Path | None:
    pointer = run / "latest.json"
    if not pointer.is_file():
        return None
    try:
        path = run / json.loads(pointer.read_text(encoding="utf-8"))["path"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ModelError(
            f"{pointer} is damaged; delete it to start over, or point it at a checkpoints/step-* folder"
        ) from None
    if not (path / "state.json").is_file():
        raise ModelError(f"{pointer} points at {path}, which is incomplete; delete latest.json to start over")
    return path


def load_checkpoint(path: Path, adapter, optimizer, loss_module, generator: torch.Generator) -> TrainerState:
    """Restore adapter weights, optimizer moments, loss calibration and the generator from ``path``."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "state.safetensors"))
    adapter_tensors = load_file(str(path / "adapter.safetensors"))
    device = next(adapter.parameters()).device
    adapter.load_flat_state({k: v.to(device) for k, v in adapter_tensors.items()})
    loss_module.load_state_dict(
        {k.removeprefix("loss."): v.to(device) for k, v in tensors.items() if k.startswith("loss.")}
    )
    restore_optimizer(
        optimizer,
        {
            k: v.to(device) if k.split(".", 2)[2] != "step" else v
            for k, v in tensors.items()
            if k.startswith("optimizer.")
        },
        meta["optimizer"],
    )
    generator.set_state(tensors["generator.state"])
    return TrainerState(
        step=meta["step"],
        epoch=meta["epoch"],
        position=meta["position"],
        history=meta["history"],
        epoch_loss_sum=meta["epoch_loss_sum"],
        epoch_steps=meta["epoch_steps"],
        epoch_correct=meta["epoch_correct"],
        epoch_seen=meta["epoch_seen"],
    )


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Load what :func:`optimizer_tensors` saved (tensors already on the parameters' device) into ``optimizer``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
