"""Data stage: corpus -> byte-level BPE tokenizer -> uint16/uint32 token shards -> batches.

out = prepare("stdlib", "data/stdlib8k")           # or a dir / glob / file / .jsonl / .parquet
tok = Tokenizer.load(out)
loader = BatchLoader(out, "train", batch_size=8, seq_len=256, seed=0)
x, y = loader.get_batch(step)

Names are imported on first use, so `from nanoseek.data.tokenizer import Tokenizer` (the
engine, the server) does not pull in the corpus readers, numpy memmaps and tqdm.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "STDLIB": "corpus",
    "Corpus": "corpus",
    "open_corpus": "corpus",
    "DataError": "errors",
    "BatchLoader": "loader",
    "prepare": "pipeline",
    "check_shards": "shards",
    "open_split": "shards",
    "read_meta": "shards",
    "summary": "shards",
    "CHAT_TEMPLATE": "tokenizer",
    "SPECIAL_TOKENS": "tokenizer",
    "Tokenizer": "tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanoseek.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nanoseek.data.{_EXPORTS[name]}"), name)
