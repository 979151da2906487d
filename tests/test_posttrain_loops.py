"""The SFT and GRPO loops, end to end on a tiny model: what they train on, that they learn,
that rollouts come from the updated weights, exact resume, and the CLI's errors."""

from __future__ import annotations

import json
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer import Engine, SamplingParams
from nanoseek.posttrain import rl as rl_mod
from nanoseek.posttrain import sft as sft_mod
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.evaluate import chat_prompt, load_model
from nanoseek.posttrain.rl import RLConfig, rl
from nanoseek.posttrain.sft import SFTConfig, sft
from nanoseek.posttrain.tasks import TASKS, Problem, Task

YES, NO = "ok</think>yes", "ok</think>no"  # the two answers the SFT'd model gives


@dataclass
class Yes(Task):
    """Rewarded for answering yes; the SFT data says yes or no, half and half."""

    name = "yes"

    def sample(self, rng: random.Random) -> Problem:
        return Problem(f"Say yes {rng.randint(0, 10**6)}", "yes")


@pytest.fixture(autouse=True)
def yes_task(monkeypatch):
    monkeypatch.setitem(TASKS, "yes", Yes)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only spin-waits against other busy processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["Say yes 12345. <think>ok</think>yes no, the cat sat.\n" * 50] * 2, 300)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory) -> Path:
    """A fresh tiny model with the tokenizer, as a checkpoint directory."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = nanoseek.Transformer(nanoseek.get_preset("tiny").replace(vocab_size=tok.vocab_size))
    nanoseek.save_pretrained(model, path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    lines = []
    for i, p in enumerate(Yes().generate(1, 64)):
        answer = "yes" if i % 2 else "no"
        lines.append(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": p.prompt},
                        {"role": "assistant", "content": answer, "reasoning_content": "ok"},
                    ]
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def sft_config(base: Path, chats: Path, out: Path, **kw) -> SFTConfig:
    settings = dict(
        init=str(base),
        data=str(chats),
        out=str(out),
        steps=40,
        batch_size=8,
        seq_len=48,
        lr=1e-2,
        warmup_steps=2,
        eval_every=20,
        val_examples=6,
        progress=False,
        threads=1,
    )
    settings.update(kw)
    return SFTConfig(**settings)


@pytest.fixture(scope="module")
def sft_run(base, chats, tmp_path_factory) -> Path:
    """The SFT'd model: answers `<think>ok</think>` then yes or no, each about half the time."""
    out = tmp_path_factory.mktemp("sft")
    sft(sft_config(base, chats, out))
    return out


def rl_config(init: Path, out: Path, **kw) -> RLConfig:
    settings = dict(
        init=str(init),
        task="yes",
        out=str(out),
        steps=1,
        prompts_per_step=4,
        group_size=8,
        max_completion_tokens=8,
        # 3e-3 broke the SFT'd model in one step in bf16 (Adam's first step moves every
        # weight by ~lr): accuracy 0.44 -> 0.0; at 1e-3 "yes" gains ~0.15 nats in fp32 and bf16
        lr=1e-3,
        eval_every=0,
        eval_n=4,
        progress=False,
        threads=1,
    )
    settings.update(kw)
    return RLConfig(**settings)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def answer_logprob(model: nanoseek.Transformer, tok: Tokenizer, answer: str) -> float:
    """Mean over 4 held-out prompts of log p(answer <|end|> | prompt)."""
    total = 0.0
    for p in Yes().held_out(4):
        prompt = chat_prompt(tok, p)
        ids = torch.tensor([prompt + tok.encode(answer) + [tok.end_id]])
        with torch.no_grad():
            logp = model(ids[:, :-1]).logits.log_softmax(-1)
        total += logp[0, len(prompt) - 1 :].gather(-1, ids[0, len(prompt) :, None]).sum().item()
    return total / 4


# --- SFT ----------------------------------------------------------------------------------------


def test_sft_trains_on_the_assistant_tokens_only_and_learns(
    sft_run, base, chats, tok, tmp_path, monkeypatch
):
    recs = records(sft_run)
    losses = [r["loss"] for r in recs]
    assert len(losses) == 40 and losses[-1] < 0.5 * losses[0]
    val = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(val) == 2 and val[-1] < 1.0
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["val_examples"] == 6
    assert (sft_run / "loss.png").stat().st_size > 0
    engine = Engine.load(sft_run, max_batch=4, max_len=64)  # weights + tokenizer in ckpt/
    texts = {
        c.text
        for c in engine.generate(
            [chat_prompt(tok, p) for p in Yes().held_out(4)],
            SamplingParams(max_tokens=8, temperature=0),
        )
    }
    assert texts <= {YES, NO}

    # what the loop feeds the model: targets only on the replies (and their <|end|>)
    seen = []
    forward = nanoseek.Transformer.forward

    def spy(self, x, targets=None, **kw):
        if targets is not None and self.training:
            seen.append(targets.clone())
        return forward(self, x, targets=targets, **kw)

    monkeypatch.setattr(nanoseek.Transformer, "forward", spy)
    sft(sft_config(base, chats, tmp_path / "spy", steps=2, eval_every=0))
    assert len(seen) == 2
    for y in seen:
        for row in y:
            assert tok.decode(row[row != -100].tolist()) in [
                f"<think>{a}<|end|>" for a in (YES, NO)
            ]


