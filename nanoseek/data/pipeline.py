"""`prepare`: corpus -> tokenizer + token shards in one directory, skipping what is done."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nanoseek.data import shards
from nanoseek.data.corpus import open_corpus
from nanoseek.data.errors import DataError
from nanoseek.data.tokenizer import Tokenizer

TOKENIZER_SAMPLE_BYTES = 100_000_000  # train the BPE on at most ~this much text


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, file=sys.stderr)


def prepare(
    data: str,
    out_dir: str | Path,
    vocab_size: int = 8192,
    tokenizer: str | Path | None = None,
    text_field: str = "text",
    extensions: str | list[str] | None = None,
    verbose: bool = True,
) -> Path:
    """Build (or check) out_dir/{tokenizer.json, tokenizer_config.json, train.bin, val.bin,
    meta.json} from `data` (a path, a glob, or `stdlib`); return out_dir."""
    out_dir = Path(out_dir)
    corpus = open_corpus(data, text_field, extensions)
    source = corpus.describe()

    # Tokenizer: reuse the one in out_dir, copy the given one, or train one.
    tok_file = out_dir / "tokenizer.json"
    if tok_file.exists():
        tok = Tokenizer.load(tok_file)
        if tokenizer is not None and (given := Tokenizer.load(tokenizer)).hash != tok.hash:
            raise DataError(
                f"{out_dir} already holds a different tokenizer ({tok.hash}) than {tokenizer} "
                f"({given.hash}); use a new --out or delete {out_dir}"
            )
        if tokenizer is None and (asked := _requested_vocab(out_dir, tok)) != vocab_size:
            raise DataError(
                f"{out_dir} holds a tokenizer trained for vocab {asked}, not {vocab_size}; "
                f"use a new --out, or --tokenizer {tok_file} to keep it"
            )
        if not (out_dir / "tokenizer_config.json").exists():
            tok.save(out_dir, requested_vocab_size=None if tokenizer else vocab_size)
    elif tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        tok.save(out_dir)
        _log(verbose, f"tokenizer: copied {tokenizer} (vocab {tok.vocab_size:,})")
    else:
        t0 = time.time()
        # Every stride-th training document, so a huge corpus trains the BPE on an even
        # sample of it; validation documents are never seen by the tokenizer.
        stride = max(1, -(-corpus.total_bytes // TOKENIZER_SAMPLE_BYTES))
        texts = (
            t
            for i, (s, _, t) in enumerate(corpus.split_documents())
            if s == "train" and i % stride == 0
        )
        tok = Tokenizer.train(texts, vocab_size, show_progress=verbose and sys.stderr.isatty())
        tok.save(out_dir, requested_vocab_size=vocab_size)
        _log(verbose, f"tokenizer: trained vocab {tok.vocab_size:,} in {time.time() - t0:.1f}s")
        if tok.vocab_size < vocab_size:
            _log(
                verbose, f"  (the corpus only had merges for {tok.vocab_size:,} of {vocab_size:,})"
            )

    # Shards: meta.json is written last, so if it is there the shards were finished.
    if (out_dir / shards.META).exists():
        meta = shards.read_meta(out_dir)
        _check_same_source(meta, source, tok, out_dir)
        shards.check_shards(out_dir, meta)
        _log(verbose, shards.summary(meta, out_dir, " (already built; nothing to do)"))
        return out_dir
    meta = shards.write_shards(corpus, tok, out_dir, verbose)
    _log(verbose, shards.summary(meta, out_dir, f" (built in {meta['build_seconds']:.1f}s)"))
    return out_dir


def _requested_vocab(out_dir: Path, tok: Tokenizer) -> int:
    try:
        config = json.loads((out_dir / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    return config.get("nanoseek_requested_vocab_size", tok.vocab_size)


def _check_same_source(meta: dict, source: dict, tok: Tokenizer, out_dir: Path) -> None:
    fix = f"use a new --out, or delete {out_dir / shards.META} to rebuild the shards"
    if meta["tokenizer"]["hash"] != tok.hash:
        raise DataError(
            f"{out_dir}: shards were built with tokenizer {meta['tokenizer']['hash']}, "
            f"not {tok.hash}; {fix}"
        )
    old = meta["source"]
    for key in ("fingerprint", "text_field", "extensions"):
        if old[key] != source[key]:
            what = "the files changed" if key == "fingerprint" else f"{key} was {old[key]!r}"
            raise DataError(f"{out_dir}: shards were built from {old['data']!r} ({what}); {fix}")
