"""benchmarks/moe_vs_dense.py's pure parts: the recipe overrides and the reach measure (the
benchmark itself trains two models for minutes each)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.moe_vs_dense import (
    beside_seed,
    best_of,
    expert_load,
    extrapolate_budget,
    first_reach,
    iso_budget,
    lead_at,
    model_overrides,
    nearest_kept,
    parse_args,
    parse_fractions,
    parse_recipe,
    runs_side_by_side,
    token_multiplier,
    train_overrides,
)

TINY_PAIR = [
    f"--model={kv}"
    for kv in (
        "hidden_size=32 num_hidden_layers=1 kv_lora_rank=16 qk_nope_head_dim=8 qk_rope_head_dim=8 "
        "v_head_dim=8 moe_intermediate_size=16 num_attention_heads=2"
    ).split()
]

ROLES = ("small", "dense-small")  # the MoE's and the dense model's run directories


def tiny_pair_args(tmp_path: Path, tokens: int) -> list[str]:
    """The benchmark's flags for the tiny pair on a tiny corpus, one model after the other,
    batch 4 x 32, an evaluation every 4 steps -> out in tmp_path / "runs"."""
    from nanoseek.data import prepare

    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):  # one becomes the validation split
        (src / f"m{i}.py").write_text(f"def add{i % 7}(a, b):\n    return a + b\n" * 40)
    data = prepare(str(src), tmp_path / "data", vocab_size=300, verbose=False)
    args = [*TINY_PAIR, "--tokens", str(tokens), "--data", str(data)]
    args += ["--out", str(tmp_path / "runs"), "--png", str(tmp_path / "plot.png")]
    args += ["--eval-every", "4", "--sequential", "--train", "batch_size=4"]
    return [*args, "--train", "seq_len=32", "--train", "eval_batches=1"]


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


def test_lead_at_interpolates_both_curves_and_marks_points_a_short_run_lacks():
    dense = {"tokens": np.array([100.0, 200.0, 400.0]), "val": np.array([6.0, 5.0, 4.0])}
    moe = {"tokens": np.array([100.0, 200.0, 300.0]), "val": np.array([5.8, 4.9, 4.6])}
    # at 100 tokens: 6.0 - 5.8; at 200: 5.0 - 4.9; at 300 (dense 4.5) 4.5 - 4.6; 400: none
    leads = lead_at(moe, dense, [0.25, 0.5, 0.75, 1.0])
    assert leads[:3] == pytest.approx([0.2, 0.1, -0.1])
    assert leads[3] is None
    # a ramped run ends a few tokens short of the other's end: its last loss is its final one
    moe_ramped = {"tokens": np.array([100.0, 200.0, 399.8]), "val": np.array([5.8, 4.9, 3.9])}
    assert lead_at(moe_ramped, dense, [1.0]) == pytest.approx([0.1])


def test_beside_seed_sets_two_pairs_at_the_same_tokens():
    """Each tenth of this pair's dense tokens: both pairs' losses and leads, interpolated;
    a point one pair's MoE (on a shorter budget) does not reach has no loss and no lead."""
    tokens = np.array([100.0, 200.0, 400.0])
    runs = {
        "small": {"tokens": np.array([100.0, 200.0, 300.0]), "val": np.array([5.8, 4.9, 4.6])},
        "dense-small": {"tokens": tokens, "val": np.array([6.0, 5.0, 4.0])},
    }
    other = {
        "small": {"tokens": tokens, "val": np.array([5.7, 4.7, 3.7])},
        "dense-small": {"tokens": tokens, "val": np.array([6.1, 5.1, 4.1])},
    }
    rows = beside_seed(runs, other, [0.5, 0.75, 1.0])
    assert [t for t, _ in rows] == [200.0, 300.0, 400.0]
    assert rows[0][1] == pytest.approx([4.9, 5.0, 0.1, 4.7, 5.1, 0.4])
    assert rows[1][1] == pytest.approx([4.6, 4.5, -0.1, 4.2, 4.6, 0.4])
    assert rows[2][1][:3] == [None, 4.0, None]  # this MoE ended at 300 tokens
    assert rows[2][1][3:] == pytest.approx([3.7, 4.1, 0.4])


