"""Post-training building blocks: tasks and verifiers, rewards, the GRPO losses, SFT data."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.posttrain.errors import PostTrainError
from nanoseek.posttrain.grpo import (
    GRPOConfig,
    group_advantages,
    informative_groups,
    mask_truncated,
    overlong_penalty,
    policy_loss,
)
from nanoseek.posttrain.sft_data import collate, example_indices, get_batch, load_sft
from nanoseek.posttrain.tasks import (
    TASKS,
    Arithmetic,
    Countdown,
    Problem,
    Task,
    evaluate_expression,
    get_task,
    parse_completion,
)

NASTY = [None, "", 12, "9**9**9", "1/0", "١٢", "9" * 10_000, "(" * 300, "<think>", "</think>"]


# --- tasks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_held_out_is_fixed_and_never_in_training(name):
    task = get_task(name)
    held = task.held_out(50)
    assert [p.prompt for p in held] == [p.prompt for p in get_task(name).held_out(50)]
    assert [p.prompt for p in task.held_out(20)] == [p.prompt for p in held[:20]]  # a prefix
    train = task.generate(1, 500)
    assert len({p.prompt for p in train}) == 500
    assert not {p.prompt for p in train} & {p.prompt for p in task.held_out(1000)}
    assert [p.prompt for p in task.generate(2, 5)] != [p.prompt for p in train[:5]]
    assert all(task.verify(p, p.answer) for p in held + train)  # references verify
    with pytest.raises(PostTrainError, match="training seeds start at 1"):
        task.generate(0, 5)


def test_small_task_dedupes_against_held_out():
    """1-digit sums have 100 distinct prompts: held-out and training sets share none."""
    task = Arithmetic(min_digits=1, max_digits=1, ops="+")
    task.held_out_max = 30
    held = {p.prompt for p in task.held_out(30)}
    train = {p.prompt for p in task.generate(1, 60)}
    assert len(held) == 30 and len(train) == 60 and not held & train
    with pytest.raises(PostTrainError, match="only 70 distinct problems"):
        task.generate(1, 80)


def test_arithmetic_verifier():
    p = Problem("What is 123 + 45?", "168")
    assert Arithmetic().verify(p, "168") and Arithmetic().verify(p, " 168\n")
    for bad in ["167", "١٦٨", "1_68", "+168", "168.0", "16 8", "0168 0", *NASTY]:
        assert not Arithmetic().verify(p, bad), bad
    sub = Arithmetic(ops="-").held_out(200)
    assert all(int(q.answer) >= 0 for q in sub)
    mul = Arithmetic(min_digits=3, max_digits=3, ops="*").held_out(1)[0]
    assert int(mul.answer) == mul.meta["a"] * mul.meta["b"] >= 100 * 100


def test_countdown_verifier_is_exact_and_safe():
    p = Problem("...", "3 * 12", {"numbers": [3, 7, 12, 5, 5], "target": 36})
    c = Countdown()
    for good in ["3 * 12", "3*12", " (7 + 5) * 3 ", "((3)) * 12", "12 * 3"]:
        assert c.verify(p, good), good
    bad = [
        "36",  # not a given number
        "12 + 12 + 12",  # 12 used three times
        "3 * 12 + 7 / (5 - 5)",  # division by zero
        "-3 * -12",  # unary minus
        "3 ** 2 * 4",  # power
        "3 * 12 = 36",
        "٣ * ١٢",  # unicode digits
        "3.0 * 12",
        "03 * 12",
        "3 * 12 # c",
        "__import__('os')",
        "1e3",
        *NASTY,
    ]
    for b in bad:
        assert not c.verify(p, b), b
    # exact arithmetic: 7/5 + 3/5 is exactly 2 (needs both 5s)
    assert evaluate_expression("(7 / 5 + 3 / 5) * 12", [3, 7, 12, 5, 5]) == 24
    assert evaluate_expression("(7 / 5 + 3 / 5) * 12", [3, 7, 12, 5]) is None
    assert evaluate_expression("7 / 3", [7, 3]) * 3 == 7  # a Fraction, not a float


def test_registry_and_a_user_task(monkeypatch):
    with pytest.raises(
        PostTrainError, match="unknown task 'nope'; choose one of: arithmetic, countdown"
    ):
        get_task("nope")
    with pytest.raises(PostTrainError, match="bad settings"):
        get_task("arithmetic", digits=3)
    with pytest.raises(PostTrainError, match="ops"):
        get_task("arithmetic", ops="/")

    @dataclass
    class Reverse(Task):  # the example of the module docstring
        name = "reverse"
        length: int = 5

        def sample(self, rng: random.Random) -> Problem:
            word = "".join(rng.choice("abcdefgh") for _ in range(self.length))
            return Problem(f"Reverse the letters of {word}.", word[::-1])

    monkeypatch.setitem(TASKS, "reverse", Reverse)
    task = get_task("reverse", length=6)
    p = task.held_out(3)[0]
    word = p.prompt.split()[-1].rstrip(".")
    assert len(word) == 6 and task.reward(p, f"x</think>{word[::-1]}").correct


# --- rewards --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion,correct,formatted",
    [
        ("add them</think>168", True, True),
        ("<think>add them</think>168", True, True),
        ("  <think>add</think> 168 \n", True, True),
        ("</think>168", True, True),  # empty reasoning is still the format
        ("168", False, False),  # no </think>: no answer part
        ("168 <think>add</think>", False, False),  # the answer outside the tags
        ("add</think>", False, False),  # empty answer
        ("add</think>   ", False, False),
        ("add</think>167", False, True),
        ("a<think>b</think>168", True, False),  # nested tags lose the format bonus only
        ("<think><think>b</think>168", True, False),
        ("a</think>b</think>168", True, False),  # judged on the text after the last </think>
        ("a</think>168</think>", False, False),
        ("a</think>" + "9" * 10_000, False, True),
        ("a</think>١٦٨", False, True),
        (None, False, False),
        (b"a</think>168", False, False),
        ("", False, False),
    ],
)
def test_reward(completion, correct, formatted):
    p = Problem("What is 123 + 45?", "168")
    r = Arithmetic().reward(p, completion)
    assert (r.correct, r.formatted) == (correct, formatted)
    assert r.total == pytest.approx(1.0 * correct + 0.1 * formatted)
    assert (
        Arithmetic().reward(p, completion, correct_weight=2, format_weight=0).total == 2 * correct
    )


def test_parse_completion_keeps_text_as_written():
    assert parse_completion("<think> a b </think> 42 ") == (" a b ", " 42 ")
    assert parse_completion(" a </think>42") == (" a ", "42")
    assert parse_completion("a</think>4<think>2") is None


def test_countdown_rewards_never_crash():
    task = Countdown()
    p = task.held_out(1)[0]
    for junk in NASTY + ["x</think>" + j for j in NASTY if isinstance(j, str)]:
        assert not task.reward(p, junk).correct
    assert task.reward(p, f"try</think>{p.answer}").total == pytest.approx(1.1)


# --- GRPO -----------------------------------------------------------------------------------
def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3])
    adv = group_advantages(r, 4, scale_std=True, eps=0.0)
    # group 1: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5; group 2: no variance -> exactly 0
    assert adv.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0])
    assert (adv[4:] == 0).all() and not adv.isnan().any()
    assert group_advantages(r, 4, scale_std=False).tolist() == pytest.approx(
        [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]
    )
    assert group_advantages(r, 4)[0].item() == pytest.approx(0.75 / (0.5 + 1e-4))
    assert informative_groups(r, 4).tolist() == [True, False]
    with pytest.raises(PostTrainError, match="group_size"):
        group_advantages(r, 3)


# ratio r = exp(logp - old_logp); row 0 has advantage +1, row 1 advantage -1 and 2 tokens
RATIOS = torch.tensor([[1.5, 0.5, 1.25], [1.1, 0.7, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -1.0])


def _loss(variant, **kw):
    logp = RATIOS.log()
    return policy_loss(logp, torch.zeros(2, 3), kw.pop("ref_logp", None), ADV, MASK, variant, **kw)


def test_policy_loss_by_hand():
    # eps 0.2: row 0 surrogates min(rA, clip(r)A) = [1.2 (clipped high), 0.5 (a low ratio
    # with A > 0 is not clipped), 1.2]; row 1 = [-1.1, -0.8 (clipped low)]
    loss, stats = _loss("grpo", epsilon=0.2)
    assert loss.item() == pytest.approx(((-2.9 / 3) + (1.9 / 2)) / 2)  # per-sequence means
    assert stats["clip_high"].item() == pytest.approx(2 / 5)
    assert stats["clip_low"].item() == pytest.approx(1 / 5)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.25 + 1.1 + 0.7) / 5)
    assert stats["kl"].item() == 0
    loss, _ = _loss("dr_grpo", epsilon=0.2)
    assert loss.item() == pytest.approx((-2.9 + 1.9) / (2 * 3))  # sum / (B * T)
    loss, _ = _loss("dr_grpo", epsilon=0.2, max_len=8)
    assert loss.item() == pytest.approx((-2.9 + 1.9) / (2 * 8))
    # clip-higher: 1.25 < 1.28 now passes unclipped, 1.5 clips at 1.28; mean over 5 tokens
    loss, stats = _loss("dapo", epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx((-(1.28 + 0.5 + 1.25) + 1.9) / 5)
    assert stats["clip_high"].item() == pytest.approx(1 / 5)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_batch(variant):
    full, _ = _loss(variant, epsilon=0.2)
    norm = {"grpo": 2, "dr_grpo": 2, "dapo": int(MASK.sum())}[variant]
    parts = [
        policy_loss(
            RATIOS.log()[i : i + 1],
            torch.zeros(1, 3),
            None,
            ADV[i : i + 1],
            MASK[i : i + 1],
            variant,
            epsilon=0.2,
            normalizer=norm,
        )[0]
        for i in range(2)
    ]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item())


def test_k3_kl_penalty():
    # pi_ref = 2 pi_theta on every token: k3 = 2 - log 2 - 1
    k3 = 1 - math.log(2)
    ref = RATIOS.log() + math.log(2)
    base = {v: _loss(v, epsilon=0.2)[0].item() for v in ("grpo", "dr_grpo", "dapo")}
    for v, share in (("grpo", 1.0), ("dapo", 1.0), ("dr_grpo", 5 / 6)):
        loss, stats = _loss(v, epsilon=0.2, beta=0.1, ref_logp=ref)
        assert loss.item() == pytest.approx(base[v] + 0.1 * k3 * share)
        assert stats["kl"].item() == pytest.approx(k3)
    loss, stats = _loss("grpo", epsilon=0.2, beta=0.0, ref_logp=ref)  # monitored, not added
    assert loss.item() == pytest.approx(base["grpo"]) and stats["kl"].item() == pytest.approx(k3)
    with pytest.raises(PostTrainError, match="needs ref_logp"):
        _loss("grpo", beta=0.1)
    with pytest.raises(PostTrainError, match="unknown GRPO variant 'ppo'"):
        _loss("ppo")


def test_kl_gradient_pulls_toward_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -2.0]])
    loss, _ = policy_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 2), "dapo", beta=1.0)
    loss.backward()
    # d/dlogp (e^(ref-logp) - (ref-logp) - 1) = 1 - e^(ref-logp), over 2 tokens
    assert logp.grad[0].tolist() == pytest.approx([(1 - math.exp(0.5)) / 2, 0.0])


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_one_step_raises_the_rewarded_completion(variant):
    """A policy over 3 fixed two-token completions (a logit table per position): one step
    on a group where only completion 1 is rewarded makes it likelier, the others less so."""
    table = torch.zeros(2, 3, requires_grad=True)
    completions = torch.tensor([[0, 0], [1, 1], [2, 2]])

    def logp() -> torch.Tensor:  # [3, 2]
        return table.log_softmax(-1).expand(3, 2, 3).gather(-1, completions[..., None])[..., 0]

    cfg = GRPOConfig.for_variant(variant)
    adv = group_advantages(torch.tensor([0.0, 1.0, 0.0]), 3, cfg.scale_std)
    before = logp().sum(1).exp().detach()
    lp = logp()
    ref = lp.detach() if cfg.beta > 0 else None
    loss, stats = policy_loss(
        lp,
        lp.detach(),
        ref,
        adv,
        torch.ones(3, 2),
        variant,
        cfg.beta,
        cfg.epsilon,
        cfg.epsilon_high,
    )
    loss.backward()
    with torch.no_grad():
        table -= 1.0 * table.grad
    after = logp().sum(1).exp()
    assert after[1] > before[1] and after[0] < before[0] and after[2] < before[2]
    assert stats["ratio"].item() == 1.0 and stats["clip_low"].item() == 0


def test_overlong_and_truncation():
    pen = overlong_penalty(torch.tensor([10, 12, 14, 16, 20]), max_len=16, cache=4)
    assert pen.tolist() == pytest.approx([0, 0, -0.5, -1.0, -1.0])
    assert (overlong_penalty(torch.tensor([99]), 16, 0) == 0).all()
    mask = torch.ones(3, 2)
    assert mask_truncated(mask, torch.tensor([False, True, False])).tolist() == [
        [1, 1],
        [0, 0],
        [1, 1],
    ]
    assert GRPOConfig.for_variant("dapo").epsilon_high == 0.28
    assert not GRPOConfig.for_variant("dr_grpo").scale_std
    with pytest.raises(PostTrainError, match="unknown GRPO variant"):
        GRPOConfig("reinforce")


# --- SFT data -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ["the cat sat on the mat. <think>why</think> 12 + 34 = 46\n" * 40] * 2
    return Tokenizer.train(texts, vocab_size=300)


CHATS = [
    [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "a greeting"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "bye"},
    ],
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loss_mask_is_exactly_the_assistant_tokens(tok, tmp_path):
    f = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": m}) for m in CHATS])
    data = load_sft(f, tok, seq_len=512)
    assert len(data.examples) == 2 and data.truncated == 0 and not data.problems
    expected_text = [
        "<|bos|><|user|>What is 1 + 2?<|end|><|assistant|>3<|end|>",
        "<|bos|><|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|><think>a greeting"
        "</think>hello<|end|><|user|>and?<|end|><|assistant|>bye<|end|>",
    ]
    expected_trained = ["3<|end|>", "<think>a greeting</think>hello<|end|>bye<|end|>"]
    for e, text, trained in zip(data.examples, expected_text, expected_trained, strict=True):
        assert tok.decode(e.ids) == text
        assert tok.decode([i for i, m in zip(e.ids, e.mask, strict=True) if m]) == trained
    x, y = collate(data.examples, tok.pad_id)
    for b, trained in enumerate(expected_trained):
        assert tok.decode(y[b][y[b] != -100].tolist()) == trained
        n = len(data.examples[b].ids) - 1
        assert x[b, :n].tolist() == data.examples[b].ids[:-1]
        assert (x[b, n:] == tok.pad_id).all() and (y[b, n:] == -100).all()


def test_batches_are_a_pure_function_of_seed_and_step(tok, tmp_path):
    chats = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
        for i in range(10)
    ]
    f = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": m}) for m in chats])
    data = load_sft(f, tok, seq_len=64)
    a = get_batch(data, 4, seed=3, step=7, pad_id=tok.pad_id)
    b = get_batch(data, 4, seed=3, step=7, pad_id=tok.pad_id)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    # an epoch is a permutation: 10 examples in a batch of 10 over 2 ranks -> 5 each
    epoch = example_indices(10, 10, 3, 0, rank=0, world_size=2) + example_indices(
        10, 10, 3, 0, rank=1, world_size=2
    )
    assert sorted(epoch) == list(range(10))
    assert example_indices(10, 5, 3, 1) != example_indices(10, 5, 4, 1)
    assert sorted(example_indices(10, 5, 3, 2) + example_indices(10, 5, 3, 3)) == list(range(10))


def test_truncation_is_counted(tok, tmp_path):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y " * 40}]
    cut = [{"role": "user", "content": "x " * 80}, {"role": "assistant", "content": "y"}]
    f = _write(tmp_path / "sft.jsonl", [json.dumps({"messages": m}) for m in (long, cut, CHATS[0])])
    data = load_sft(f, tok, seq_len=60)
    assert (data.truncated, data.dropped, len(data.examples)) == (2, 1, 2)
    assert max(len(e.ids) for e in data.examples) == 61
    x, y = collate(data.examples, tok.pad_id)
    assert x.shape[1] == 60 and (y != -100).any()
    with pytest.raises(PostTrainError, match="raise seq_len"):
        load_sft(_write(tmp_path / "cut.jsonl", [json.dumps({"messages": cut})]), tok, seq_len=20)


def test_bad_lines_are_reported_by_number(tok, tmp_path):
    good = [json.dumps({"messages": m}) for m in CHATS]
    bad = [
        "{not json",
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    ]
    f = _write(tmp_path / "sft.jsonl", [*good, good[0], bad[0], "", bad[1], good[1], good[0]])
    with pytest.warns(UserWarning, match="skipped 2 bad line"):
        data = load_sft(f, tok, seq_len=256)
    assert len(data.examples) == 5 and data.lines == 7
    assert data.problems[0].startswith("line 4: not valid JSON")
    assert data.problems[1] == (
        "line 6: message 1 has role 'bot'; use one of system, user, assistant"
    )
    mostly_bad = [
        good[0],
        *bad,
        json.dumps({"messages": []}),
        json.dumps([1]),
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant"}]}),
    ]
    f = _write(tmp_path / "bad.jsonl", mostly_bad)
    with pytest.raises(PostTrainError) as e:
        load_sft(f, tok, seq_len=256)
    msg = str(e.value)
    assert "6 of 7 lines are not valid chats" in msg and "line 2: not valid JSON" in msg
    assert "line 4: no assistant message" in msg and 'line 5: "messages" must be' in msg
    assert "(and" not in msg and "line 7:" not in msg  # the first five problems only
    with pytest.raises(PostTrainError, match='line 1: message 1 "content" must be a string'):
        load_sft(_write(tmp_path / "one.jsonl", [mostly_bad[-1]]), tok, seq_len=256)
    with pytest.raises(PostTrainError, match="no SFT data at"):
        load_sft(tmp_path / "missing.jsonl", tok, seq_len=256)
    with pytest.raises(PostTrainError, match="the file is empty"):
        load_sft(_write(tmp_path / "empty.jsonl", [""]), tok, seq_len=256)
