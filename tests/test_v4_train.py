"""Training DeepSeek-V4 (tiny-v4) with `nanoseek train`: learning, exact resume,
auxiliary-loss-free balancing of the learned-routing layers, the CSA indexers' KL, Muon,
FLOPs per token, and the one-process limit. A tiny corpus each test makes: seconds each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_train import SNIPPET, _crash_in_step, losses, tiny_run

from nanoseek.compute import decode_flops, flops_per_token
from nanoseek.config import get_any_preset, get_preset
from nanoseek.data import prepare
from nanoseek.hub import from_pretrained
from nanoseek.model.moe_v4 import V4MoE
from nanoseek.model.v4 import V4Transformer, indexer_kl_v4
from nanoseek.train import TrainError, load_imbalance, train, update_expert_bias
from nanoseek.train.muon import muon_parameters
from nanoseek.train.pretrain import check_v4
from nanoseek.train.run import build_optimizer


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A tiny repeated corpus -> 300-token BPE + shards (train and val)."""
    root = tmp_path_factory.mktemp("corpus_v4")
    src = root / "src"
    src.mkdir()
    for i in range(100):
        (src / f"mod{i:02d}.py").write_text(SNIPPET.replace("add", f"add{i % 7}") * 4)
    return prepare(str(src), root / "shards", vocab_size=300, verbose=False)


def v4_run(shards: Path, out: Path, **kw):
    # 64 tokens: 16 CSA entries per sequence, more than index_topk (8), so CSA is sparse
    return tiny_run(shards, out, **{"preset": "tiny-v4", "seq_len": 64, **kw})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_v4_trains_end_to_end(shards, tmp_path, cli):
    """`nanoseek train --preset tiny-v4`: the loss falls, every step logs the indexers' KL
    and the balanced layers' loads, the summary has FLOPs and MFU, the checkpoint opens as
    a V4Transformer with its routing biases moved."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny-v4", "--data", shards, "--out", out, "--steps", 16]
    argv += ["--batch-size", 4, "--seq-len", 64, "--lr", 3e-3, "--warmup-steps", 2]
    argv += ["--eval-every", 0, "--eval-batches", 2, "--threads", 1, "--no-progress"]
    assert cli(*argv).code == 0
    ls = losses(out)
    assert len(ls) == 16 and sum(ls[-3:]) / 3 < 0.75 * sum(ls[:3]) / 3, ls
    recs = records(out)
    model = from_pretrained(out / "ckpt")
    assert isinstance(model, V4Transformer) and model.config.vocab_size == 300
    n_balanced = len(model.moe_layers())  # learned routing only: layer 0 is hash-routed
    assert n_balanced == model.config.num_hidden_layers - model.config.num_hash_layers
    assert all(len(r["load_max_mean"]) == n_balanced for r in recs)
    assert all(r["indexer_kl"] > 0 and math.isfinite(r["indexer_kl"]) for r in recs)
    for moe in model.moe_layers():  # 16 steps of +-gamma: every bias has moved
        assert moe.gate.e_score_correction_bias.abs().min() > 0
    s = json.loads((out / "summary.json").read_text())
    cfg = model.config
    assert s["flops_per_token"] == pytest.approx(flops_per_token(cfg, 64, training=True))
    assert 0 < s["mfu"] < 1 and s["final_val_loss"] < s["unigram_loss"]


def test_exact_resume(shards, tmp_path, monkeypatch):
    """Killed in step 6 (after the step-4 checkpoint) and resumed: the same loss and
    indexer-KL curve as the uninterrupted run, bit for bit."""
    train(v4_run(shards, tmp_path / "full", steps=8, save_every=4))
    _crash_in_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(v4_run(shards, tmp_path / "part", steps=8, save_every=4))
    monkeypatch.undo()
    train(v4_run(shards, tmp_path / "part", steps=8, save_every=4, resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert losses(tmp_path / "part", "indexer_kl") == losses(tmp_path / "full", "indexer_kl")
    a, b = (from_pretrained(tmp_path / d / "ckpt") for d in ("full", "part"))
    for (n1, t1), (n2, t2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(t1, t2), n1  # routing biases and hash tables too


def test_expert_counts_and_bias_move_load_towards_balance():
    """expert_counts has one row per learned-routing layer (hash layers have no bias to
    move); update_expert_bias moves V4's e_score_correction_bias towards balance."""
    torch.manual_seed(0)
    cfg = get_preset("tiny-v4")
    model = V4Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    counts = model(ids, targets=ids).expert_counts
    assert counts.shape == (len(model.moe_layers()), cfg.n_routed_experts) == (3, 8)
    assert (counts.sum(1) == ids.numel() * cfg.num_experts_per_tok).all()
    moe = model.moe_layers()[0]
    assert isinstance(moe, V4MoE) and not moe.is_hash
    with torch.no_grad():  # a router that sends every token to experts 0 and 1
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[:2] += 0.3
    x = torch.randn(512, cfg.hidden_size) + 0.5  # a direction every token shares

    def load() -> torch.Tensor:
        with torch.no_grad():
            _, _, idx = moe.gate(x)
        return torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)[None]

    before = load_imbalance(load())[0]
    for _ in range(200):
        update_expert_bias([moe], load(), gamma=0.01)
    after = load_imbalance(load())[0]
    assert before > 3.0 and after < 1.6, (before, after)  # 4.0: top-2 of 8 collapsed
    bias = moe.gate.e_score_correction_bias
    assert bias[:2].max() < bias[2:].min()  # the favoured experts pushed down
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)  # a buffer: never trained
    assert all(id(b) not in {id(p) for g in opt.param_groups for p in g["params"]}
               for b in model.buffers())  # fmt: skip


