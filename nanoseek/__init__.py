"""nanoseek: a small, fast, readable DeepSeek-V3 / R1 in PyTorch."""

from nanoseek.config import ModelConfig, get_preset, param_counts
from nanoseek.hub import CheckpointError, from_pretrained, save_pretrained
from nanoseek.model import Transformer

__version__ = "0.1.0"
__all__ = [
    "ModelConfig",
    "get_preset",
    "param_counts",
    "Transformer",
    "from_pretrained",
    "save_pretrained",
    "CheckpointError",
]
