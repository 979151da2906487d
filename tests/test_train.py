"""Training loop: balancing, learning, exact resume, atomic checkpoints, non-finite losses,
and the errors `nanoseek train` prints. Tiny preset, tiny corpora: seconds each."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.data import BatchLoader, DataError, prepare
from nanoseek.hub import from_pretrained
from nanoseek.model import Transformer
from nanoseek.model.moe import MoE
from nanoseek.train import (
    Budget,
    RunState,
    Runtime,
    TrainConfig,
    TrainError,
    find_checkpoint,
    load_checkpoint,
    load_imbalance,
    make_config,
    save_checkpoint,
    train,
    update_expert_bias,
)
from nanoseek.train import pretrain as pretrain_mod
from nanoseek.train.metrics import MetricsLog, unigram_loss
from nanoseek.train.run import build_optimizer, set_lr

SNIPPET = '''def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A tiny repeated corpus -> 300-token BPE + shards (train and val)."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(100):  # 2 of them become the validation split
        (src / f"mod{i:02d}.py").write_text(SNIPPET.replace("add", f"add{i % 7}") * 4)
    return prepare(str(src), root / "shards", vocab_size=300, verbose=False)


def tiny_run(shards: Path, out: Path, **kw) -> TrainConfig:
    base = dict(preset="tiny", data=str(shards), out=str(out), steps=8, batch_size=4, seq_len=32)
    base.update(lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, progress=False, threads=1)
    base.update(kw)
    return make_config(**base)


def losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- expert balancing ---------------------------------------------------------------------


def test_bias_update_moves_load_towards_balance():
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(n_group=1, topk_group=1)
    moe = MoE(cfg)
    with torch.no_grad():  # a gate that sends every token to experts 0 and 1
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[:2] += 0.05
    x = torch.randn(512, cfg.hidden_size) + 0.5  # a direction every token shares

    def counts() -> torch.Tensor:
        with torch.no_grad():
            _, idx, _ = moe.gate(x)
        return torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)[None]

    before = load_imbalance(counts())[0]
    for _ in range(200):
        update_expert_bias([moe], counts(), gamma=0.01)
    after = load_imbalance(counts())[0]
    assert before > 3.0  # 4.0 is total collapse for top-2 of 8
    assert after < 1.6
    assert moe.gate.bias[:2].max() < moe.gate.bias[2:].min()  # favoured experts pushed down


def test_bias_is_not_trained_by_gradients():
    model = Transformer(get_preset("tiny"))
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(m.gate.bias) not in trained for m in model.moe_layers())


def test_routers_train_at_router_lr():
    """The routers' weights (and only they) step at router_lr x the learning rate; at 1.0
    the groups are those of runs saved before router_lr existed (their optimizer state
    loads)."""
    model = Transformer(get_preset("tiny"))
    routers = {id(m.gate.weight) for m in model.moe_layers()}
    assert routers
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, router_lr=0.1)
    set_lr(opt, 2e-3)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # Adam's first step moves every weight by the lr
    for p in model.parameters():
        if p.requires_grad:
            want = 2e-4 if id(p) in routers else 2e-3
            assert (before[id(p)] - p.detach()).abs().max().item() == pytest.approx(want, rel=1e-3)
    plain = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert all("lr_scale" not in g for g in plain.param_groups) and len(plain.param_groups) == 2


def routed_expert_ids(model: Transformer) -> set[int]:
    """ids of the routed experts' stacked weights (not the shared experts', not the routers')."""
    return {id(w) for m in model.moe_layers() for w in (m.experts.w13, m.experts.w2)}


def test_routed_experts_take_their_own_beta2():
    """--expert-beta2: the routed experts' second moments (and only theirs, not the shared
    experts' or the routers') average at their own beta2; unset, the groups are as before."""
    model = Transformer(get_preset("tiny"))
    experts = routed_expert_ids(model)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99), expert_beta2=0.5)
    for scale in (1.0, 2.0):  # v = b2 (1 - b2) + (1 - b2) 4 after two steps
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        opt.step()
    for p in model.parameters():
        b2 = 0.5 if id(p) in experts else 0.99
        want = b2 * (1 - b2) + (1 - b2) * 4
        assert opt.state[p]["exp_avg_sq"].flatten()[0].item() == pytest.approx(want, rel=1e-5)
    same = build_optimizer(model, lr=1e-3, weight_decay=0.1, expert_beta2=0.95)
    assert len(same.param_groups) == 2  # the default beta2 already: no group of its own
    with pytest.raises(TrainError, match="expert_beta2 must be in"):
        make_config(preset="tiny", tokens=1e5, expert_beta2=1.0)


def test_routed_experts_take_their_own_lr():
    """--expert-lr: the routed experts (and only they: not the shared experts, not the
    routers, which keep router_lr) step at expert_lr x the learning rate, under AdamW and
    Muon alike; a bad value is a one-line error."""
    model = Transformer(get_preset("tiny"))
    experts = routed_expert_ids(model)
    routers = {id(m.gate.weight) for m in model.moe_layers()}
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0, router_lr=0.1, expert_lr=0.5)
    set_lr(opt, 2e-3)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # Adam's first step moves every weight by its group's lr
    for p in model.parameters():
        if p.requires_grad:
            want = 1e-3 if id(p) in experts else 2e-4 if id(p) in routers else 2e-3
            assert (before[id(p)] - p.detach()).abs().max().item() == pytest.approx(want, rel=1e-3)
    muon = build_optimizer(model, lr=1e-3, weight_decay=0.0, kind="muon", expert_lr=0.5)
    scaled = [g for g in muon.param_groups if g.get("lr_scale") == 0.5]
    assert {id(p) for g in scaled for p in g["params"]} == experts
    assert all(g.get("muon") for g in scaled)
    with pytest.raises(TrainError, match="expert_lr must be > 0"):
        make_config(preset="tiny", tokens=1e5, expert_lr=0.0)