def test_indexer_kl_trains_only_the_indexers():
    """The CSA indexers' KL to the main attention over the entries they select falls with
    steps on it, and reaches no other parameter (the LM loss never reaches the indexers)."""
    torch.manual_seed(0)
    # init std 0.2, not 0.02: attention far from uniform, so there is something to learn
    cfg = get_preset("tiny-v4").replace(initializer_range=0.2)
    model = V4Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    assert indexer_kl_v4(model, ids[:, :3]).item() == 0  # no entry visible yet: no loss
    params = [p for n, p in model.named_parameters() if ".indexer." in n]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(params, lr=1e-2)
    kls = []
    for _ in range(25):
        kl = indexer_kl_v4(model, ids)
        opt.zero_grad()
        kl.backward()
        opt.step()
        kls.append(kl.item())
    assert kls[-1] < 0.2 * kls[0], kls  # measured: 0.36 -> 0.04
    for n, p in model.named_parameters():
        if ".indexer." not in n:
            assert p.grad is None and torch.equal(p, before[n]), n
    assert all(
        not torch.equal(p, before[n]) for n, p in model.named_parameters() if ".indexer.q_b" in n
    )


def test_muon_trains_v4_and_resumes_exactly(shards, tmp_path, monkeypatch):
    """--optimizer muon: Muon for the blocks' matrices (attention, compressors, indexers,
    experts stacked 3-D), AdamW for embedding, head, routers, hyper-connections, biases."""
    model = V4Transformer(get_preset("tiny-v4"))
    muon, rest = muon_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names, rest_names = {names[id(p)] for p in muon}, {names[id(p)] for p in rest}
    assert "model.layers.1.mlp.experts.gate_up_proj" in muon_names  # 3-D, batched
    assert "model.layers.1.self_attn.compressor.indexer.q_b_proj.weight" in muon_names
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.attn_hc.fn",
        "model.hc_head.hc_fn",
        "model.layers.1.self_attn.compressor.position_bias",
    } <= rest_names
    kw = dict(steps=8, save_every=4, optimizer="muon")
    train(v4_run(shards, tmp_path / "full", **kw))
    full = losses(tmp_path / "full")
    assert full[-1] < full[0] - 0.5, full
    _crash_in_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train(v4_run(shards, tmp_path / "part", **kw))
    monkeypatch.undo()
    train(v4_run(shards, tmp_path / "part", resume=True, **kw))
    assert losses(tmp_path / "part") == full  # the Muon momenta came back exactly


def test_flops_per_token_averages_decode_flops_over_positions():
    """Training FLOPs per token of a V4 config: 3x the forward, and the forward is the
    decode cost of each position (context = its index) averaged over the sequence."""
    for name, seq in (("tiny-v4", 64), ("deepseek-v4-flash", 300)):
        cfg = get_any_preset(name)
        mean = sum(decode_flops(cfg, L)["total"] for L in range(1, seq + 1)) / seq
        assert flops_per_token(cfg, seq, training=False) == pytest.approx(mean, rel=1e-12)
        assert flops_per_token(cfg, seq) == pytest.approx(3 * mean, rel=1e-12)


def test_v4_refuses_torchrun_the_balance_loss_and_the_v32_warmup(shards, tmp_path):
    model = V4Transformer(get_preset("tiny-v4"))
    check_v4(model, SimpleNamespace(alpha=0.0), SimpleNamespace(world=1))
    with pytest.raises(TrainError, match="one process"):
        check_v4(model, SimpleNamespace(alpha=0.0), SimpleNamespace(world=2))
    with pytest.raises(TrainError, match="--alpha 0"):
        check_v4(model, SimpleNamespace(alpha=1e-4), SimpleNamespace(world=1))
    with pytest.raises(TrainError, match="indexer-loss-weight"):
        train(v4_run(shards, tmp_path / "w", steps=1, indexer_warmup_steps=2))
