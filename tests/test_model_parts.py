"""Unit checks of the model's parts: gate, dispatch, RoPE/YaRN, MTP loss, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import (
    ConfigError,
    ModelConfig,
    get_preset,
    kv_cache_bytes_per_token,
    param_counts,
)
from nanoseek.model import Gate, MoE, Transformer
from nanoseek.model.moe import RoutingStats
from nanoseek.model.rope import apply_rope, attention_factor, inv_frequencies, softmax_scale


def gate_config(**kw) -> ModelConfig:
    base = dict(
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        hidden_size=32,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    return get_preset("tiny").replace(**{**base, **kw})


def test_bias_changes_selection_but_not_gate_weights():
    torch.manual_seed(0)
    gate = Gate(gate_config(n_group=1, topk_group=1))
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(64, 32)
    w0, idx0, scores = gate(x)
    gate.bias[3] = 10.0  # expert 3 now wins every selection
    w1, idx1, _ = gate(x)
    assert (idx1 == 3).any(dim=1).all() and not (idx0 == 3).any(dim=1).all()
    # weights are the unbiased sigmoid scores of the chosen experts, normalised, times scale
    expect = scores.gather(1, idx1)
    expect = expect / expect.sum(-1, keepdim=True) * 2.5
    assert torch.allclose(w1, expect)
    assert torch.allclose(w0.sum(-1), torch.full((64,), 2.5))


def test_group_limits_are_respected():
    torch.manual_seed(1)
    cfg = gate_config()
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=1.0)
    _, idx, scores = gate(torch.randn(256, 32))
    groups = idx // (cfg.n_routed_experts // cfg.n_group)
    for row in groups:
        assert len(set(row.tolist())) <= cfg.topk_group
    # and the chosen groups are those with the best top-2 score sums
    g = scores.view(256, 4, 4).topk(2, -1).values.sum(-1)
    best = g.topk(2, -1).indices
    for row, b in zip(groups, best, strict=True):
        assert set(row.tolist()) <= set(b.tolist())


def test_expert_dispatch_equals_a_per_token_reference():
    torch.manual_seed(2)
    cfg = gate_config(moe_intermediate_size=8)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 10, 32)
    stats = RoutingStats()
    out = moe(x, stats)
    flat = x.view(-1, 32)
    w, idx, _ = moe.gate(flat)
    want = moe.shared(flat).clone()
    for t in range(flat.shape[0]):
        for j in range(cfg.num_experts_per_tok):
            e = idx[t, j]
            g, u = (moe.experts.w13[e] @ flat[t]).chunk(2)
            want[t] += w[t, j] * (moe.experts.w2[e] @ (F.silu(g) * u))
    assert torch.allclose(out.view(-1, 32), want, atol=1e-5)
    (counts,) = stats.counts
    assert counts.sum().item() == 20 * cfg.num_experts_per_tok
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_sorted_experts_with_gradients(dtype):
    """The grouped path (grouped_mm, permutations: compiled CPU fp32, and CUDA bf16) against
    the eager loop: outputs and every gradient, with an expert that gets no token; in bf16
    under autocast, as CUDA training runs it, within bf16 rounding."""
    torch.manual_seed(4)
    moe = MoE(gate_config(moe_intermediate_size=8))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.bias[5] = -100.0  # expert 5 is never chosen
    x = torch.randn(40, 32)
    w, idx, _ = moe.gate(x)
    assert not (idx == 5).any()
    probe = torch.randn(40, 32)  # a loss that weighs every output differently

    def run(path):
        xg, wg = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
        ex = moe.experts
        ex.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = getattr(ex, path)(xg, wg, idx)
        (y * probe).sum().backward()
        return y, xg.grad, wg.grad, ex.w13.grad.clone(), ex.w2.grad.clone()

    grouped, eager = run("grouped"), run("sorted")
    for grads in (grouped, eager):
        assert grads[3][5].abs().max() == 0 and grads[3].abs().max() > 0
        assert grads[4][5].abs().max() == 0
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: 8 bits of mantissa
    for got, want in zip(grouped, eager, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=tol)


def test_sorted_experts_pad_their_blocks_in_bf16():
    """Under bf16 autocast each expert's block is padded to a multiple of PAD rows (rows that
    read token 0 with weight 0): outputs and gradients stay fp32's within bf16's precision,
    and the padding adds nothing to any gradient."""
    torch.manual_seed(5)
    moe = MoE(gate_config(moe_intermediate_size=8))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.bias[5] = -100.0
    x = torch.randn(40, 32)
    w, idx, _ = moe.gate(x)
    probe = torch.randn(40, 32)

    def run(bf16: bool):
        xg, wg = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
        ex = moe.experts
        ex.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = ex.sorted(xg, wg, idx)
        (y.float() * probe).sum().backward()
        return y.float(), xg.grad, wg.grad, ex.w13.grad.clone(), ex.w2.grad.clone()

    bf16, fp32 = run(True), run(False)
    assert bf16[3][5].abs().max() == 0 and bf16[4][5].abs().max() == 0
    for got, want in zip(bf16, fp32, strict=True):
        assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_rope_matches_complex_rotation_of_interleaved_pairs():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 3, 8)
    pos = torch.arange(5).expand(2, 5)
    inv = inv_frequencies(8, 10000.0)
    ang = pos[..., None].float() * inv
    out = apply_rope(x, ang.cos(), ang.sin())
    z = (
        torch.view_as_complex(x.view(2, 5, 3, 4, 2))
        * torch.polar(torch.ones_like(ang), ang)[:, :, None]
    )
    z = torch.view_as_real(z)  # [..., 4, 2] interleaved
    assert torch.allclose(out, torch.cat([z[..., 0], z[..., 1]], dim=-1), atol=1e-6)
    # dot products between positions depend only on the offset
    q, k = torch.randn(8), torch.randn(8)

    def rot(v, p):
        a = torch.tensor([p]).float()[:, None] * inv
        return apply_rope(v[None], a.cos(), a.sin())[0]

    assert math.isclose(rot(q, 7) @ rot(k, 3), rot(q, 14) @ rot(k, 10), rel_tol=1e-4)


def test_yarn_matches_transformers_and_the_papers_constants():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    }
    hf = transformers.DeepseekV3Config(
        qk_rope_head_dim=64,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            **{k: v for k, v in scaling.items() if k != "type"},
        },
    )
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    got = inv_frequencies(64, 10000.0, scaling)
    assert torch.allclose(got, want, rtol=1e-6)
    assert math.isclose(attention_factor(scaling), want_factor, rel_tol=1e-9)
    m = 0.1 * 0.707 * math.log(40) + 1
    assert math.isclose(softmax_scale(192, scaling), 192**-0.5 * m * m)
    assert softmax_scale(192, None) == 192**-0.5
    # YaRN keeps the fastest rotations and slows the slowest by the full factor
    plain = inv_frequencies(64, 10000.0)
    assert torch.allclose(got[:4], plain[:4]) and torch.allclose(got[-4:], plain[-4:] / 40)


def test_mtp_loss_shape_and_value():
    torch.manual_seed(4)
    cfg = get_preset("tiny").replace(num_nextn_predict_layers=2)
    model = Transformer(cfg)
    x = torch.randint(0, 256, (2, 12))
    y = torch.roll(x, -1, dims=1)
    out = model(x, targets=y, mtp_weight=0.3)
    assert out.logits.shape == (2, 12, 256)
    assert len(out.mtp_losses) == 2
    main = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    assert torch.allclose(out.main_loss, main)
    # module 1 reads final hidden h[:, :T-1] and token x[:, 1:], and predicts y[:, 1:]
    cos, sin = model.rope(torch.arange(11).expand(2, 11))
    h1 = model.mtp[0](out.hidden[:, :11], model.embed(x[:, 1:]), cos, sin)
    l1 = F.cross_entropy(model.head(model.mtp[0].norm(h1)).flatten(0, 1), y[:, 1:].flatten())
    assert torch.allclose(out.mtp_losses[0], l1)
    assert torch.allclose(out.loss, main + 0.3 / 2 * (out.mtp_losses[0] + out.mtp_losses[1]))
    # a fresh model predicts near-uniformly: every loss is close to log(vocab)
    for loss in [out.main_loss, *out.mtp_losses]:
        assert abs(loss.item() - math.log(256)) < 0.1


def test_mtp_weight_zero_gives_the_main_loss():
    model = Transformer(get_preset("tiny"))
    x = torch.randint(0, 256, (1, 8))
    out = model(x, targets=x, mtp_weight=0.0)
    assert torch.equal(out.loss, out.main_loss) and out.mtp_losses == []


@pytest.mark.parametrize("name", ["tiny", "small", "dense-small"])
def test_param_counts_match_the_built_model(name):
    cfg = get_preset(name)
    model = Transformer(cfg)
    counts = param_counts(cfg, include_mtp=True)
    assert counts["total"] == model.num_params()
    assert counts["mtp"] == sum(p.numel() for p in model.mtp.parameters())


def test_presets_have_the_documented_sizes():
    v3 = param_counts(get_preset("deepseek-v3"))
    assert abs(v3["total"] / 671e9 - 1) < 0.01
    # DeepSeek's "37B" is rounded: 36.6B without the input-embedding lookup (our count),
    # 37.5B with it; both are within 1.5% of 37B.
    assert abs(v3["activated"] / 37e9 - 1) < 0.015
    assert abs((v3["activated"] + v3["embedding"] / 2) / 37e9 - 1) < 0.015
    small, dense = param_counts(get_preset("small")), param_counts(get_preset("dense-small"))
    assert 20e6 <= small["total"] <= 60e6
    assert 0.15 <= small["activated"] / small["total"] <= 0.4
    assert abs(dense["activated"] / small["activated"] - 1) < 0.05
    kv = kv_cache_bytes_per_token(get_preset("deepseek-v3"))
    assert kv["latent"] == 61 * (512 + 64) * 2
    assert 60 < kv["full"] / kv["latent"] < 80  # "about 1/70"


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ConfigError, match="n_group"):
        get_preset("tiny").replace(n_group=3)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="qk_rope_head_dim must be even"):
        get_preset("tiny").replace(qk_rope_head_dim=7)


def test_forward_reports_expert_counts_and_balance_loss():
    """The routing side channel is an explicit output: one row of counts per MoE layer (the
    MTP module's row zero when it did not run); the balance loss is weighted into `loss`."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    n_moe = len(model.moe_layers())
    plain = model(x, targets=x, mtp_weight=0.0)
    assert plain.expert_counts.shape == (n_moe, cfg.n_routed_experts)
    ran = n_moe - len(model.mtp)  # the MTP module's MoE layer did not run
    assert plain.expert_counts[:ran].sum(1).tolist() == [24 * cfg.num_experts_per_tok] * ran
    assert plain.expert_counts[ran:].sum() == 0 and plain.balance_loss is None
    with_mtp = model(x, targets=x, mtp_weight=0.3, balance_weight=0.1)
    assert with_mtp.expert_counts[ran:].sum() == 22 * cfg.num_experts_per_tok  # T - 1 tokens
    assert torch.equal(with_mtp.expert_counts[:ran], plain.expert_counts[:ran])
    want = with_mtp.main_loss + 0.3 * with_mtp.mtp_losses[0] + 0.1 * with_mtp.balance_loss
    assert torch.allclose(with_mtp.loss, want) and with_mtp.balance_loss > 0
    with_mtp.balance_loss.backward()  # through all the scores: not the gate's sparse backward
    for moe in model.moe_layers():
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().max() > 0


def test_expert_counts_leave_out_the_tokens_not_counted():
    """SFT pads chats to a common length: padding is routed (and computed) but must not count
    as expert load, or it would move the balancing biases."""
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    k, n_main = cfg.num_experts_per_tok, len(model.moe_layers()) - cfg.num_nextn_predict_layers
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    counted = torch.ones(2, 12, dtype=torch.bool)
    counted[1, 7:] = False  # row 1: 7 real tokens, then padding
    full = model(x, targets=x).expert_counts.sum(1)
    part = model(x, targets=x, counted=counted).expert_counts.sum(1)
    assert full[:n_main].tolist() == [24 * k] * n_main
    assert part[:n_main].tolist() == [19 * k] * n_main
    # MTP depth 1 sees positions 0..10, counted when token i+1 is: 11 + 6
    assert part[n_main:].tolist() == [17 * k] * cfg.num_nextn_predict_layers


def _attention_and_grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


def test_bmm_attention_matches_sdpa_within_bf16_rounding():
    from nanoseek.model.attention import causal_attention_bmm

    torch.manual_seed(0)
    B, T, H, D = 2, 96, 3, 16
    q, k, v, g = (torch.randn(B, T, H, D).bfloat16() for _ in range(4))
    scale = D**-0.5

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=scale
        ).transpose(1, 2)

    exact = _attention_and_grads(sdpa, *(t.float() for t in (q, k, v, g)))
    flash = _attention_and_grads(sdpa, q, k, v, g)
    bmm = _attention_and_grads(lambda q, k, v: causal_attention_bmm(q, k, v, scale), q, k, v, g)
    for ref, f, b in zip(exact, flash, bmm, strict=True):
        assert b.dtype == torch.float32 and b.shape == ref.shape
        # bf16 scores: within a few times the flash kernel's own bf16 error
        assert (b - ref).abs().max() <= 4 * (f - ref).abs().max() + 1e-3
        assert (b - ref).abs().max() < 0.05 * ref.abs().max()
    # causal: a change to the last key leaves every earlier query's output alone
    k2 = k.clone()
    k2[:, -1] += 1
    out2 = causal_attention_bmm(q, k2, v, scale).float()
    assert torch.equal(out2[:, :-1], bmm[0][:, :-1]) and not torch.equal(out2, bmm[0])


