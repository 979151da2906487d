from nanoseek.model.attention import MLA, LayerKV
from nanoseek.model.attention_v4 import Compressor, GroupedLinear, V4Attention, V4Indexer
from nanoseek.model.block_v4 import V4Block
from nanoseek.model.hyper import HyperConnection, HyperHead
from nanoseek.model.indexer import Indexer
from nanoseek.model.moe import MLP, Experts, Gate, MoE
from nanoseek.model.moe_v4 import HashRouter, TopKRouter, V4Experts, V4MoE
from nanoseek.model.transformer import Block, ModelOutput, MTPModule, Transformer
from nanoseek.model.v4 import V4Transformer, generate_v4

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
    # DeepSeek-V4 building blocks
    "HyperConnection",
    "HyperHead",
    "TopKRouter",
    "HashRouter",
    "V4Experts",
    "V4MoE",
    "Compressor",
    "V4Indexer",
    "GroupedLinear",
    "V4Attention",
    "V4Block",
    "V4Transformer",
    "generate_v4",
]