def test_routed_experts_take_their_own_weight_decay():
    """--expert-weight-decay: the routed experts (and only they) decay at their own rate; the
    other matrices keep --weight-decay and the norms none; a bad value is a one-line error."""
    model = Transformer(get_preset("tiny"))
    experts = routed_expert_ids(model)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, expert_weight_decay=0.0)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0: only the decay moves a weight
    opt.step()
    for p in model.parameters():
        if not p.requires_grad:
            continue
        shrink = 0.0 if id(p) in experts or p.dim() < 2 else 1e-2 * 0.1
        torch.testing.assert_close(p.detach(), before[id(p)] * (1 - shrink))
    same = build_optimizer(model, lr=1e-3, weight_decay=0.1, expert_weight_decay=0.1)
    assert len(same.param_groups) == 2  # the default decay already: no group of its own
    with pytest.raises(TrainError, match="expert_weight_decay must be >= 0"):
        make_config(preset="tiny", tokens=1e5, expert_weight_decay=-0.1)


# --- runtime, budget, run state ------------------------------------------------------------


def test_runtime_in_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    with Runtime.start("cpu", "fp32", threads=1) as rt:
        assert (rt.rank, rt.world, rt.master) == (0, 1, True)
        assert (rt.device, rt.dtype) == (torch.device("cpu"), torch.float32)
        assert torch.get_num_threads() == 1
        model = torch.nn.Linear(2, 2)
        assert rt.wrap(model) is model and rt.unwrap(model) is model
        t = torch.ones(3)
        assert rt.all_reduce_sum(t) is t and rt.all_reduce_mean(2.5) == 2.5
        assert rt.broadcast(1.5) == 1.5
        assert rt.full_state_dict(model).keys() == model.state_dict().keys()
    assert torch.get_num_threads() == before  # the setting ends with the runtime


def test_clipping_in_the_fused_adamw_step_equals_clip_grad_norm():
    """On one process with torch's fused AdamW, clip_grads leaves the scaling to the
    optimizer's step (its grad_scale): three steps give the parameters that clip_grad_norm_
    then the step give, to rounding (a division for a multiplication), with the clip active
    and idle, and the same norms; an idle clip clears the divisor a clipped step set."""
    rt = Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"), dtype=torch.float32)
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    for max_norm in (0.05, 1e3):
        runs = []
        for fold in (True, False):
            torch.manual_seed(0)
            model = Transformer(get_preset("tiny")).train()
            opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
            norms = []
            for _ in range(3):
                model(x[:, :-1], targets=x[:, 1:]).loss.backward()
                if fold:
                    norms.append(rt.clip_grads(model, max_norm, opt))
                    assert (opt.grad_scale is None) == (max_norm > norms[-1])
                else:
                    norms.append(
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
                    )
                opt.step()
                opt.zero_grad(set_to_none=True)
            runs.append((norms, torch.cat([p.detach().flatten() for p in model.parameters()])))
        (norms, folded), (want_norms, plain) = runs
        assert norms == pytest.approx(want_norms, rel=1e-5)
        assert (folded - plain).abs().max() < 1e-5 * plain.abs().max()
    model(x[:, :-1], targets=x[:, 1:]).loss.backward()
    rt.clip_grads(model, 1e-6, opt)
    assert opt.grad_scale is not None
    rt.clip_grads(model, 1e3, opt)  # an idle clip after a clipping one: no divisor left
    assert opt.grad_scale is None


