"""V4 attention's full-sequence forms go by blocks of queries (`attention_v4.QUERY_BLOCK`):
each block reads the keys its window reaches and (CSA) each query's chosen entries. Here,
with blocks forced small, against the dense form -- one [S, S + T] masked softmax, the
math as transformers writes it -- on a model's logits and every parameter's gradient, on
the CSA indexers' KL and its gradient, and through a cached prefill: several blocks, the
window reaching back across them, partial compressor windows and more entries than
index_topk."""

from __future__ import annotations

import pytest
import torch
from test_v4_cache import random_model
from v4_configs import small

from nanoseek.infer import V4Cache, V4Runner
from nanoseek.model import attention_v4
from nanoseek.model.attention_v4 import (
    V4Attention,
    causal_bias,
    rope_tail,
    selected_bias,
    sink_attention,
    sink_probs,
    sliding_bias,
)
from nanoseek.model.v4 import indexer_kl_v4

TOL = dict(rtol=1e-5, atol=1e-5)
S = 101  # 25 CSA entries (index_topk 4), 12 HCA entries, a partial last window


def dense_inputs(attn: V4Attention, x: torch.Tensor, pos: torch.Tensor):
    """-> (q, kv [B, 1, S + T, hd], mask [B, 1, S, S + T], cos, sin, index scores or None,
    top or None): every key and entry for every query, masked (the reference's)."""
    q, q_latent, cos, sin = attn.queries(x, pos)
    kv, mask = attn.token_keys(x, cos, sin), sliding_bias(pos, attn.window)
    scores = top = None
    if attn.compressor is not None:
        entries = attn.compressor(x)
        T = entries.shape[1]
        if attn.indexer is not None:
            scores, visible = attn.indexer.scores(x, q_latent, pos)  # [B, S, T] at once
            top = attn.indexer.select(scores.detach(), visible)
            extra = selected_bias(top, T)
        else:
            extra = causal_bias(pos, T, attn.compressor.rate)
        kv = torch.cat([kv, entries.unsqueeze(1)], dim=2)
        mask = torch.cat([mask, extra], dim=-1)
    return q, kv, mask, cos, sin, scores, top


def dense_forward(attn: V4Attention, x: torch.Tensor, pos: torch.Tensor, cache=None):
    assert cache is None
    B, S, _ = x.shape
    q, kv, mask, cos, sin, _, _ = dense_inputs(attn, x, pos)
    out = sink_attention(q, kv, mask, attn.sinks, attn.scale)
    out = rope_tail(out, cos.transpose(1, 2), -sin.transpose(1, 2))
    return attn.o_b_proj(attn.o_a_proj(out.reshape(B, S, attn.o_groups, -1)).flatten(2))


def dense_indexer_kl(attn: V4Attention, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """V4Attention.indexer_kl over every entry: probabilities and index scores [B, S, T]."""
    S = x.shape[1]
    q, kv, mask, _, _, scores, top = dense_inputs(attn, x, pos)
    with torch.no_grad():
        p = sink_probs(q, kv, mask, attn.sinks, attn.scale)[..., S:].float().sum(1)
        mass = p.sum(-1, keepdim=True)
        p = p / mass.clamp(min=1e-30)
    keep = selected_bias(top, scores.shape[-1])[:, 0] == 0
    rows = keep.any(-1) & (mass[..., 0] > 0)
    logq = scores.masked_fill(~keep, torch.finfo(scores.dtype).min).log_softmax(-1)
    kl = (torch.xlogy(p, p) - p * logq.masked_fill(~keep, 0.0)).sum(-1)
    return kl[rows].mean()


CONFIGS = {
    "mixed": small(),  # window / CSA / HCA / CSA, window 8
    "hca-first": small(compress_ratios=(8, 0, 4, 8), sliding_window=6, index_topk=2, hc_mult=2),
}


def logits_and_grads(model, ids: torch.Tensor):
    """The logits, and every parameter's gradient of the training loss (next-token
    cross-entropy, the mean over tokens)."""
    model.zero_grad()
    with torch.no_grad():
        logits = model(ids).logits
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, grads


# CSA's two ways to read the chosen entries (GATHER_OVER): gather them (0), mask all (1000)
GATHER = pytest.mark.parametrize("gather_over", [0, 1000])


# block 5: the window (6 or 8) reaches back over two blocks; 8: blocks of the window's
# size; 256: one block, as every sequence shorter than QUERY_BLOCK
@GATHER
@pytest.mark.parametrize("block", [5, 8, 256])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_blocked_forward_and_grads_equal_dense(name, block, gather_over, monkeypatch):
    model = random_model(CONFIGS[name]).train()
    ids = torch.randint(0, 64, (2, S), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(attention_v4, "QUERY_BLOCK", block)
    monkeypatch.setattr(attention_v4, "GATHER_OVER", gather_over)
    got, got_grads = logits_and_grads(model, ids)
    with monkeypatch.context() as m:
        m.setattr(V4Attention, "forward", dense_forward)
        want, want_grads = logits_and_grads(model, ids)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, **TOL)
    assert got_grads.keys() == want_grads.keys()
    for n, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[n], **TOL, msg=n)


@GATHER
@pytest.mark.parametrize("block", [5, 256])
def test_blocked_indexer_kl_equals_dense(block, gather_over, monkeypatch):
    """One CSA layer's KL on a random input: the value and the indexer's gradient."""
    model = random_model(CONFIGS["mixed"])
    attn = model.model.layers[1].self_attn
    assert attn.indexer is not None
    x = torch.randn(2, S, model.config.hidden_size)
    pos = torch.arange(S).expand(2, S)
    params = list(attn.indexer.parameters())
    monkeypatch.setattr(attention_v4, "QUERY_BLOCK", block)
    monkeypatch.setattr(attention_v4, "GATHER_OVER", gather_over)
    got = attn.indexer_kl(x, pos)
    got_grads = torch.autograd.grad(got, params)
    want = dense_indexer_kl(attn, x, pos)
    want_grads = torch.autograd.grad(want, params)
    assert want > 0
    torch.testing.assert_close(got, want, **TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    assert indexer_kl_v4(model, x.new_zeros(1, 3, dtype=torch.long)).item() == 0  # no entry yet


@GATHER
def test_blocked_prefill_equals_dense(gather_over, monkeypatch):
    """The engine's prefill goes by blocks too (right-padded rows): its logits, and then
    decode steps from the cache it left, against the dense full forward."""
    cfg = CONFIGS["mixed"]
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(V4Attention, "forward", dense_forward)
        full = model(ids).logits
    monkeypatch.setattr(attention_v4, "QUERY_BLOCK", 5)
    monkeypatch.setattr(attention_v4, "GATHER_OVER", gather_over)
    lens, T = torch.tensor([37, 22]), 37
    cache = V4Cache(cfg, 2, 64, torch.float32, "cpu")
    runner = V4Runner(model, cache)
    start = cache.allocate(2)
    logits = runner.logits(
        runner.forward(ids[:, :T], torch.arange(T).expand(2, T), start, lens=lens)
    )
    for b in range(2):
        torch.testing.assert_close(logits[b, : lens[b]], full[b, : lens[b]], rtol=0, atol=1e-4)
    pos, rows = lens.clone(), torch.arange(2)
    for _ in range(8):
        got = runner.logits(runner.forward(ids[rows, pos][:, None], pos[:, None], start))
        torch.testing.assert_close(got[:, 0], full[rows, pos], rtol=0, atol=1e-4)
        pos += 1