def test_token_multiplier_reads_the_lead_before_either_decay():
    """A MoE whose curve is the dense one at 1.5x the tokens: the dense model needs 1.5x the
    MoE's tokens for each loss; points past either run's stable phase are not read (their
    decay would flatter whichever curve is in it)."""
    tokens = np.linspace(1e5, 1e6, 10)

    def law(t):
        return 2.0 + 30.0 / np.sqrt(t)

    dense = {"tokens": tokens, "val": law(tokens)}
    moe = {"tokens": tokens, "val": law(1.5 * tokens)}
    mult, n = token_multiplier(moe, dense, 8e5, 8e5)
    assert mult == pytest.approx(1.5, rel=0.02)  # linear interpolation of a smooth curve
    assert n == 4  # MoE points from 2e5 to 6e5; 2e5 x 1.5 = 3e5 ... 6e5 x 1.5 = 9e5 > 8e5: out
    dense_decayed = {"tokens": tokens, "val": law(tokens)}
    dense_decayed["val"][8:] -= 0.5  # a decay after 8e5 tokens: the MoE's losses met there
    assert token_multiplier(moe, dense_decayed, 8e5, 8e5) == (mult, n)  # are not read
    assert token_multiplier(moe, dense, 1e5, 1e5) is None  # no MoE point inside the span


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_moe_budget_outside_zero_to_one_is_refused_before_training(budget):
    from benchmarks.moe_vs_dense import main

    with pytest.raises(SystemExit, match="--moe-budget must be in"):
        main(["--moe-budget", budget])


def test_the_plot_goes_into_the_run_dir_unless_png_says_elsewhere():
    # a run must not overwrite the figures the README and docs/benchmarks.md show
    assert parse_args(["--out", "runs/x"]).png == str(Path("runs/x") / "moe_vs_dense.png")
    assert parse_args(["--out", "runs/x", "--png", "p.png"]).png == "p.png"


def test_side_by_side_only_on_a_cpu_with_cores_to_split():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert runs_side_by_side(False, 2, cpu)
    assert not runs_side_by_side(True, 2, cpu)  # --sequential
    assert not runs_side_by_side(False, 1, cpu)
    assert not runs_side_by_side(False, 16, gpu)  # one GPU is not split between two runs


def test_expert_load_finds_the_early_herd_and_the_late_balance():
    # 20 steps: a herd at step 2 (layers averaged 5.0), then 1.5 / 2.5 alternating; the
    # evaluation records between steps carry no load and are skipped
    loads = [[2.0, 2.0], [6.0, 4.0]] + [[1.0, 2.0], [2.0, 3.0]] * 9
    recs = [{"step": i + 1, "load_max_mean": v} for i, v in enumerate(loads)]
    recs.insert(5, {"step": 5, "val_loss": 5.0})
    worst, step, late = expert_load(recs)  # first and last 10%: two steps each
    assert (worst, step) == (5.0, 2)
    assert late == pytest.approx(2.0)
    assert expert_load(recs, share=0.5)[2] == pytest.approx(2.0)
    assert expert_load([{"step": 1, "loss": 9.0}]) is None  # a run without MoE layers


