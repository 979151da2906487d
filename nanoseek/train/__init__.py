"""Pretraining: the loop, its config, the expert-bias update, checkpoints and metrics."""

from nanoseek.train.balance import load_imbalance, update_expert_bias
from nanoseek.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from nanoseek.train.config import TrainConfig, TrainError, make_config, read_config_file
from nanoseek.train.loop import train

__all__ = [
    "TrainConfig", "TrainError", "find_checkpoint", "load_checkpoint", "load_imbalance",
    "make_config", "read_config_file", "save_checkpoint", "train", "update_expert_bias",
]  # fmt: skip