def test_sft_exact_resume(base, chats, tmp_path, monkeypatch):
    kw = dict(steps=8, save_every=4, eval_every=4)
    sft(sft_config(base, chats, tmp_path / "full", **kw))
    real, calls = sft_mod.update_expert_bias, {"n": 0}

    def crash(*args, **kwargs):  # killed during step 6, after the step-4 checkpoint
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sft_mod, "update_expert_bias", crash)
    with pytest.raises(KeyboardInterrupt):
        sft(sft_config(base, chats, tmp_path / "part", **kw))
    monkeypatch.undo()
    sft(SFTConfig(out=str(tmp_path / "part"), resume=True, progress=False))
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "val_loss")

    def strip(out):
        return [{k: r.get(k) for k in keys} for r in records(out)]

    assert strip(tmp_path / "part") == strip(tmp_path / "full")  # bit for bit, every step


# --- GRPO ---------------------------------------------------------------------------------------


def test_grpo_step_raises_the_rewarded_completion(sft_run, tok, tmp_path, monkeypatch):
    engines = []
    make = rl_mod.make_engine
    monkeypatch.setattr(rl_mod, "make_engine", lambda *a: engines.append(make(*a)) or engines[-1])
    before, _ = load_model(sft_run)
    out = tmp_path / "rl"
    s = rl(rl_config(sft_run, out, steps=2))
    rec = records(out)
    assert [r["step"] for r in rec] == [0, 1, 2]  # step 0: held-out accuracy at the start
    first = rec[1]
    assert 0 < first["accuracy"] < 1 and first["format_rate"] > 0.9  # yes and no both sampled
    assert first["informative_groups"] > 0 and first["response_len"] > 0
    for key in ("entropy", "clip_frac", "rollout_s", "update_s", "loss", "grad_norm"):
        assert key in first
    assert "kl" not in first  # dr_grpo: beta 0, no reference model
    after, _ = load_model(out)
    gain = answer_logprob(after, tok, YES) - answer_logprob(before, tok, YES)
    assert gain > 0.1
    assert answer_logprob(after, tok, NO) < answer_logprob(before, tok, NO)
    assert s["steps"] == 2 and (out / "rl.png").stat().st_size > 0

    # the rollout engine decodes with the updated weights (refreshed in place, not reloaded)
    (engine,) = engines
    assert engine.model is not before
    prompts = [chat_prompt(tok, p) for p in Yes().held_out(4)]
    greedy = SamplingParams(max_tokens=8, temperature=0, logprobs=True)
    used = engine.generate(prompts, greedy)
    fresh = Engine(engine.model, tok, max_batch=4, max_len=64).generate(prompts, greedy)
    old = Engine(before, tok, max_batch=4, max_len=64).generate(prompts, greedy)
    for u, f, o in zip(used, fresh, old, strict=True):
        assert u.token_ids == f.token_ids
        assert u.logprobs == pytest.approx(f.logprobs, abs=1e-5)
        assert u.logprobs != pytest.approx(o.logprobs, abs=1e-3)


def test_dynamic_sampling_refills_the_batch_with_informative_groups(sft_run, tok):
    """G = 2 completions of a model that answers yes half the time: about half of the groups
    are all-yes or all-no. Dynamic sampling draws new problems for them; the batch keeps
    P groups, informative ones preferred, and the statistics count everything sampled."""
    model, _ = load_model(sft_run)
    P, G = 6, 2
    plain = rl_config(sft_run, Path("unused"), prompts_per_step=P, group_size=G)
    dynamic = rl_config(sft_run, Path("unused"), prompts_per_step=P, group_size=G)
    dynamic.dynamic_sampling = 4
    engine = Engine(model, tok, max_batch=P * G, max_len=64)
    task = Yes()
    base, _ = rl_mod.rollout(engine, tok, task, plain, 0, 0)
    assert base.batch.tolist() == list(range(P * G)) and len(base.rewards) == P * G
    roll, _ = rl_mod.rollout(engine, tok, task, dynamic, 0, 0)
    assert len(roll.batch) == P * G
    # the first round is the plain rollout itself; refills only add to it
    assert torch.equal(roll.rewards[: P * G], base.rewards)
    informative = rl_mod.informative_groups(base.rewards, G)
    assert not informative.all(), "seed gave no uninformative group: the test needs one"
    assert len(roll.rewards) > P * G  # new problems were drawn
    picked = rl_mod.informative_groups(roll.rewards[roll.batch], G)
    total = int(rl_mod.informative_groups(roll.rewards, G).sum())
    assert int(picked.sum()) == min(P, total) > int(informative.sum())
    assert len(set(roll.batch.tolist())) == P * G  # no row twice


