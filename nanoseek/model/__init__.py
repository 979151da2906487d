from nanoseek.model.attention import MLA, LayerKV
from nanoseek.model.indexer import Indexer
from nanoseek.model.moe import MLP, Experts, Gate, MoE
from nanoseek.model.transformer import Block, ModelOutput, MTPModule, Transformer

__all__ = [
    "MLA",
    "LayerKV",
    "Indexer",
    "MLP",
    "Experts",
    "Gate",
    "MoE",
    "Block",
    "MTPModule",
    "ModelOutput",
    "Transformer",
]