def test_model_overrides_give_both_models_the_shape_and_the_dense_twin_its_width():
    from nanoseek.config import get_preset, param_counts

    shape = {"hidden_size": 384, "num_attention_heads": 6, "moe_intermediate_size": 384}
    models = model_overrides(shape, {"num_experts_per_tok": 2})
    # the dense MLP as wide as the unchanged MoE's shared + top-4 experts: 5 x 384
    assert models["dense-small"] == {**shape, "intermediate_size": 1920}
    assert models["small"] == {**shape, "num_experts_per_tok": 2}  # --moe: the MoE alone
    # at top 4 the two models activate the same parameters, as small / dense-small do
    moe, dense = model_overrides(shape, {}).values()
    counts = [
        param_counts(get_preset(p).replace(**o))
        for p, o in (("small", moe), ("dense-small", dense))
    ]
    assert counts[0]["activated"] == pytest.approx(counts[1]["activated"], rel=0.01)
    assert counts[0]["total"] > 3 * counts[1]["total"]
    assert model_overrides({}, {}) == {"small": {}, "dense-small": {}}


@pytest.mark.parametrize(
    "shape, message",
    [
        ({"n_routed_experts": 64}, "cannot set n_routed_experts"),
        ({"intermediate_size": 512}, "cannot set intermediate_size"),
        ({"hidden_sise": 384}, "no model config field hidden_sise"),
    ],
)
def test_model_overrides_refuse_what_the_dense_twin_derives_and_unknown_fields(shape, message):
    with pytest.raises(SystemExit, match=message):
        model_overrides(shape, {})


def test_recipes_parse_and_refuse_what_the_benchmark_sets():
    assert parse_recipe("lr=3e-3, batch_size=32,") == {"lr": 3e-3, "batch_size": 32}
    with pytest.raises(SystemExit, match="cannot set"):
        parse_recipe("lr=3e-3,tokens=1e6")
    with pytest.raises(SystemExit, match="got nothing"):
        parse_recipe(" , ")


def test_best_of_picks_each_model_at_its_own_lowest_loss():
    trials = [
        {"small": {"final_val_loss": 3.1}, "dense-small": {"final_val_loss": 3.0}},
        {"small": {"final_val_loss": 2.9}, "dense-small": {"final_val_loss": 3.2}},
    ]
    assert best_of(trials, "small") == 1
    assert best_of(trials, "dense-small") == 0


