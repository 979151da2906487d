"""benchmarks/device_check.py, the script a lent GPU runs, on CPU: its checks hold here, so
a GPU session spends its minutes on the GPU's figures, not on the script."""

from __future__ import annotations

import pytest
import torch

from benchmarks.device_check import decode_check, experts_check, parity_check, train_check
from nanoseek.config import get_preset
from nanoseek.model import Transformer

cpu = torch.device("cpu")


def test_parity_check_matches_transformers_on_cpu():
    pytest.importorskip("transformers")
    diff = parity_check(cpu)
    assert diff is not None and diff <= 1e-4


def test_experts_check_compares_the_two_expert_paths_in_bf16():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    err = experts_check(model, cpu, 256)
    assert 0 < err <= 2e-2  # bf16 rounding apart, not bit-equal paths


def test_train_check_learns_the_pattern():
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    t = train_check(model, cpu, batch=2, seq=64, steps=6)
    assert t["tokens_per_s"] > 0 and t["flops_per_s"] > 0
    assert t["last_loss"] < t["first_loss"] - 0.5


def test_decode_check_paths_agree():
    torch.manual_seed(0)
    d = decode_check(Transformer(get_preset("tiny")), cpu)
    assert d["absorbed_vs_plain_max_diff"] <= 1e-4
    assert d["greedy_same"] == 1.0 and d["speculative_same"] == 1.0
    assert all(d[f"decode{w}_tok_s_batch{n}"] > 0 for w in ("", "_bf16") for n in (1, 8))