_FAULTS = """
import resource, sys, torch
from nanoseek.device import keep_freed_memory
print(keep_freed_memory())
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # the heap grows to the steps' peak first
    torch.empty(12 << 20).fill_(1.0)
before = faults()
for _ in range(10):  # a 48 MB buffer made and freed, like each step's gradients
    torch.empty(12 << 20).fill_(1.0)
print(faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_keep_freed_memory_reuses_pages(setting):
    # glibc maps each buffer over 32 MB afresh (12,288 page faults for 48 MB, each time;
    # smaller ones too, as its heap trimming and mmap threshold decide); kept, the later
    # ones reuse the heap's pages. A subprocess: the setting is process-wide.
    env = {**os.environ, "NANOSEEK_KEEP_FREED_MEMORY": setting}
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    applied, faults = out[0] == "True", int(out[1])
    if setting == "1":
        # most reuse (glibc may still grow the heap for one now and then: 0-2 of 10 seen)
        assert applied and faults < 3 * 12288
    else:
        assert not applied and faults > 10 * 12000


def test_budget_and_run_state():
    b = Budget(steps=10, minutes=1.0)
    assert b.fraction(step=5, tokens=0, elapsed=30.0) == 0.5
    assert b.fraction(step=5, tokens=0, elapsed=45.0) == 0.75  # the first one reached
    assert b.describe() == "steps 10, minutes 1" and Budget().describe() == "none"
    assert b and not Budget()
    assert Budget.from_dict(b.to_dict()) == b
    state = RunState(lr_horizon=b, train_config={"steps": 20, "lr": 1e-3}, step=3, tokens=96)
    saved = json.loads(json.dumps(state.to_dict()))
    assert saved["lr_horizon"] == {"steps": 10, "tokens": None, "minutes": 1.0}
    assert RunState.from_dict(saved) == state
    del saved["lr_horizon"]  # older checkpoints ran over their config's budget
    assert RunState.from_dict(saved).lr_horizon == Budget(steps=20)


# --- the loop -----------------------------------------------------------------------------


def test_a_few_steps_reduce_loss(shards, tmp_path):
    s = train(tiny_run(shards, tmp_path / "run", steps=30, eval_every=0))
    ls = losses(tmp_path / "run")
    assert len(ls) == 30
    assert sum(ls[-5:]) / 5 < 0.6 * sum(ls[:3]) / 3
    assert s["final_val_loss"] < s["unigram_loss"]  # the repeated corpus is learnable
    for key in (
        "preset",
        "tokens_seen",
        "wall_seconds",
        "flops_per_token",
        "total_flops",
        "mfu",
        "peak_flops",
        "device",
        "dtype",
        "seq_len",
        "final_val_loss",
        "final_val_bpb",
    ):
        assert s[key] is not None, key
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    recs = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(recs[0]["load_max_mean"]) == len(Transformer(get_preset("tiny")).moe_layers())
    # the checkpoint opens in nanoseek (and therefore in transformers: same files)
    model = from_pretrained(tmp_path / "run" / "ckpt")
    assert model.config.vocab_size == 300
    assert (tmp_path / "run" / "ckpt" / "tokenizer.json").is_file()


def test_kernels_are_built_before_the_clock_starts(shards, tmp_path, monkeypatch):
    """A machine's first run compiles the CPU training kernels (~10-20 s each): before the
    run's clock starts, so a minutes budget and tokens/s do not pay for it. Here the build is
    replaced by a 1 s sleep: it must not show in the run's training time."""
    calls = []

    def slow_build(rt):
        calls.append(rt.device.type)
        time.sleep(1.0)

    monkeypatch.setattr(pretrain_mod, "build_kernels", slow_build)
    train(tiny_run(shards, tmp_path / "run", steps=2))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert calls == ["cpu"]
    assert summary["wall_seconds"] < 1.0 and summary["elapsed_seconds"] < 1.0