def test_recipes_train_both_models_and_compare_each_at_its_best(tmp_path, capsys):
    """Two recipes on a tiny pair: each trains both models into its own folder, with its
    settings, and the comparison names each model's lowest final loss."""
    import json

    from benchmarks.moe_vs_dense import main

    args = tiny_pair_args(tmp_path, 4096)
    args += ["--recipe", "lr=1e-3", "--recipe", "lr=1e-2,batch_size=8"]
    main(args)
    out = capsys.readouterr().out
    loss = {}
    for i, (lr, batch) in enumerate([(1e-3, 4), (1e-2, 8)]):
        for preset in ("small", "dense-small"):
            run = tmp_path / "runs" / f"recipe{i}" / preset
            tc = json.loads((run / "train_config.json").read_text())
            assert (tc["lr"], tc["batch_size"]) == (lr, batch)
            loss[i, preset] = json.loads((run / "summary.json").read_text())["final_val_loss"]
    for preset, name in (("small", "MoE"), ("dense-small", "dense")):
        best = min((0, 1), key=lambda i: loss[i, preset])
        assert f"{name}: recipe {best + 1} (" in out
        assert f"{loss[best, preset]:.4f}" in out.split("MoE vs dense, same data")[1]
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_iso_budget_interpolates_between_the_decayed_budgets():
    points = [(100.0, 10.0, 3.0), (200.0, 22.0, 2.6), (400.0, 40.0, 2.2)]
    assert iso_budget(points, 2.5) == pytest.approx((250.0, 26.5))  # a quarter of 200 -> 400
    assert iso_budget(points, 3.1) == "below"
    assert iso_budget(points, 2.1) == "above"
    # 0.4 nats a doubling: 2.1 one quarter doubling past 400 tokens, 2**0.25 * 400 = 475.7
    tokens, seconds, slope = extrapolate_budget(points, 2.1)
    assert (tokens, slope) == pytest.approx((400 * 2**0.25, 0.4))
    assert seconds == pytest.approx(40 + (tokens - 400) * 18 / 200)
    tokens, _, slope = extrapolate_budget(points, 3.2)  # below: the smallest two
    assert (tokens, slope) == pytest.approx((100 / 2**0.5, 0.4))
    assert extrapolate_budget(points[:1], 2.1) is None
    assert extrapolate_budget([(100.0, 10.0, 2.5), (200.0, 20.0, 2.6)], 2.1) is None
    kept = {Path("a"): 90, Path("b"): 130, Path("c"): 180}
    assert nearest_kept(kept, 150) == Path("b") and nearest_kept(kept, 170) == Path("c")
    assert parse_fractions("0.7, 0.6,") == [0.6, 0.7]
    for bad in ("0.6,1.0", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_fractions(bad)


def test_branches_need_the_bias_speed_in_tokens_and_budgets_below_the_moe_run():
    from benchmarks.moe_vs_dense import main

    with pytest.raises(SystemExit, match="gamma_tokens"):
        main(["--branches", "0.5"])
    with pytest.raises(SystemExit, match="below the MoE run's"):
        main(["--branches", "0.5,0.7", "--moe-budget", "0.7"])
    with pytest.raises(SystemExit, match="several --recipe"):
        main(["--branches", "0.5", "--recipe", "lr=1e-3", "--recipe", "lr=2e-3"])


def fake_train(job: tuple[str, float]) -> tuple[str, float, float]:
    """run_both's stand-in for `train` (module level: the spawned workers unpickle it)."""
    import time

    name, seconds = job
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
    time.sleep(seconds)
    return name, start, time.monotonic()


def test_side_by_side_the_branches_start_in_the_slot_the_moe_run_frees(monkeypatch):
    """The MoE's run ends first: its branch starts at once, beside the dense run, not after
    it; the second branch waits for a free slot."""
    import benchmarks.moe_vs_dense as bench

    monkeypatch.setattr(bench, "train", fake_train)
    jobs = {"small": ("moe", 0.5), "dense-small": ("dense", 6.0)}  # spawns may be seconds apart
    done = bench.run_both(jobs, True, lambda: {"a": ("a", 0.5), "b": ("b", 0.5)})
    assert set(done) == {"small", "dense-small", "a", "b"}
    moe_end, dense_end = done["small"][2], done["dense-small"][2]
    first, second = sorted((done["a"], done["b"]), key=lambda r: r[1])
    assert moe_end <= first[1] < dense_end  # beside the dense run
    assert second[1] >= first[2] and second[2] < dense_end  # the slot the first one freed


def write_run(
    run: Path, budget: float | None, steps: list[tuple[int, float]], vals: list[int]
) -> None:
    """A run directory as training leaves it: train_config.json with its token budget and
    metrics.jsonl with a record for each (tokens, train seconds), a validation record after
    each tokens count in `vals`."""
    import json

    run.mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"tokens": budget}))
    recs = []
    for i, (tokens, secs) in enumerate(steps):
        recs.append({"step": i + 1, "tokens": tokens, "tok_per_s": 1.0, "train_seconds": secs})
        if tokens in vals:
            recs.append({"step": i + 1, "tokens": tokens, "val_loss": 3.0 - tokens / 1e6})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_run_progress_reads_tokens_loss_recent_speed_and_time_left(tmp_path):
    from benchmarks.moe_vs_dense import run_progress

    # 1,000 tokens/s for 400 s, then 2,000 tokens/s: the last 300 s read 2,000
    steps = [(t * 1000, float(t)) for t in range(0, 400, 10)]
    steps += [(400_000 + 2000 * t, 400.0 + t) for t in range(10, 310, 10)]
    write_run(tmp_path / "a", 4e6, steps, vals=[200_000, 600_000])
    line = run_progress("small", tmp_path / "a")
    # (4M - 1M tokens) / 2,000 tokens/s = 1,500 s
    assert line == "small: 1M of 4M tokens (25%), val 2.4000 at 600K, 2,000 tokens/s, ~25 min left"
    write_run(tmp_path / "b", 1e6, [(0, 0.0), (900_000, 100.0), (918_000, 102.0)], vals=[])
    assert run_progress("b", tmp_path / "b").endswith("(92%), 9,000 tokens/s, under a minute left")
    write_run(tmp_path / "c", None, [(10_000, 5.0)], vals=[])  # one record, no budget
    assert run_progress("c", tmp_path / "c") == "c: 10K, 1 tokens/s"
    (tmp_path / "d").mkdir()
    assert run_progress("d", tmp_path / "d") == "d: waiting to start"


