"""dsdkit.train: few-shot adapter training on a frozen SD2 (``train(config)``; ``dsdkit train`` is a thin layer)."""

from .config import LOSSES, TrainConfig
from .trainer import Trainer, TrainResult, split_for_training, train

__all__ = ["LOSSES", "TrainConfig", "Trainer", "TrainResult", "split_for_training", "train"]
