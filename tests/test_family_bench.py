"""benchmarks/family.py end to end on tiny presets and a tiny corpus: a smoke test (the
real run trains the small-* presets for minutes each)."""

from __future__ import annotations

import json

import pytest
from test_v4_train import shards  # noqa: F401  (the module's corpus fixture)

pytest.importorskip("transformers.models.deepseek_v4")


def test_family_benchmark_smoke(shards, tmp_path):  # noqa: F811
    from benchmarks.family import main

    out = tmp_path / "family"
    argv = ["--presets", "tiny,tiny-v4", "--data", str(shards), "--tokens", "1024"]
    argv += ["--seq-len", "64", "--contexts", "64,96", "--decode-tokens", "2", "--repeats", "1"]
    argv += ["--threads", "1", "--out", str(out), "--png", str(tmp_path / "f.png")]
    result = main(argv)
    assert set(result["summaries"]) == {"tiny", "tiny-v4"}
    rows = result["contexts"]
    assert [(r["preset"], r["context"]) for r in rows] == [
        ("tiny", 64), ("tiny", 96), ("tiny-v4", 64), ("tiny-v4", 96)
    ]  # fmt: skip
    assert all(r[k] > 0 for r in rows for k in ("fwd_ours", "fwd_hf", "decode_ours", "decode_hf"))
    assert json.loads((out / "family.json").read_text())["contexts"] == rows
    assert (tmp_path / "f.png").stat().st_size > 1000