def test_training_under_bf16_autocast_takes_the_bmm_attention(monkeypatch):
    from nanoseek.model import attention

    torch.manual_seed(0)
    cfg = get_preset("tiny")
    model = Transformer(cfg)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    x = torch.randint(0, 256, (2, 24))
    calls = []
    real = attention.causal_attention_bmm
    monkeypatch.setattr(attention, "causal_attention_bmm", lambda *a: calls.append(1) or real(*a))

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, targets=x).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    bmm_loss, bmm_grads = loss_and_grads()
    assert len(calls) == layers
    monkeypatch.setattr(attention, "BMM_ATTENTION_MAX_LEN", 0)  # back to torch's SDPA
    sdpa_loss, sdpa_grads = loss_and_grads()
    assert len(calls) == layers
    assert abs(bmm_loss - sdpa_loss) < 2e-3
    for a, b in zip(bmm_grads, sdpa_grads, strict=True):
        assert (a - b).abs().max() <= 0.05 * b.abs().max() + 1e-4
    with torch.no_grad():  # fp32 keeps torch's SDPA: the path checked against transformers
        model(x, targets=x)
    assert len(calls) == layers
    monkeypatch.setattr(attention, "BMM_ATTENTION_MAX_LEN", 512)
    monkeypatch.setattr(attention, "BMM_ATTENTION_MAX_SCORES", 2 * 4 * 23 * 23 - 1)  # MTP: 23 rows
    assert abs(loss_and_grads()[0] - sdpa_loss) < 1e-6 and len(calls) == layers