def test_waiting_side_by_side_prints_where_each_unfinished_run_stands(tmp_path, capsys):
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from benchmarks.moe_vs_dense import wait_showing_progress

    write_run(tmp_path / "moe", 2e6, [(0, 0.0), (500_000, 100.0)], vals=[500_000])
    write_run(tmp_path / "dense", 2e6, [(0, 0.0), (400_000, 100.0)], vals=[])
    configs = {"small": SimpleNamespace(out=tmp_path / "moe")}
    configs["dense-small"] = SimpleNamespace(out=tmp_path / "dense")
    moe_done, dense_done = threading.Event(), threading.Event()
    with ThreadPoolExecutor(2) as pool:
        futures = {
            "small": pool.submit(moe_done.wait, 9),
            "dense-small": pool.submit(dense_done.wait, 9),
        }
        threading.Timer(0.5, moe_done.set).start()
        wait_showing_progress(futures, configs, futures["small"], every=0.05)
        assert futures["small"].done() and not futures["dense-small"].done()
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) >= 3  # about one a 0.05 s until the MoE's run ends at 0.5 s
        assert all(" small: 500K of 2M tokens (25%), val 2.5000 at 500K" in x for x in lines)
        assert all(
            "| dense-small: 400K of 2M tokens (20%), 4,000 tokens/s, ~7 min left" in x
            for x in lines
        )
        threading.Timer(0.2, dense_done.set).start()
        wait_showing_progress(futures, configs, every=0.05)  # every run: the dense one alone
        lines = capsys.readouterr().out.splitlines()
        assert lines and all("small" not in x.replace("dense-small", "") for x in lines)


def write_pid_and_sleep(job: tuple[str, float]) -> None:
    """A training stand-in that says which process it is, then outlives the test."""
    import os
    import time

    path, seconds = job
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)


def running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may never reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_killing_the_benchmark_ends_its_trainings(tmp_path):
    """kill -9 of the benchmark's process takes its two training workers with it."""
    import os
    import subprocess
    import sys
    import time

    a, b = tmp_path / "a", tmp_path / "b"
    script = (
        "import benchmarks.moe_vs_dense as bench, test_moe_vs_dense as t\n"
        "bench.train = t.write_pid_and_sleep\n"
        f"bench.run_both({{'small': ({str(a)!r}, 120), 'dense-small': ({str(b)!r}, 120)}}, True)\n"
    )
    root = Path(__file__).parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    bench = subprocess.Popen([sys.executable, "-c", script], cwd=root, env=env)
    deadline = time.monotonic() + 60  # two spawned interpreters import torch
    while not (a.exists() and b.exists()):
        assert bench.poll() is None and time.monotonic() < deadline, "workers never started"
        time.sleep(0.1)
    time.sleep(0.2)  # both pid files complete
    workers = [int(a.read_text()), int(b.read_text())]
    assert all(running(pid) for pid in workers)
    bench.kill()
    bench.wait()
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if running(pid)]
    for pid in left:  # not the test's to leave behind
        os.kill(pid, 9)
    assert not left


