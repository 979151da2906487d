"""benchmarks/moe_vs_dense.py's pure parts: the recipe overrides and the reach measure (the
benchmark itself trains two models for minutes each)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.moe_vs_dense import first_reach, train_overrides


def test_train_overrides_split_both_and_moe_only():
    both, moe = train_overrides(["batch_size=16", "schedule=cosine"], ["lr=2e-3"])
    assert both == {"batch_size": 16, "schedule": "cosine"}
    assert moe == {"lr": 2e-3}
    # --moe-lr is --moe-train lr=...
    assert train_overrides([], [], moe_lr=1e-3) == ({}, {"lr": 1e-3})


@pytest.mark.parametrize("item", ["tokens=1e5", "seed=3", "threads=2", "model=tiny"])
def test_train_overrides_refuse_what_the_benchmark_sets(item):
    with pytest.raises(SystemExit, match="cannot set"):
        train_overrides([item], [])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        train_overrides(["batch_size"], [])


def test_first_reach_interpolates_where_the_curve_meets_the_target():
    c = {"val": np.array([5.0, 4.6, 4.4]), "seconds": np.array([10.0, 20.0, 30.0])}
    assert first_reach(c, 4.5, "seconds") == pytest.approx(25.0)
    assert first_reach(c, 5.5, "seconds") == 10.0
    assert first_reach(c, 4.0, "seconds") is None


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_moe_budget_outside_zero_to_one_is_refused_before_training(budget):
    from benchmarks.moe_vs_dense import main

    with pytest.raises(SystemExit, match="--moe-budget must be in"):
        main(["--moe-budget", budget])
