"""Token shards: each split as one flat memory-mapped array of token ids (`train.bin`,
`val.bin`), every document written as <|bos|> tokens <|eos|>, described by `meta.json`.

meta.json is written last, so its presence means the shards are complete; it records the
tokenizer hash and token counts, which catch a stale or truncated shard before training
reads it.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanoseek.data.corpus import Corpus
from nanoseek.data.errors import DataError
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.utils import atomic_path, atomic_write_text, read_json

FORMAT = 1
META = "meta.json"
SPLITS = ("train", "val")
BATCH_CHARS = 4_000_000  # text handed to one parallel encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_shards(corpus: Corpus, tok: Tokenizer, out_dir: Path, verbose: bool = True) -> dict:
    out_dir = Path(out_dir)
    dtype = token_dtype(tok.vocab_size)
    stats = {s: {"file": f"{s}.bin", "documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    t0 = time.time()
    bar = tqdm(
        total=corpus.total_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        file=sys.stderr,
        disable=not verbose or None,
    )
    with ExitStack() as stack:
        tmps = {s: stack.enter_context(atomic_path(out_dir / f"{s}.bin")) for s in SPLITS}
        files = {s: stack.enter_context(open(tmps[s], "wb")) for s in SPLITS}

        def flush(batch: list[tuple[str, str]]) -> None:
            ids = tok.encode_batch([text for _, text in batch])
            for split in SPLITS:
                docs = [d for (s, _), d in zip(batch, ids, strict=True) if s == split]
                if not docs:
                    continue
                n = sum(len(d) + 2 for d in docs)
                flat = itertools.chain.from_iterable([tok.bos_id, *d, tok.eos_id] for d in docs)
                files[split].write(np.fromiter(flat, dtype=dtype, count=n).tobytes())
                stats[split]["documents"] += len(docs)
                stats[split]["tokens"] += n
            batch.clear()

        batch, chars, last = [], 0, None
        for split, path, text in corpus.split_documents():
            if path != last:  # progress in file bytes: exact for any file type
                if last is not None:
                    bar.update(last.stat().st_size)
                last = path
            batch.append((split, text))
            stats[split]["bytes"] += len(text.encode("utf-8"))
            chars += len(text)
            if chars >= BATCH_CHARS:
                flush(batch)
                chars = 0
        flush(batch)
        bar.update(bar.total - bar.n)  # skipped files never reported progress
        bar.close()
        for f in files.values():
            f.close()
    meta = {
        "format": FORMAT,
        "source": corpus.describe(),
        "tokenizer": {
            "hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "dtype": dtype.name,
        "skipped_files": [corpus.name(p) for p in corpus.skipped_files],
        "skipped_lines": corpus.skipped_lines,
        "splits": stats,
        "build_seconds": round(time.time() - t0, 2),
    }
    atomic_write_text(out_dir / META, json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / META
    if not path.is_file():
        raise DataError(
            f"no {META} in {out_dir}; build shards with `nanoseek data prepare --data ... --out {out_dir}`"
        )
    meta = read_json(
        path, "shard metadata", DataError, "delete it and run `nanoseek data prepare` again"
    )
    if meta.get("format") != FORMAT:
        raise DataError(
            f"{path}: shard format {meta.get('format')} is not {FORMAT}; rebuild with `nanoseek data prepare`"
        )
    return meta


def check_shards(out_dir: str | Path, meta: dict) -> None:
    """Raise DataError if a shard's size disagrees with meta.json, or the tokenizer beside
    the shards is not the one they were built with."""
    out_dir = Path(out_dir)
    tok_file = out_dir / "tokenizer.json"
    if tok_file.is_file() and (h := Tokenizer.load(tok_file).hash) != meta["tokenizer"]["hash"]:
        raise DataError(
            f"{out_dir}: shards were built with tokenizer {meta['tokenizer']['hash']} but "
            f"tokenizer.json is {h}; delete {out_dir / META} and run `nanoseek data prepare` again"
        )
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, s in meta["splits"].items():
        path = out_dir / s["file"]
        expected = s["tokens"] * itemsize
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            found = "missing" if size is None else f"{size:,} bytes"
            raise DataError(
                f"{path}: {found}, but {META} says {s['tokens']:,} {meta['dtype']} tokens "
                f"({expected:,} bytes); the {split} shard is corrupt: delete {out_dir / META} "
                "and run `nanoseek data prepare` again"
            )


def open_split(out_dir: str | Path, split: str, meta: dict | None = None) -> np.memmap:
    meta = meta or read_meta(out_dir)
    if split not in meta["splits"]:
        raise DataError(f"{out_dir}: no split {split!r}; choose one of {', '.join(meta['splits'])}")
    check_shards(out_dir, meta)
    s = meta["splits"][split]
    if s["tokens"] == 0:
        raise DataError(f"{out_dir}: the {split} split is empty; add more text to the corpus")
    return np.memmap(Path(out_dir) / s["file"], dtype=meta["dtype"], mode="r")


def summary(meta: dict, out_dir: Path, note: str = "") -> str:
    src, tok = meta["source"], meta["tokenizer"]
    skipped = len(meta["skipped_files"])
    lines = [
        f"{out_dir}{note}",
        f"  source     {src['data']}: {src['files']:,} files, {src['file_bytes'] / 1e6:.1f} MB, "
        f"{skipped} skipped (not UTF-8)"
        + (f", {meta['skipped_lines']} bad lines" if meta["skipped_lines"] else ""),
        f"  tokenizer  vocab {tok['vocab_size']:,}, hash {tok['hash']}, {meta['dtype']}",
        f"  {'split':<9}{'documents':>11}{'tokens':>14}{'MB text':>10}{'bytes/token':>13}",
    ]
    for split, s in meta["splits"].items():
        bpt = s["bytes"] / s["tokens"] if s["tokens"] else 0.0
        lines.append(
            f"  {split:<9}{s['documents']:>11,}{s['tokens']:>14,}{s['bytes'] / 1e6:>10.2f}{bpt:>13.2f}"
        )
    return "\n".join(lines)