def test_branches_decay_the_moe_at_each_budget(tmp_path, capsys):
    """A tiny pair with --branches 0.5,0.75: the MoE keeps a checkpoint at every evaluation,
    two branches decay from those nearest 0.8 x 0.5 and 0.8 x 0.75 of the budget (each a run
    of its checkpoint's tokens / 0.8), the rest are removed, and the table lists them."""
    import json

    from benchmarks.moe_vs_dense import main

    args = tiny_pair_args(tmp_path, 5120)
    args += ["--moe-train", "gamma_tokens=4096", "--branches", "0.5,0.75"]
    main(args)
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    # 128 tokens a step: decays start at 2048 (step 16) and 3072 (step 24) tokens
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("small")) == [
        "small",
        "small-decay-0000016",
        "small-decay-0000024",
    ]
    assert sorted(p.name for p in (runs / "small").glob("ckpt-*")) == [
        "ckpt-0000016",
        "ckpt-0000024",
    ]
    for step in (16, 24):
        branch = runs / f"small-decay-{step:07d}"
        tc = json.loads((branch / "train_config.json").read_text())
        summary = json.loads((branch / "summary.json").read_text())
        assert tc["tokens"] == step * 128 / 0.8 and summary["tokens_seen"] == step * 128 * 1.25
        assert f"{summary['final_val_loss']:.4f}" in out
    assert "the MoE decayed at each budget" in out
    assert "dense final loss" in out.split("the MoE decayed at each budget")[1]


