"""Data stage: corpus -> byte-level BPE tokenizer -> uint16/uint32 token shards -> batches.

out = prepare("stdlib", "data/stdlib8k")           # or a dir / glob / file / .jsonl / .parquet
tok = Tokenizer.load(out)
loader = BatchLoader(out, "train", batch_size=8, seq_len=256, seed=0)
x, y = loader.get_batch(step)
"""

from nanoseek.data.corpus import STDLIB, Corpus, open_corpus
from nanoseek.data.errors import DataError
from nanoseek.data.loader import BatchLoader
from nanoseek.data.pipeline import prepare
from nanoseek.data.shards import check_shards, open_split, read_meta, summary
from nanoseek.data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer

__all__ = [
    "CHAT_TEMPLATE", "SPECIAL_TOKENS", "STDLIB", "BatchLoader", "Corpus", "DataError", "Tokenizer",
    "check_shards", "open_corpus", "open_split", "prepare", "read_meta", "summary",
]  # fmt: skip