def killed_and_resumed(sft_run: Path, tmp_path: Path, monkeypatch, kw: dict) -> dict:
    """An rl run of 4 steps into tmp_path/full; the same into tmp_path/part killed in step 4
    (after the step-2 checkpoint) and resumed. -> the full run's summary."""
    summary = rl(rl_config(sft_run, tmp_path / "full", **kw))
    real, calls = rl_mod.group_advantages, {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rl_mod, "group_advantages", crash)
    with pytest.raises(KeyboardInterrupt):
        rl(rl_config(sft_run, tmp_path / "part", **kw))
    monkeypatch.setattr(rl_mod, "group_advantages", real)
    rl(RLConfig(out=str(tmp_path / "part"), resume=True, progress=False, threads=1))
    return summary


def untimed(out: Path) -> list[dict]:
    """The run's metrics without the clocks (which differ between runs)."""
    timing = ("elapsed", "rollout_s", "update_s", "train_s", "rollout_wait_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in records(out)]


def test_grpo_exact_resume(sft_run, tmp_path, monkeypatch):
    """grpo with a reference model and two minibatch updates per step: killed mid-run,
    resumed, the same prompts, samples and updates as the uninterrupted run."""
    kw = dict(
        steps=4,
        save_every=2,
        eval_every=2,
        variant="grpo",
        updates_per_batch=2,
        minibatches=2,
        prompts_per_step=2,
        group_size=4,
    )
    killed_and_resumed(sft_run, tmp_path, monkeypatch, kw)
    full = untimed(tmp_path / "full")
    assert untimed(tmp_path / "part") == full
    assert [r["step"] for r in full if "val_accuracy" in r] == [0, 2, 4]
    assert all(r["kl"] >= 0 and r["ratio"] > 0 for r in full if "kl" in r)
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["steps"] == 4


def test_behaviour_logprobs_are_the_sampling_distributions(sft_run, tok):
    """What async GRPO's ratio divides by: each completion token's (and the stop token's)
    log-probability under the distribution it was drawn from (temperature included), placed
    where the loss mask is, computed by the engine over its latent cache: checked against
    the plain forward of the sampled sequences."""
    model, _ = load_model(sft_run)
    cfg = rl_config(sft_run, Path("unused"), async_rollouts=True, temperature=0.7)
    engine = Engine(model, tok, max_batch=32, max_len=64)
    roll, _ = rl_mod.rollout(engine, tok, Yes(), cfg, 0, 0)
    with torch.no_grad():
        logits = model(roll.ids[:, :-1]).logits
    plain = (logits / 0.7).log_softmax(-1).gather(-1, roll.ids[:, 1:, None])[..., 0]
    m = roll.mask.bool()
    assert (~roll.truncated).any()  # some stopped: their stop token is in the mask
    assert torch.allclose(roll.behaviour_logp[m], plain[m], atol=1e-4)
    assert (roll.behaviour_logp[~m] == 0).all()
    raw = logits.log_softmax(-1).gather(-1, roll.ids[:, 1:, None])[..., 0]
    assert not torch.allclose(roll.behaviour_logp[m], raw[m], atol=1e-2)  # not the T = 1 ones


def test_async_rollouts_lag_one_update_and_resume_exactly(sft_run, tmp_path, monkeypatch):
    """--async-rollouts: the rollouts of step t sample the weights from before step t - 1's
    update (step 0's and 1's both the starting weights), in a process of their own; the
    ratio is to what they were sampled with. Killed mid-run and resumed (the weights of
    the rollouts in flight come back from the checkpoint), the run repeats the
    uninterrupted one."""
    kw = dict(steps=4, save_every=2, eval_every=2, async_rollouts=True, dtype="fp32")
    kw.update(prompts_per_step=2, group_size=4)
    summary = killed_and_resumed(sft_run, tmp_path, monkeypatch, kw)
    full = records(tmp_path / "full")
    assert untimed(tmp_path / "part") == untimed(tmp_path / "full")
    steps = [r for r in full if "reward" in r]
    assert all("rollout_wait_s" in r and r["train_s"] > 0 for r in steps)
    # step 1 (the first): sampled from the weights it trains, so the ratio is 1 (fp32);
    # step 2: sampled from the same starting weights, trained one update later
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert abs(steps[1]["ratio"] - 1.0) > 1e-4
    assert summary["async_rollouts"] and summary["steps"] == 4


@dataclass
class Boom(Yes):
    """Its verifier fails in the rollout process only (the trainer's evaluation works)."""

    name = "boom"

    def reward(self, problem, completion, *args, **kwargs):
        if multiprocessing.parent_process() is not None:
            raise ValueError("the verifier exploded")
        return super().reward(problem, completion, *args, **kwargs)


def test_async_rollout_errors_reach_the_trainer(sft_run, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "boom", Boom)
    cfg = rl_config(sft_run, tmp_path / "boom", task="boom", async_rollouts=True)
    with pytest.raises(PostTrainError, match="the verifier exploded"):
        rl(cfg)
    with pytest.raises(PostTrainError, match="GPU"):
        rl_config(sft_run, tmp_path / "gpu", async_rollouts=True, device="cuda").validate()


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_runs_and_errors_are_one_line(sft_run, base, chats, tmp_path, cli):
    out = tmp_path / "rl"
    r = cli(
        "rl",
        sft_run,
        "--task",
        "yes",
        "--out",
        out,
        "--steps",
        1,
        "--prompts-per-step",
        2,
        "--group-size",
        2,
        "--max-completion-tokens",
        8,
        "--eval-n",
        2,
        "--no-progress",
        "--threads",
        1,
    )
    assert r.code == 0 and "rl summary" in r.err
    r = cli(
        "sft",
        base,
        "--data",
        chats,
        "--out",
        tmp_path / "sft",
        "--steps",
        1,
        "--batch-size",
        2,
        "--no-progress",
        "--threads",
        1,
    )
    assert r.code == 0 and "sft summary" in r.err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "hi"}]}\nnot json\n')
    cases = [
        (("rl", sft_run, "--task", "yes", "--out", out, "--steps", 1), "--resume"),
        (
            (
                "rl",
                sft_run,
                "--task",
                "yes",
                "--out",
                tmp_path / "x",
                "--steps",
                1,
                "--group-size",
                1,
            ),
            "--group-size must be >= 2",
        ),
        (("rl", sft_run, "--task", "nope", "--out", tmp_path / "x", "--steps", 1), "unknown task"),
        (
            (
                "rl",
                sft_run,
                "--task",
                "yes",
                "--out",
                tmp_path / "x",
                "--steps",
                1,
                "--variant",
                "ppo",
            ),
            "--variant must be one of",
        ),
        (
            ("rl", tmp_path / "missing", "--task", "yes", "--out", tmp_path / "x", "--steps", 1),
            "not a checkpoint directory",
        ),
        (("rl", sft_run, "--task", "yes", "--out", tmp_path / "x"), "give a budget"),
        (
            ("sft", base, "--data", bad, "--out", tmp_path / "y", "--steps", 1),
            "line 1: message 1 has role 'bot'",
        ),
        (("sft", base, "--out", tmp_path / "y", "--steps", 1), "--data"),
        (("sft", "--out", tmp_path / "none", "--resume"), "no checkpoint"),
    ]
    for argv, message in cases:
        r = cli(*argv)
        assert r.code == 2, argv
        assert message in r.err and len(r.err.strip().splitlines()) == 1, (argv, r.err)


def test_trl_benchmark_compares_the_time_to_the_same_accuracy():
    """benchmarks.grpo_trl's gain per CPU-minute: the minutes nanoseek needs to hold TRL's
    final accuracy over three evaluations in a row (one lucky evaluation does not count)."""
    import numpy as np

    from benchmarks.grpo_trl import time_to_reach

    trl = np.array([[0, 0.54, 0], [450, 0.60, 300], [900, 0.68, 600]])  # [seconds, acc, step]
    acc = [0.54, 0.66, 0.70, 0.64, 0.69, 0.70, 0.72]
    ours = np.array([[60 * i, a, 100 * i] for i, a in enumerate(acc)])
    line = time_to_reach(trl, ours)  # 70% at 2 min alone; 0.69-0.72 averages 70.3% at 6 min
    assert "after 6.0" in line and "2.50x" in line and "steps 400-600" in line
    trl[-1, 1] = 0.80
    assert "never held" in time_to_reach(trl, ours)