def test_branches_below_a_shorter_moe_run_and_the_report_of_them(tmp_path, capsys):
    """--moe-budget 0.75 with --branches 0.5: the MoE's own run (30 steps of 128 tokens, its
    decay from step 24) is the largest budget; the branch decays from its step 16 (0.8 x 0.5
    of the dense 5,120 tokens); --report prints the same table again without training."""
    import json

    from benchmarks.moe_vs_dense import main

    args = tiny_pair_args(tmp_path, 5120)
    args += ["--moe-train", "gamma_tokens=4096", "--moe-budget", "0.75", "--branches", "0.5"]
    main(args)
    trained = capsys.readouterr().out
    runs = tmp_path / "runs"
    assert sorted(p.name for p in (runs / "small").glob("ckpt-*")) == ["ckpt-0000016"]
    summary = json.loads((runs / "small-decay-0000016" / "summary.json").read_text())
    assert summary["tokens_seen"] == 16 * 128 * 1.25
    table = trained.split("the MoE decayed at each budget")[1]
    moe = json.loads((runs / "small" / "summary.json").read_text())
    assert moe["tokens_seen"] == 3840
    for s in (summary, moe):  # the branch and the MoE's own run, fewest tokens first
        assert f"{s['final_val_loss']:.4f}" in table
    assert table.index(f"{summary['final_val_loss']:.4f}") < table.index(
        f"{moe['final_val_loss']:.4f}"
    )
    (tmp_path / "plot.png").unlink()
    main([*args, "--report"])
    reported = capsys.readouterr().out
    assert "reading the runs in" in reported and "training small" not in reported
    assert (
        reported.split("MoE vs dense, same data")[1] == trained.split("MoE vs dense, same data")[1]
    )
    assert (tmp_path / "plot.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="no finished run"):
        main([*args[:-2], "--out", str(tmp_path / "none"), "--report"])
    main([*args, "--report", "--against", str(runs)])  # the pair beside itself: leads agree
    beside = capsys.readouterr().out.split(f"beside {runs}")[1].splitlines()[2:12]
    assert len(beside) == 10  # a row at every tenth of the dense tokens
    final = json.loads((runs / "dense-small" / "summary.json").read_text())["final_val_loss"]
    final = f"{final:.4f}"
    assert beside[-1].split() == ["5.12K", final, final]  # the MoE ran on 75%: only the dense
    for row in beside[:7]:  # up to 70%, both pairs' MoE, dense and lead, twice the same
        cells = row.split()[1:]
        assert len(cells) == 6 and cells[:3] == cells[3:]
    with pytest.raises(SystemExit, match="--against: no finished run"):
        main([*args, "--report", "--against", str(tmp_path / "none")])


def test_resume_goes_on_with_a_killed_benchmarks_runs(tmp_path, monkeypatch, capsys):
    """A benchmark stopped in its first decay branch (after that branch's checkpoint at step
    36), then given --resume: the finished MoE and dense runs are read back, not trained
    again; the stopped branch goes on from its checkpoint and the unstarted one starts, and
    every run ends at the loss of the same benchmark run through (resume is exact)."""
    import json

    import benchmarks.moe_vs_dense as bench
    import nanoseek.train.pretrain as pretrain

    def flags(where: Path) -> list[str]:
        where.mkdir()
        args = tiny_pair_args(where, 10240)  # 80 dense steps of 128 tokens
        args += ["--moe-train", "gamma_tokens=8192", "--moe-budget", "0.75"]
        return [*args, "--branches", "0.5,0.625", "--train", "save_every=4"]

    bench.main(flags(tmp_path / "through"))
    through = tmp_path / "through" / "runs"

    original, branching = pretrain.end_of_step, []

    def stop_in_the_first_branch(state, *args):
        original(state, *args)
        if branching and state.step == 37:  # the branch from step 32 saved at 36
            raise KeyboardInterrupt

    def branch_configs(*args):
        branching.append(True)
        return original_branches(*args)

    original_branches = bench.branch_configs
    monkeypatch.setattr(pretrain, "end_of_step", stop_in_the_first_branch)
    monkeypatch.setattr(bench, "branch_configs", branch_configs)
    args = flags(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    monkeypatch.undo()
    runs = tmp_path / "stopped" / "runs"
    assert not (runs / "small-decay-0000032" / "summary.json").exists()
    assert not (runs / "small-decay-0000040").exists()
    lines = {p: len((runs / p / "metrics.jsonl").read_text().splitlines()) for p in ROLES}
    capsys.readouterr()

    bench.main([*args, "--resume"])
    out = capsys.readouterr().out
    for name in (*ROLES, "small-decay-0000032"):
        assert f"resuming {runs / name}" in out
    assert f"resuming {runs / 'small-decay-0000040'}" not in out
    for p in ROLES:  # read back, not trained again
        assert len((runs / p / "metrics.jsonl").read_text().splitlines()) == lines[p]
    for name in (*ROLES, "small-decay-0000032", "small-decay-0000040"):
        resumed = json.loads((runs / name / "summary.json").read_text())
        reference = json.loads((through / name / "summary.json").read_text())
        assert resumed["tokens_seen"] == reference["tokens_seen"]
        assert resumed["final_val_loss"] == reference["final_val_loss"], name
    with pytest.raises(SystemExit, match="not both"):
        bench.main([*args, "--resume", "--report"])


def test_train_throughput_times_the_pair_this_benchmark_trains():
    from benchmarks.train_throughput import preset_configs
    from nanoseek.config import get_preset

    shape = {"hidden_size": 128, "moe_intermediate_size": 128}
    moe, dense = preset_configs(["small", "dense-small"], shape).values()
    assert moe.hidden_size == dense.hidden_size == 128
    assert moe.moe_intermediate_size == 128
    experts_a_token = moe.num_experts_per_tok + moe.n_shared_experts
    assert (
        dense.intermediate_size
        == experts_a_token * 128
        == model_overrides(shape, {})["dense-small"]["intermediate_size"]
    )
    assert preset_configs(["small"], {}) == {"small": get_preset("small")}
    # without a dense twin nothing is derived, so the MoE's own layout may change
    alone = preset_configs(["small"], {"n_routed_experts": 64})["small"]
    assert alone == get_preset("small").replace(n_routed_experts=64)
    with pytest.raises(SystemExit, match="derives them; time that MoE layout without"):
        preset_configs(["small", "dense-small"], {"n_routed_experts": 64})
    with pytest.raises(SystemExit, match="no model config field widht"):
        preset_configs(["small"], {"widht": 64})