def test_exact_resume(shards, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(tiny_run(shards, full, steps=8, save_every=4))
    ref = losses(full)

    part = tmp_path / "part"
    real_update = pretrain_mod.update_expert_bias
    calls = {"n": 0}

    def crash_after_5(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # killed during step 6, after the step-4 checkpoint
        return real_update(*args, **kw)

    monkeypatch.setattr(pretrain_mod, "update_expert_bias", crash_after_5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(shards, part, steps=8, save_every=4))
    monkeypatch.setattr(pretrain_mod, "update_expert_bias", real_update)
    train(tiny_run(shards, part, steps=8, save_every=4, resume=True))
    assert losses(part) == ref  # bit-for-bit, every step
    a, b = (
        json.loads((full / "summary.json").read_text()),
        json.loads((part / "summary.json").read_text()),
    )
    assert a["final_val_loss"] == b["final_val_loss"]


def _crash_in_step(monkeypatch, n: int) -> None:
    """Raise KeyboardInterrupt in step n's expert-bias update (after its optimizer step)."""
    real_update = pretrain_mod.update_expert_bias
    calls = {"n": 0}

    def crash(*args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_update(*args, **kw)

    monkeypatch.setattr(pretrain_mod, "update_expert_bias", crash)


def learns_and_resumes_exactly(tmp_path: Path, monkeypatch, **kw) -> dict:
    """Train `tiny` 8 steps with the settings `kw` (checkpoints every 4): the loss falls, and a
    run killed in step 6 and resumed reproduces the uninterrupted run's losses exactly (the
    optimizer's state came back whole) -> the resumed run's saved train config."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"m{i}.py").write_text(f"def f{i % 5}(x):\n    return x + {i % 3}\n\n" * 8)
    shards = prepare(str(src), tmp_path / "shards", vocab_size=300, verbose=False)
    kw = dict(steps=8, save_every=4, **kw)
    train(tiny_run(shards, tmp_path / "full", **kw))
    full = losses(tmp_path / "full")
    assert full[-1] < full[0] - 0.5
    _crash_in_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(shards, tmp_path / "part", **kw))
    monkeypatch.undo()
    train(tiny_run(shards, tmp_path / "part", resume=True, **kw))
    assert losses(tmp_path / "part") == full
    return json.loads((tmp_path / "part" / "train_config.json").read_text())


# --- batch-size ramp ------------------------------------------------------------------------


def test_batch_ramp_grows_in_steps_of_the_start_size():
    tc = TrainConfig(tokens=1e7, batch_size=32, batch_start=8, batch_ramp=6e6)
    at = [tc.batch_at(t) for t in (0, 1.99e6, 2e6, 3.99e6, 4e6, 5.99e6, 6e6, 1e9)]
    assert at == [8, 8, 16, 16, 24, 24, 32, 32]
    uneven = TrainConfig(tokens=1e3, batch_size=30, batch_start=8, batch_ramp=100)
    assert [uneven.batch_at(t) for t in (0, 30, 60, 90, 99, 100)] == [8, 8, 16, 24, 24, 30]
    assert TrainConfig(tokens=1e3, batch_size=12).batch_at(0) == 12  # no ramp


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(batch_start=4), "go together"),
        (dict(batch_ramp=1e4), "go together"),
        (dict(batch_ramp=1e4, batch_start=16), "batch_start must be in"),
        (dict(batch_ramp=-1.0, batch_start=2), "batch_ramp must be >= 0"),
    ],
)
def test_bad_batch_ramps_are_refused(kw, msg):
    with pytest.raises(TrainError, match=msg):
        make_config(tokens=1e5, batch_size=8, **kw)


def test_a_batch_ramp_trains_its_stages_and_resumes_exactly(tmp_path, monkeypatch):
    """2 sequences a step, then 4 once 128 tokens are in (seq_len 32): each step logs its batch,
    the token count adds up the stages, and a run killed mid-ramp resumes on the same curve."""
    learns_and_resumes_exactly(tmp_path, monkeypatch, batch_start=2, batch_ramp=128)
    recs = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").open()]
    assert [r["batch_size"] for r in recs] == [2, 2, 4, 4, 4, 4, 4, 4]
    assert [r["tokens"] for r in recs] == [64, 128, 256, 384, 512, 640, 768, 896]


def test_a_batch_is_a_function_of_its_size_and_splits_over_ranks(shards):
    one = BatchLoader(shards, "train", 4, 16, seed=0)
    x, _ = one.get_batch(3, 6)
    assert x.shape == (6, 16) and torch.equal(one.get_batch(3, 6)[0], x)
    halves = [BatchLoader(shards, "train", 4, 16, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h.get_batch(3, 6)[0] for h in halves])[[0, 3, 1, 4, 2, 5]], x)
    with pytest.raises(DataError, match="multiple of 2"):
        halves[0].get_batch(3, 3)


def test_resume_uses_the_saved_settings(shards, tmp_path, monkeypatch, cli):
    """`nanoseek train --out R --resume --steps N`: batch size, seed, data, preset... come from
    the checkpoint, not from the defaults, so the run goes on exactly as it would have."""
    kw = dict(steps=8, save_every=4, batch_size=2, seed=3, mtp_weight=0.5)
    train(tiny_run(shards, tmp_path / "full", **kw))
    part = tmp_path / "part"
    _crash_in_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_run(shards, part, **kw))
    monkeypatch.undo()
    assert cli("train", "--out", part, "--resume", "--steps", 8).code == 0
    assert losses(part) == losses(tmp_path / "full")
    saved = json.loads((part / "train_config.json").read_text())
    assert (saved["batch_size"], saved["seed"], saved["preset"]) == (2, 3, "tiny")
    recs = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["mtp_loss"]) for r in recs)  # logged apart from `loss`


def test_resume_refuses_a_different_run_and_keeps_the_lr_schedule(shards, tmp_path, cli):
    out = tmp_path / "r"
    train(tiny_run(shards, out, steps=4, eval_every=0, batch_size=2, warmup_steps=0))
    end_lr = losses(out, "lr")[-1]
    err = _train_error(cli, "--out", out, "--resume", "--batch-size", 8, "--seed", 0, "--lr", 3e-3)
    assert "batch_size 2 -> 8" in err and "--overwrite" in err
    assert err.count(" -> ") == 1  # seed and lr as saved: no conflict
    # a longer budget: the run goes on, the cosine schedule does not jump back up
    with pytest.warns(UserWarning, match="original horizon"):
        train(make_config(out=str(out), resume=True, steps=6))
    lrs = losses(out, "lr")
    assert len(lrs) == 6 and lrs[4:] == [pytest.approx(3e-4)] * 2 and end_lr > 3e-4
    with pytest.warns(UserWarning, match="original horizon"):  # still the step-4 horizon
        train(make_config(out=str(out), resume=True, steps=7))
    assert losses(out, "lr")[6] == pytest.approx(3e-4)


def test_resume_of_a_run_saved_before_router_lr(shards, tmp_path):
    """A checkpoint whose saved settings have no router_lr trained its routers at the full
    learning rate: it resumes so (its optimizer state fits), not at the newer default."""
    out = tmp_path / "r"
    train(tiny_run(shards, out, steps=3, eval_every=0, router_lr=1.0))
    state = out / "ckpt" / "train_state" / "state.json"
    saved = json.loads(state.read_text())
    del saved["train_config"]["router_lr"]
    state.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="original horizon"):  # the budget grew: 3 -> 5
        train(make_config(out=str(out), resume=True, steps=5))
    assert json.loads((out / "train_config.json").read_text())["router_lr"] == 1.0
    assert len(losses(out)) == 5


def test_default_schedule_is_wsd_and_a_cosine_run_resumes_with_cosine(shards, tmp_path):
    out = tmp_path / "w"
    train(tiny_run(shards, out, steps=10, eval_every=0, warmup_steps=0))
    lrs = losses(out, "lr")
    assert lrs[:8] == [pytest.approx(3e-3)] * 8  # stable at the peak for 80% of the run
    assert 3e-4 <= lrs[-1] < 0.9 * 3e-3  # then decaying towards the 0.1x floor
    cos = tmp_path / "c"  # started before wsd was the default: it keeps its schedule
    train(tiny_run(shards, cos, steps=3, eval_every=0, warmup_steps=0, schedule="cosine"))
    with pytest.warns(UserWarning, match="original horizon"):
        train(make_config(out=str(cos), resume=True, steps=4))
    assert json.loads((cos / "train_config.json").read_text())["schedule"] == "cosine"
    cos_lrs = losses(cos, "lr")
    assert cos_lrs[1] < cos_lrs[0] and cos_lrs[3] == pytest.approx(3e-4)


def test_wsd_decays_linearly_or_as_one_minus_sqrt():
    from nanoseek.train.schedule import LRSchedule

    lin = LRSchedule(1.0, 0, "wsd", 0.0, 0.5)
    sqrt = LRSchedule(1.0, 0, "wsd", 0.0, 0.5, "sqrt")
    for s in (lin, sqrt):  # the same stable phase and ends
        assert s(0, 0.3) == s(0, 0.5) == 1.0 and s(0, 1.0) == 0.0
    assert lin(0, 0.75) == pytest.approx(0.5)
    assert sqrt(0, 0.75) == pytest.approx(1 - math.sqrt(0.5))  # lower sooner
    assert sqrt(0, 0.625) == pytest.approx(0.5)  # halfway down a quarter of the way in
    floored = LRSchedule(2.0, 0, "wsd", 0.1, 0.5, "sqrt")
    assert floored(0, 0.75) == pytest.approx(0.2 + 1.8 * (1 - math.sqrt(0.5)))
    with pytest.raises(TrainError, match="decay_shape must be linear or sqrt"):
        make_config(preset="tiny", steps=5, decay_shape="cosine")


def test_unused_mtp_costs_no_flops(shards, tmp_path):
    from nanoseek.compute import flops_per_token

    s = train(tiny_run(shards, tmp_path / "r", steps=1, eval_every=0, eval_batches=1, mtp_weight=0))
    cfg = from_pretrained(tmp_path / "r" / "ckpt").config
    assert cfg.num_nextn_predict_layers > 0
    no_mtp = cfg.replace(num_nextn_predict_layers=0)
    assert s["flops_per_token"] == flops_per_token(no_mtp, 32, training=True)
    rec = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert "mtp_loss" not in rec


def test_existing_run_needs_resume_or_overwrite(shards, tmp_path):
    train(tiny_run(shards, tmp_path / "r", steps=2, eval_every=0))
    with pytest.raises(TrainError, match="--resume"):
        train(tiny_run(shards, tmp_path / "r", steps=2, eval_every=0))
    train(tiny_run(shards, tmp_path / "r", steps=2, eval_every=0, overwrite=True))


def test_checkpoint_survives_failure_mid_save(shards, tmp_path, monkeypatch):
    out = tmp_path / "r"
    train(tiny_run(shards, out, steps=3, eval_every=0))
    ckpt = out / "ckpt"
    before = {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    model, state, _ = load_checkpoint(ckpt)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a different model, so a half-written save would show

    def boom(*a, **k):
        raise OSError("disk full")

    import nanoseek.train.checkpoint as ckpt_mod

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)  # fails mid-save
    with pytest.raises(Exception, match="disk full"):  # OSError, or DCP's wrapping of it
        save_checkpoint(ckpt, model, opt, dataclasses.replace(state, step=99), shards)
    after = {p.name: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp dirs left
    monkeypatch.undo()
    _, state2, _ = load_checkpoint(ckpt)
    assert state2.step == 3


def test_save_keeps_the_old_checkpoint_until_the_new_one_is_in(shards, tmp_path, monkeypatch):
    import shutil

    import nanoseek.train.checkpoint as ckpt_mod

    out = tmp_path / "r"
    train(tiny_run(shards, out, steps=1, eval_every=0, eval_batches=1))
    ckpt, old = out / "ckpt", out / ".ckpt.old"
    ckpt.rename(old)  # a crash mid-swap: `.old` is the only copy, and a resume starts from it
    assert find_checkpoint(ckpt) == old
    model, state, _ = load_checkpoint(old)
    opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        if Path(path) == old:
            assert find_checkpoint(ckpt) == ckpt, "deleted the only good copy"
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    save_checkpoint(ckpt, model, opt, dataclasses.replace(state, step=2), shards)
    assert not old.exists() and load_checkpoint(ckpt)[1].step == 2


def test_metrics_survive_a_torn_line_and_count_in_chunks(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": float("nan"), "load": [float("inf"), 1.0]})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 3, "loss": None, "load": [None, 1.0]},
    ]
    tokens = np.random.default_rng(0).integers(0, 50, 1000).astype(np.uint16)
    assert unigram_loss(tokens, 64, chunk=77) == pytest.approx(unigram_loss(tokens, 64))


def _nan_after(monkeypatch, first_bad: int, last_bad: int) -> None:
    """Make the loss NaN for training forwards number first_bad..last_bad (1-based)."""
    real = Transformer.forward
    n = {"calls": 0}

    def forward(self, *args, **kw):
        out = real(self, *args, **kw)
        if self.training and out.loss is not None:
            n["calls"] += 1
            if first_bad <= n["calls"] <= last_bad:
                out.loss = out.loss * float("nan")
                out.main_loss = out.main_loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward)


def test_non_finite_loss_is_skipped(shards, tmp_path, monkeypatch):
    _nan_after(monkeypatch, 3, 3)
    with pytest.warns(UserWarning, match="non-finite"):
        s = train(tiny_run(shards, tmp_path / "r", steps=6, eval_every=0))
    ls = losses(tmp_path / "r")  # NaN is written as null: metrics.jsonl stays strict JSON
    assert ls[2] is None and all(math.isfinite(v) for i, v in enumerate(ls) if i != 2)
    assert math.isfinite(s["final_val_loss"])


def test_non_finite_losses_in_a_row_stop_the_run(shards, tmp_path, monkeypatch):
    _nan_after(monkeypatch, 4, 10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainError, match="non-finite for 3 steps in a row") as e:
            train(
                tiny_run(
                    shards, tmp_path / "r", steps=20, save_every=2, eval_every=0, max_bad_steps=3
                )
            )
    assert "ckpt" in str(e.value)
    _, state, _ = load_checkpoint(tmp_path / "r" / "ckpt")
    assert state.step == 2  # the last good checkpoint, not overwritten by a bad state


# --- config and command line ----------------------------------------------------------------


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.toml").write_text('preset = "tiny"\nsteps = 50\nlr = 1e-3\nbatch-size = 2\n')
    (tmp_path / "c.yaml").write_text("preset: tiny\nsteps: 50\nschedule: wsd\n")
    tc = make_config(tmp_path / "c.toml", steps=7)
    assert (tc.preset, tc.steps, tc.lr, tc.batch_size) == ("tiny", 7, 1e-3, 2)
    assert make_config(tmp_path / "c.yaml").schedule == "wsd"
    (tmp_path / "bad.toml").write_text("stepz = 3\n")
    with pytest.raises(TrainError, match="unknown setting 'stepz'"):
        make_config(tmp_path / "bad.toml")
    # a run's saved train_config.json holds nulls for the settings that take them
    (tmp_path / "c.json").write_text('{"preset": "tiny", "steps": 5, "minutes": null}')
    assert make_config(tmp_path / "c.json").minutes is None
    (tmp_path / "null.json").write_text('{"preset": "tiny", "steps": 5, "batch_ramp": null}')
    with pytest.raises(TrainError, match="batch_ramp cannot be null .*default, 0.0"):
        make_config(tmp_path / "null.json")
    with pytest.raises(TrainError, match="budget"):
        make_config(preset="tiny")


def _train_error(cli, *argv: object) -> str:
    r = cli("train", *argv, "--steps", 1, "--no-progress")
    assert r.code == 2
    err = r.err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_cli_errors_are_one_line(shards, tmp_path, cli):
    err = _train_error(cli, "--data", tmp_path / "nope", "--out", tmp_path / "r")
    assert "does not exist" in err
    (tmp_path / "empty").mkdir()
    err = _train_error(cli, "--data", tmp_path / "empty", "--out", tmp_path / "r")
    assert "empty corpus" in err
    # shards next to a tokenizer they were not built with
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in shards.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz_extra"] = len(tok["model"]["vocab"])
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    err = _train_error(cli, "--data", bad, "--out", tmp_path / "r", "--preset", "tiny")
    assert "tokenizer" in err
    err = _train_error(cli, "--data", shards, "--out", tmp_path / "r", "--resume")
    assert "no checkpoint" in err
    for device in ("foo", f"cuda:{torch.cuda.device_count()}"):  # unknown; not on this machine
        err = _train_error(cli, "--data", shards, "--out", tmp_path / "r", "--device", device)
        assert "not available" in err and "cpu" in err


@pytest.mark.parametrize("amx, avx512_bf16", [(False, False), (True, False), (False, True)])
def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_in_bf16(monkeypatch, amx, avx512_bf16):
    """oneDNN accepts bf16 on any AVX-512 CPU (emulated without AMX or AVX512-BF16, there
    ~3x slower than fp32 a training step): 'auto' asks for the instructions themselves."""
    from nanoseek.device import resolve_dtype

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    want = torch.bfloat16 if amx or avx512_bf16 else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == want
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # asked for: given
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16  # oneDNN's answer


def _ddp_worker(rank: int, world: int, ports: list[int], shards: str, out: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    with Runtime.start("cpu", "fp32") as rt:  # the reductions the loop relies on
        assert (rt.rank, rt.world) == (rank, world)
        assert rt.all_reduce_sum(float(rank + 1)) == 3.0 and rt.all_reduce_mean(float(rank)) == 0.5
        assert rt.broadcast(float(rank)) == 0.0
        counts = torch.tensor([rank, 1])
        assert rt.all_reduce_sum(counts).tolist() == [1, 2]
    # a second process group on a port of its own: re-using the first one's races with its
    # store shutting down (seen once: rank 1 waited 10 minutes in the first barrier)
    os.environ["MASTER_PORT"] = str(ports[1])
    # data: the corpus, so rank 0 prepares it into OUT/data while rank 1 waits for it
    corpus = str(Path(shards).parent / "src")
    kw = dict(steps=4, eval_every=2, dtype="fp32", data=corpus, vocab_size=300, parallel="ddp")
    train(tiny_run(Path(shards), Path(out), **kw))


@pytest.mark.slow
def test_two_process_ddp_on_cpu(shards, tmp_path):
    """The same loop under torchrun-style env vars: gloo, 2 ranks, one data preparation, one
    shared checkpoint."""
    import socket

    import torch.multiprocessing as mp

    socks = [socket.socket(), socket.socket()]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    mp.spawn(_ddp_worker, args=(2, ports, str(shards), str(tmp_path / "r")), nprocs=2)
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["tokens_seen"] == 4 * 4 * 32  # batch: over all ranks
    assert from_pretrained(tmp_path / "r" / "ckpt").config.vocab_size == 300
    assert (tmp_path / "r" / "data" / "meta.json").is_file()


@pytest.mark.slow  # compiling forward and backward: ~3 minutes on 2 cores
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_compiled_training_matches_eager(shards, tmp_path, dtype, tol):
    """`--compile` runs the MoE through the grouped path in fp32 (grouped_mm, traced whole),
    through the eager expert loop in bf16 (a graph break per layer), and fuses the rest; the
    losses must stay those of the eager loop, step for step (bf16: within its rounding)."""
    kw = dict(steps=4, eval_every=0, eval_batches=1, dtype=dtype)
    train(tiny_run(shards, tmp_path / "eager", **kw))
    train(tiny_run(shards, tmp_path / "compiled", compile=True, **kw))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled) == 4 and compiled[-1] < compiled[0]
    assert compiled == pytest.approx(eager, rel=tol, abs=tol)


def test_gamma_tokens_keeps_the_bias_schedule_when_the_budget_grows(shards, tmp_path):
    """With the bias speed's fall fixed in tokens, a run of twice the budget takes the shorter
    run's steps exactly until the shorter run's LR starts to fall (wsd's last 20%); over the
    budget (the default) the longer run's bias moves faster from the first update on."""
    per_step = 4 * 32
    short, long_ = 20 * per_step, 40 * per_step
    kw = dict(steps=None, eval_every=0, gamma=0.1, gamma_final=0.001)
    runs = {
        "short": dict(tokens=short, gamma_tokens=short),
        "long, gamma over a fixed count": dict(tokens=long_, gamma_tokens=short),
        "long, gamma over the budget": dict(tokens=long_),
    }
    steps = {}
    for name, extra in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        train(tiny_run(shards, out, **kw, **extra))
        recs = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        steps[name] = [r["loss"] for r in recs if "loss" in r]
    stable = 16  # the short run decays from 0.8 x 20 steps on
    assert steps["long, gamma over a fixed count"][:stable] == steps["short"][:stable]
    assert steps["long, gamma over the budget"][:stable] != steps["short"][:stable]
    assert steps["long, gamma over a fixed count"][stable:20] != steps["short"][stable:20]


def test_gamma_tokens_must_not_be_negative(shards, tmp_path):
    with pytest.raises(TrainError, match="gamma_tokens must be >= 0"):
        tiny_run(shards, tmp_path / "run", gamma_tokens=-1.0)


def test_gamma_decay_sets_the_bias_speed_while_the_lr_decays(shards, tmp_path, monkeypatch):
    """--gamma-decay 0 (DeepSeek-V3's last 500B tokens) stops the bias in exactly the steps
    whose LR is below the peak, in a run and in a decay branch of a run without it; before
    the decay every step is the plain run's. A cosine run has no such phase: refused."""
    speeds: list[float] = []
    real_update = pretrain_mod.update_expert_bias

    def record(layers, counts, gamma):
        speeds.append(gamma)
        return real_update(layers, counts, gamma)

    monkeypatch.setattr(pretrain_mod, "update_expert_bias", record)
    kw = dict(steps=20, eval_every=0, gamma=0.1, gamma_final=0.001, gamma_tokens=20 * 4 * 32)
    runs = {}
    for name, extra in {"plain": {}, "held": {"gamma_decay": 0.0}}.items():
        speeds.clear()
        train(tiny_run(shards, tmp_path / name, keep_every=8, **kw, **extra))
        runs[name] = (list(speeds), losses(tmp_path / name), losses(tmp_path / name, "lr"))
    (plain, plain_loss, lrs), (held, held_loss, _) = runs["plain"], runs["held"]
    decaying = [i for i, lr in enumerate(lrs) if lr < 3e-3 and i >= 2]  # past the warm-up
    assert decaying == [17, 18, 19]  # the LR of step 16 (0.8 x 20) is still the peak
    assert held[:17] == plain[:17] and min(plain) > 0 and held[17:] == [0.0] * 3
    assert held_loss[:18] == plain_loss[:18] and held_loss[18:] != plain_loss[18:]
    speeds.clear()
    branch = tmp_path / "branch"
    train(
        make_config(
            decay_from=str(tmp_path / "plain" / "ckpt-0000008"), out=str(branch), gamma_decay=0.0
        )
    )
    assert speeds == [plain[8], 0.0]  # a 10-step run from step 8: its LR decays at step 9
    assert json.loads((branch / "train_config.json").read_text())["gamma_decay"] == 0.0
    with pytest.raises(TrainError, match="gamma_decay must be >= 0 and needs the wsd"):
        tiny_run(shards, tmp_path / "cosine", schedule="cosine", gamma_decay=0.0)
    with pytest.raises(TrainError, match="gamma_decay must be >= 0"):
        tiny_run(shards, tmp_path / "negative", gamma_decay=-0.1)


# --- decay branches -----------------------------------------------------------------------


def test_a_decay_branch_is_the_run_of_its_budget(shards, tmp_path, monkeypatch):
    """A 20-step wsd run keeping its checkpoints, branched at step 8: the branch is a 10-step
    run (its decay from step 8 on) loss for loss, LR for LR, and final validation loss; killed
    mid-decay, the branch resumes on the same curve. A 25% decay from step 12 is a 16-step run,
    with either decay shape."""
    kw = dict(eval_every=0, gamma_tokens=8 * 4 * 32, gamma=0.1, gamma_final=0.001)
    trunk = tmp_path / "trunk"
    train(tiny_run(shards, trunk, steps=20, save_every=2, keep_every=4, **kw))
    kept = sorted(p.name for p in trunk.glob("ckpt-*"))
    assert kept == [f"ckpt-{s:07d}" for s in (4, 8, 12, 16, 20)]
    cases = (
        (10, 8, {}),
        (16, 12, {"decay_frac": 0.25}),
        (16, 12, {"decay_frac": 0.25, "decay_shape": "sqrt"}),
    )
    for budget, at, extra in cases:
        ref = tmp_path / f"run{budget}{extra.get('decay_shape', '')}"
        train(tiny_run(shards, ref, steps=budget, **kw, **extra))
        branch = tmp_path / f"branch{budget}{extra.get('decay_shape', '')}"
        train(make_config(decay_from=str(trunk / f"ckpt-{at:07d}"), out=str(branch), **extra))
        for key in ("loss", "lr"):
            assert losses(branch, key) == losses(ref, key)
        summary = [json.loads((d / "summary.json").read_text()) for d in (ref, branch)]
        assert summary[0]["final_val_loss"] == summary[1]["final_val_loss"]
        saved = json.loads((branch / "train_config.json").read_text())
        assert saved["steps"] == budget and saved["decay_from"].endswith(f"ckpt-{at:07d}")
        assert saved["keep_every"] == 0 and not list(branch.glob("ckpt-*"))  # not the trunk's
        assert saved["decay_shape"] == extra.get("decay_shape", "linear")
    sqrt_lrs, linear_lrs = losses(tmp_path / "run16sqrt", "lr"), losses(tmp_path / "run16", "lr")
    assert sqrt_lrs[:12] == linear_lrs[:12] and sqrt_lrs[13] < linear_lrs[13]
    part = tmp_path / "part"
    _crash_in_step(monkeypatch, 2)  # the branch's second step: step 10 of 10 is never taken
    with pytest.raises(KeyboardInterrupt):
        train(make_config(decay_from=str(trunk / "ckpt-0000008"), out=str(part), save_every=1))
    monkeypatch.undo()
    train(make_config(out=str(part), resume=True))
    assert losses(part) == losses(tmp_path / "run10")


def test_a_wsd_run_extended_at_its_peak_lr_is_the_run_of_its_new_budget(
    shards, tmp_path, monkeypatch
):
    """Resumed at its peak LR with a longer budget, a wsd run plans its decay over the new one
    (a decay branch's converse): loss for loss and LR for LR the run of that budget. With the
    bias speed falling over the horizon (no --gamma-tokens) it keeps its horizon: a new one
    would jump the bias speed."""
    kw = dict(eval_every=0, gamma=0.1, gamma_final=0.001, save_every=1)
    ref = tmp_path / "ref"
    train(tiny_run(shards, ref, steps=15, gamma_tokens=8 * 4 * 32, **kw))
    for gamma_tokens in (8 * 4 * 32, 0):
        out = tmp_path / f"extended{gamma_tokens}"
        _crash_in_step(monkeypatch, 7)  # steps 1-6 saved: at the peak LR of a 10-step run
        with pytest.raises(KeyboardInterrupt):
            train(tiny_run(shards, out, steps=10, gamma_tokens=gamma_tokens, **kw))
        monkeypatch.undo()
        if gamma_tokens:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*original horizon")  # none
                train(make_config(out=str(out), resume=True, steps=15))
            for key in ("loss", "lr"):
                assert losses(out, key) == losses(ref, key)
        else:
            with pytest.warns(UserWarning, match="original horizon"):
                train(make_config(out=str(out), resume=True, steps=15))
            lrs = losses(out, "lr")
            assert lrs[9] > 3e-4 and lrs[10:] == [pytest.approx(3e-4)] * 5  # over 10 steps


def test_decay_branches_refuse_what_they_cannot_be(shards, tmp_path, cli):
    trunk = tmp_path / "trunk"
    train(tiny_run(shards, trunk, steps=10, eval_every=0, keep_every=3))  # decays from 8
    cosine = tmp_path / "cosine"
    train(tiny_run(shards, cosine, steps=4, eval_every=0, schedule="cosine", keep_every=4))
    out = tmp_path / "branch"
    cases = [
        (("--decay-from", trunk / "ckpt-0000009"), "past where its decay began"),
        (("--decay-from", trunk / "ckpt"), "past where its decay began"),
        (("--decay-from", cosine / "ckpt-0000004"), "branches a wsd run"),
        (("--decay-from", trunk / "nope"), "no checkpoint"),
        (("--decay-from", trunk / "ckpt-0000006", "--tokens", 1e4), "drop --steps/--tokens"),
        (("--decay-from", trunk / "ckpt-0000006", "--batch-size", 2), "batch_size 4 -> 2"),
        (("--decay-from", trunk / "ckpt-0000006", "--resume"), "not both"),
    ]
    for argv, msg in cases:
        r = cli("train", *argv, "--out", out, "--no-progress")
        assert r.code == 2 and msg in r.err and len(r.err.strip().splitlines()) == 1, r.err
    r = cli("train", "--decay-from", trunk / "ckpt-0000006", "--out", trunk, "--no-progress")
    assert r.code == 2 and "its own --out" in r.err
    assert cli("train", "--decay-from", trunk / "ckpt-0000006", "--out", out).code == 0
    assert json.loads((out / "train_config.json").read_text())["steps"] == 8  # 6 / 0.8, rounded
    r = cli("train", "--decay-from", trunk / "ckpt-0000006", "--out", out, "--no-progress")
    assert r.code == 2 and "--overwrite" in r.err