@pytest.mark.parametrize("kernel", [True, False])
def test_linear_cross_entropy_equals_cross_entropy_with_gradients(kernel, monkeypatch):
    """The chunked loss, its softmax in C++ (loss.cpp, on a CPU with AVX2) or in torch ops,
    equals F.cross_entropy with its gradients."""
    from nanoseek.kernels import cpu_supported
    from nanoseek.model import loss as L
    from nanoseek.model.loss import CHUNK, linear_cross_entropy

    if not kernel:
        monkeypatch.setattr(L, "_use_kernel", lambda h: False)
    assert L._use_kernel(torch.zeros(1)) == (kernel and cpu_supported())
    torch.manual_seed(0)
    N, d, V = 2 * CHUNK + 37, 16, 300  # a last chunk shorter than the rest (also in bf16)
    h0, w0 = torch.randn(N, d), torch.randn(V, d) * 0.3
    targets = torch.randint(0, V, (N,))
    targets[::7] = -100  # ignored rows count in neither the loss nor the gradients
    results = []
    for fn in (linear_cross_entropy, lambda h, w, t: F.cross_entropy(h @ w.t(), t)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fn(h, w, targets)
        (loss * 3).backward()  # a gradient other than 1 reaches the backward
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert results[0][1][::7].abs().max() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = linear_cross_entropy(h0, w0, targets)
    assert bf16.dtype == torch.float32 and abs(bf16 - results[1][0]) < 0.02
    with torch.no_grad():
        assert linear_cross_entropy(h0, w0, torch.full((N,), -100)).isnan()


def test_grouped_gemm_needs_an_ampere_or_newer_gpu(monkeypatch):
    """CUDA bf16 training takes the grouped GEMMs only where the GPU has them (sm80+): an
    older GPU given --dtype bf16 keeps the per-expert loop instead of failing in the kernel."""
    from nanoseek.model import moe as M

    for capability, expected in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        M._has_grouped_gemm.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert M._has_grouped_gemm(torch.device("cuda", 0)) is expected
    M._has_grouped_gemm.cache_clear()
