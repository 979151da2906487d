"""Data stage: corpus readers, tokenizer, shards, loader, prepare, CLI. Tiny data, tiny vocab."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa  # a dev dependency: without it the parquet test must fail, not skip
import pyarrow.parquet as pq
import pytest
import torch

from nanoseek.data import (
    BatchLoader,
    DataError,
    Tokenizer,
    open_corpus,
    pipeline,
    prepare,
    read_meta,
)
from nanoseek.data import corpus as corpus_mod
from nanoseek.data.corpus import STDLIB_SKIP_DIRS, VAL_EVERY, stdlib_files
from nanoseek.data.tokenizer import SPECIAL_TOKENS

VOCAB = 400
KEYWORDS = "def return self import class lambda yield async await for while if else".split()
_rng = random.Random(42)
WORDS = KEYWORDS + [
    "".join(_rng.choices("abcdefghijklmnopqrstuvwxyz_", k=_rng.randint(3, 9))) for _ in range(300)
]


def _text(rng: random.Random, n_lines: int) -> str:
    lines = []
    for _ in range(n_lines):
        indent = "    " * rng.randrange(3)
        lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 9))))
    return "\n".join(lines) + "\n"


def make_corpus(root: Path, n_files: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(n_files):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:03d}{'.py' if i % 2 else '.md'}").write_text(_text(rng, 20) + "héllo → ü\n")
    (root / "ignored.bin").write_bytes(b"\x00\x01")  # extension not read by default
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("data")
    src = make_corpus(tmp / "src")
    (src / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))  # not UTF-8
    out = prepare(str(src), tmp / "out", vocab_size=VOCAB, verbose=False)
    return src, out


@pytest.fixture(scope="module")
def tok(built) -> Tokenizer:
    return Tokenizer.load(built[1])


# --- tokenizer ---------------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_ids(tok):
    assert tok.vocab_size == VOCAB
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    for text in [
        "def f(x):\n    return x  # ü → 😀",
        "",
        "\x00\t\r\n  ",
        "literal <|end|> stays text",
    ]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # text never becomes a control token
    assert tok.encode_batch(["ab", "return self"]) == [tok.encode("ab"), tok.encode("return self")]
    assert len(tok.encode("return self.data")) < len(b"return self.data")  # merges learned


def test_tokenizer_save_load_hash_stable(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.hash == tok.hash and len(tok.hash) == 16
    other = Tokenizer.train(["completely different text " * 50], vocab_size=300)
    assert other.hash != tok.hash


def test_tokenizer_from_elsewhere_gets_special_tokens(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.save(str(tmp_path / "tokenizer.json"))
    t = Tokenizer.load(tmp_path)
    assert t.bos_id is not None and t.end_id is not None and t.vocab_size == len(SPECIAL_TOKENS)


def test_chat_template_agrees_with_transformers(built, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(built[1])
    assert hf.bos_token == "<|bos|>" and hf.eos_token == "<|eos|>" and hf.pad_token == "<|pad|>"
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "def f(x):\n    return x ü"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    for gen in (True, False):
        out = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        hf_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert ours == hf_ids
        assert ours[0] == tok.bos_id and (ours[-1] == tok.role_ids["assistant"]) == gen
    assert hf.encode("return self", add_special_tokens=False) == tok.encode("return self")
    # reasoning: a message's reasoning_content renders as <think>...</think> before the answer;
    # the generation prompt opens thinking (True), closes it empty (False) or leaves it (None)
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two and two. four"},
        {"role": "user", "content": "and 3+3?"},
    ]
    for thinking in (None, True, False):
        kw = {} if thinking is None else {"enable_thinking": thinking}
        out = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, **kw)
        hf_ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        ours, mask = tok.render_chat(chat, thinking=thinking)
        assert ours == hf_ids and len(mask) == len(ours)
        text = tok.decode(ours)
        assert text.endswith(
            {
                None: "<|assistant|>",
                True: "<|assistant|><think>",
                False: "<|assistant|><think></think>",
            }[thinking]
        )
        # the mask covers exactly the assistant reply and its <|end|>
        assert tok.decode([t for t, m in zip(ours, mask, strict=True) if m]) == (
            "<think>two and two. four</think>4<|end|>"
        )
    with pytest.raises(DataError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


# --- shards and prepare ------------------------------------------------------------------


def test_shards_hold_every_document_between_bos_and_eos(built, tok):
    src, out = built
    meta = read_meta(out)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["hash"] == tok.hash
    assert meta["skipped_files"] == ["latin1.txt"]  # invalid UTF-8: skipped and counted
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] + val["documents"] == 60 and val["documents"] == 60 // VAL_EVERY
    docs = []
    for split in ("train", "val"):
        arr = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert len(arr) == meta["splits"][split]["tokens"]
        assert arr[0] == tok.bos_id and arr[-1] == tok.eos_id
        assert (
            (arr == tok.bos_id).sum()
            == (arr == tok.eos_id).sum()
            == meta["splits"][split]["documents"]
        )
        for doc in np.split(arr, np.flatnonzero(arr == tok.bos_id)[1:]):
            docs.append(tok.decode(doc[1:-1].tolist()))
    files = sorted(p for p in src.rglob("*") if p.suffix in (".py", ".md"))
    assert sorted(docs) == sorted(p.read_text() for p in files)
    assert train["bytes"] + val["bytes"] == sum(len(p.read_bytes()) for p in files)
    # val = every VAL_EVERY-th document in sorted path order
    val_doc = tok.decode(np.fromfile(out / "val.bin", dtype=np.uint16)[1:-1].tolist())
    assert val_doc == files[VAL_EVERY - 1].read_text()


def test_second_prepare_does_no_work(built, monkeypatch):
    src, out = built
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def boom(*a, **k):
        raise AssertionError("work was redone")

    monkeypatch.setattr(pipeline.shards, "write_shards", boom)
    monkeypatch.setattr(pipeline.Tokenizer, "train", boom)
    assert prepare(str(src), out, vocab_size=VOCAB, verbose=False) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_given_tokenizer_is_used_and_uint32_for_big_vocab(built, tok, tmp_path):
    src, _ = built
    out = prepare(
        str(src), tmp_path / "o", tokenizer=str(built[1] / "tokenizer.json"), verbose=False
    )
    assert Tokenizer.load(out).hash == tok.hash and read_meta(out)["tokenizer"]["hash"] == tok.hash
    from nanoseek.data.shards import token_dtype

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_corrupt_shard_is_reported(built, tmp_path):
    src, _ = built
    out = prepare(str(src), tmp_path / "o", vocab_size=VOCAB, verbose=False)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match=r"train.bin: 100 bytes.*corrupt"):
        prepare(str(src), out, vocab_size=VOCAB, verbose=False)
    with pytest.raises(DataError, match="corrupt"):
        BatchLoader(out, "train", 2, 8)


def test_mismatched_tokenizer_is_reported(built, tmp_path):
    src, out = built
    other = Tokenizer.train(["something else entirely " * 40], vocab_size=300)
    other.save(tmp_path / "other")
    with pytest.raises(DataError, match="already holds a different tokenizer"):
        prepare(str(src), out, tokenizer=str(tmp_path / "other"), verbose=False)
    with pytest.raises(DataError, match="trained for vocab 400, not 512"):
        prepare(str(src), out, vocab_size=512, verbose=False)
    # tokenizer.json swapped under existing shards
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    other.save(copy)
    with pytest.raises(DataError, match="built with tokenizer"):
        BatchLoader(copy, "train", 2, 8)
    with pytest.raises(DataError, match="built with tokenizer"):
        prepare(str(src), copy, tokenizer=str(copy / "tokenizer.json"), verbose=False)


def test_changed_corpus_is_reported(tmp_path):
    src = make_corpus(tmp_path / "src", n_files=5)
    out = prepare(str(src), tmp_path / "out", vocab_size=300, verbose=False)
    (src / "new.md").write_text("a new file\n")
    with pytest.raises(DataError, match="files changed"):
        prepare(str(src), out, vocab_size=300, verbose=False)


def test_small_corpus_holds_out_a_tail(tmp_path):
    (tmp_path / "one.txt").write_text(_text(random.Random(1), 200))
    out = prepare(str(tmp_path / "one.txt"), tmp_path / "out", vocab_size=300, verbose=False)
    s = read_meta(out)["splits"]
    assert s["train"]["documents"] == s["val"]["documents"] == 1
    assert 0.05 < s["val"]["bytes"] / (s["train"]["bytes"] + s["val"]["bytes"]) < 0.15


# --- corpus readers and errors ------------------------------------------------------------


def test_jsonl_text_field(tmp_path):
    rows = [{"body": f"row {i} " + "return self " * i, "id": i} for i in range(1, 8)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts = [t for _, t in open_corpus(str(tmp_path), text_field="body").documents()]
    assert texts == [r["body"] for r in rows]
    with pytest.raises(
        DataError, match=r"d.jsonl:1: no field 'text' \(found: body, id\).*--text-field"
    ):
        list(open_corpus(str(tmp_path)).documents())
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        list(open_corpus(str(tmp_path)).documents())


def test_parquet(tmp_path):
    texts = [f"parquet doc {i} " + "yield data " * i for i in range(1, 6)]
    pq.write_table(pa.table({"content": texts, "n": list(range(5))}), tmp_path / "d.parquet")
    got = [t for _, t in open_corpus(str(tmp_path / "d.parquet"), text_field="content").documents()]
    assert got == texts
    with pytest.raises(DataError, match="no column 'text'"):
        list(open_corpus(str(tmp_path / "d.parquet")).documents())
    out = prepare(
        str(tmp_path), tmp_path / "out", vocab_size=300, text_field="content", verbose=False
    )
    splits = read_meta(out)["splits"]  # under VAL_EVERY documents: the last one's tail is val
    assert (splits["train"]["documents"], splits["val"]["documents"]) == (5, 1)


def test_glob_and_extensions(tmp_path):
    make_corpus(tmp_path, n_files=6)
    (tmp_path / "notes.rst").write_text("rst\n")
    assert len(open_corpus(str(tmp_path), extensions=".py").files) == 3
    assert len(open_corpus(str(tmp_path), extensions=["md", ".RST"]).files) == 4
    assert len(open_corpus(str(tmp_path / "**" / "*.py")).files) == 3


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"'.*nope' does not exist.*'stdlib'"):
        prepare(str(tmp_path / "nope"), tmp_path / "out", verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty corpus: no files with extensions"):
        prepare(str(tmp_path / "empty"), tmp_path / "out", verbose=False)
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match=r"empty corpus.*1 files skipped as not UTF-8"):
        prepare(str(tmp_path / "empty"), tmp_path / "out", verbose=False)
    with pytest.raises(DataError, match="too small"):
        Tokenizer.train(["x"], vocab_size=100)
    with pytest.raises(DataError, match="no meta.json"):
        BatchLoader(tmp_path, "train", 2, 8)


def test_stdlib_corpus_lists_sources_without_test_suites():
    root, files = stdlib_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and "os.py" in rel and "json/decoder.py" in rel
    for r in rel:
        parts = r.split("/")
        assert not set(parts[:-1]) & STDLIB_SKIP_DIRS, r
        assert not parts[-1].startswith("test_"), r
    assert not any(
        r.startswith(("lib2to3/tests", "idlelib/idle_test", "unittest/test")) for r in rel
    )
    assert sum(p.stat().st_size for p in files) > 5_000_000
    assert open_corpus("stdlib").files == files


# --- loader ---------------------------------------------------------------------------------


def test_loader_is_a_pure_function_of_seed_step_rank(built):
    out = built[1]
    a = BatchLoader(out, "train", batch_size=4, seq_len=16, seed=7)
    x, y = a.get_batch(3)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal(a.get_batch(3)[0], x)
    assert not torch.equal(a.get_batch(4)[0], x)
    assert not torch.equal(BatchLoader(out, "train", 4, 16, seed=8).get_batch(3)[0], x)
    # 2 ranks split the same global batch: rank r takes rows r, r + 2, ...
    halves = [BatchLoader(out, "train", 4, 16, seed=7, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(halves[0].get_batch(3)[0], x[0::2])
    assert torch.equal(halves[1].get_batch(3)[0], x[1::2])
    with pytest.raises(DataError, match="does not split evenly over 3 processes"):
        BatchLoader(out, "train", 4, 16, rank=0, world_size=3)
    # resume: a fresh loader started at step 5 sees what the first one saw from step 5
    run = [a.get_batch(s) for s in range(8)]
    resumed = BatchLoader(out, "train", batch_size=4, seq_len=16, seed=7)
    for s in range(5, 8):
        assert all(torch.equal(u, v) for u, v in zip(resumed.get_batch(s), run[s], strict=True))
    data = np.fromfile(out / "train.bin", dtype=np.uint16)
    row = x[0].numpy()
    starts = [i for i in range(len(data) - 16) if np.array_equal(data[i : i + 16], row)]
    assert starts  # windows are contiguous slices of the shard


def test_val_batches_are_fixed(built):
    v = BatchLoader(built[1], "val", batch_size=2, seq_len=8, seed=0)
    first, second = list(v.val_batches(3)), list(v.val_batches(3))
    assert len(first) == 3
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, second, strict=True)
    )
    # over 2 ranks, the same windows, shared out
    r0 = list(BatchLoader(built[1], "val", 2, 8, rank=0, world_size=2).val_batches(3))
    r1 = list(BatchLoader(built[1], "val", 2, 8, rank=1, world_size=2).val_batches(3))
    for whole, a, b in zip(first, r0, r1, strict=True):
        assert torch.equal(whole[0], torch.cat([a[0], b[0]]))
    assert v.bits_per_byte(v.bytes_per_token * np.log(2)) == pytest.approx(1.0)
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchLoader(built[1], "val", 2, 10**7)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_prepare_and_info(tmp_path, cli):
    src = make_corpus(tmp_path / "src", n_files=4)
    out = tmp_path / "out"
    r = cli("data", "prepare", "--data", src, "--out", out, "--vocab-size", 300, "--ext", ".py")
    assert r.code == 0, r.err
    meta = read_meta(out)
    assert meta["source"]["extensions"] == [".py"] and meta["source"]["files"] == 2
    r = cli("data", "info", out)
    assert r.code == 0
    assert "train" in r.out and "bytes/token" in r.out and meta["tokenizer"]["hash"] in r.out
    assert corpus_mod.normalize_extensions(".py, md") == (".md", ".py")


def test_importing_the_tokenizer_leaves_the_rest_of_the_data_stage_unloaded():
    import subprocess
    import sys

    code = (
        "import sys; from nanoseek.data.tokenizer import Tokenizer; "
        "print(sorted(m for m in sys.modules if m.startswith('nanoseek.data')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        out.stdout.strip() == "['nanoseek.data', 'nanoseek.data.errors', 'nanoseek.data.tokenizer']"
    )
