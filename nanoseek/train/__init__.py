"""Training: the runtime (one process or many), the pretraining loop, its config and budget,
the expert-bias update, checkpoints and exact resume, metrics. SFT and GRPO loops reuse
`Runtime`, `run` and `checkpoint`."""

from nanoseek.train.balance import load_imbalance, update_expert_bias
from nanoseek.train.budget import Budget
from nanoseek.train.checkpoint import RunState, find_checkpoint, load_checkpoint, save_checkpoint
from nanoseek.train.config import TrainConfig, TrainError, make_config, read_config_file
from nanoseek.train.pretrain import train
from nanoseek.train.runtime import Runtime

__all__ = [
    "Budget",
    "RunState",
    "Runtime",
    "TrainConfig",
    "TrainError",
    "find_checkpoint",
    "load_checkpoint",
    "load_imbalance",
    "make_config",
    "read_config_file",
    "save_checkpoint",
    "train",
    "update_expert_bias",
]
