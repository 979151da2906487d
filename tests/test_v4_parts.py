"""DeepSeek-V4's building blocks against transformers' DeepseekV4 pieces, one at a time,
on random weights and inputs in float32: hyper-connections (mHC, Sinkhorn), the MoE
routing (sqrtsoftplus, hash routing, the SwiGLU clamp), attention pieces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nanoseek.model.attention_v4 import (
    Compressor,
    GroupedLinear,
    V4Attention,
    V4Indexer,
    causal_bias,
    rope_tail,
    selected_bias,
    sink_attention,
)
from nanoseek.model.block_v4 import V4Block
from nanoseek.model.hyper import HyperConnection, HyperHead, sinkhorn
from nanoseek.model.moe_v4 import (
    HashRouter,
    TopKRouter,
    V4Experts,
    V4MoE,
    clamped_swiglu,
    sqrtsoftplus,
)
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import cos_sin, inv_frequencies

transformers = pytest.importorskip("transformers")
hf_v4 = pytest.importorskip("transformers.models.deepseek_v4.modeling_deepseek_v4")
from transformers.masking_utils import create_sliding_window_causal_mask  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def hf_config(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=32,
        moe_intermediate_size=24,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=16,
        q_lora_rank=24,
        partial_rotary_factor=0.5,
        n_routed_experts=8,
        num_experts_per_tok=3,
        hc_mult=4,
        o_groups=2,
        o_lora_rank=12,
        sliding_window=8,
        index_n_heads=4,
        index_head_dim=16,
        index_topk=4,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    )
    return transformers.DeepseekV4Config(**{**base, **kw})


def randomize(module: nn.Module, std: float = 0.5) -> None:
    """Every float parameter and saved buffer random (none left at its zero / one init);
    derived buffers (RoPE frequencies) stay."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.normal_(0.0, std)


# --- 1. hyper-connections ---------------------------------------------------------------


@pytest.mark.parametrize("hc_mult", [4, 3])
def test_hyper_connection_matches_transformers(hc_mult):
    torch.manual_seed(0)
    cfg = hf_config(hc_mult=hc_mult)
    ref = hf_v4.DeepseekV4HyperConnection(cfg)
    randomize(ref, 0.3)
    ours = HyperConnection(cfg.hidden_size, hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    h = torch.randn(2, 7, hc_mult, cfg.hidden_size)
    for a, b in zip(ours(h), ref(h), strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_hyper_head_matches_transformers():
    torch.manual_seed(1)
    cfg = hf_config()
    ref = hf_v4.DeepseekV4HyperHead(cfg)
    randomize(ref, 0.3)
    ours = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps)
    ours.load_state_dict(ref.state_dict())
    h = torch.randn(3, 5, cfg.hc_mult, cfg.hidden_size)
    torch.testing.assert_close(ours(h), ref(h), **TOL)


@pytest.mark.parametrize(
    "n,spread,iters", [(4, 0.5, 20), (3, 0.5, 20), (8, 0.5, 20), (4, 1.0, 50), (4, 2.0, 1000)]
)
def test_sinkhorn_is_doubly_stochastic(n, spread, iters):
    """Rows and columns sum to 1 within 1e-5. Columns are normalised last, so they always
    do; rows converge geometrically: at V4's 20 iterations within 1e-5 for logits of std
    <= 0.5 (at std 1, 4096 random 4x4 matrices are off by up to 6e-4; at std 3 by 5e-2 --
    the reference's behaviour too), and for sharper logits after more iterations."""
    torch.manual_seed(2)
    logits = torch.randn(4096, n, n) * spread
    m = sinkhorn(logits, iters=iters, eps=1e-6)
    assert (m > 0).all()
    ones = torch.ones(4096, n)
    torch.testing.assert_close(m.sum(-1), ones, rtol=0, atol=1e-5)  # rows
    torch.testing.assert_close(m.sum(-2), ones, rtol=0, atol=1e-5)  # columns
    # the columns at V4's 20 iterations, however sharp the logits
    torch.testing.assert_close(sinkhorn(logits, 20).sum(-2), ones, rtol=0, atol=1e-5)


def test_hyper_connection_comb_is_doubly_stochastic():
    torch.manual_seed(3)
    hc = HyperConnection(32, 4)
    h = torch.randn(2, 9, 4, 32)
    _, comb, _ = hc(h)
    ones = torch.ones(2, 9, 4)
    torch.testing.assert_close(comb.sum(-1), ones, rtol=0, atol=1e-5)
    torch.testing.assert_close(comb.sum(-2), ones, rtol=0, atol=1e-5)


class _Attn(nn.Module):  # stands in for attention: any fixed function of the block input
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x, **kwargs):
        return torch.tanh(x @ self.w), None


class _MLP(nn.Module):
    def forward(self, x, input_ids=None):
        return x * torch.sigmoid(x)


def test_hyper_update_matches_decoder_layer_streams():
    """Both sub-blocks' stream updates, as transformers' DeepseekV4DecoderLayer does them
    (attention and MoE replaced by fixed functions): checks the direction comb is applied."""
    torch.manual_seed(4)
    cfg = hf_config(layer_types=["sliding_attention"] * 4)
    layer = hf_v4.DeepseekV4DecoderLayer(cfg, 0)
    attn, mlp = _Attn(cfg.hidden_size), _MLP()
    layer.self_attn, layer.mlp = attn, mlp
    for m in (layer.attn_hc, layer.ffn_hc, layer.input_layernorm, layer.post_attention_layernorm):
        randomize(m, 0.3)
    attn_hc, ffn_hc = HyperConnection(cfg.hidden_size), HyperConnection(cfg.hidden_size)
    attn_hc.load_state_dict(layer.attn_hc.state_dict())
    ffn_hc.load_state_dict(layer.ffn_hc.state_dict())
    n1, n2 = RMSNorm(cfg.hidden_size), RMSNorm(cfg.hidden_size)
    n1.load_state_dict(layer.input_layernorm.state_dict())
    n2.load_state_dict(layer.post_attention_layernorm.state_dict())

    h = torch.randn(2, 6, cfg.hc_mult, cfg.hidden_size)
    post, comb, x = attn_hc(h)
    h1 = HyperConnection.update(h, attn(n1(x))[0], post, comb)
    post, comb, x = ffn_hc(h1)
    ours = HyperConnection.update(h1, mlp(n2(x)), post, comb)
    torch.testing.assert_close(ours, layer(h), **TOL)


# --- 2. MoE routing: sqrtsoftplus, hash routing, the SwiGLU clamp ------------------------


def hash_table(vocab: int, n_experts: int, k: int) -> torch.Tensor:
    """A random token -> k distinct experts table (the checkpoint's tid2eid)."""
    return torch.stack([torch.randperm(n_experts)[:k] for _ in range(vocab)])


def by_expert(weights: torch.Tensor, indices: torch.Tensor):
    """(weights, indices) with each row ordered by expert id (top-k order is arbitrary)."""
    indices, order = indices.sort(dim=-1)
    return weights.gather(1, order), indices


def test_sqrtsoftplus_and_clamp_match_transformers():
    torch.manual_seed(5)
    x = torch.randn(1000) * 30  # well past the clamp on both sides
    ref_act = transformers.activations.ACT2FN["sqrtsoftplus"]
    torch.testing.assert_close(sqrtsoftplus(x), ref_act(x), **TOL)
    cfg = hf_config(swiglu_limit=7.0)
    experts = hf_v4.DeepseekV4Experts(cfg)
    gate_up = torch.randn(50, 2 * cfg.moe_intermediate_size) * 20
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(clamped_swiglu(gate, up, 7.0), experts._apply_gate(gate_up), **TOL)
    assert (gate_up.abs() > 7.0).float().mean() > 0.5  # the clamp is exercised


@pytest.mark.parametrize("hashed", [False, True])
def test_routers_match_transformers(hashed):
    torch.manual_seed(6)
    cfg = hf_config()
    D, E, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(2, 9, D)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    if hashed:
        ref = hf_v4.DeepseekV4HashRouter(cfg)
        randomize(ref)
        ref.tid2eid.copy_(hash_table(cfg.vocab_size, E, k))
        ours = HashRouter(D, E, k, cfg.vocab_size, cfg.routed_scaling_factor)
        ours.load_state_dict(ref.state_dict())
        got, want = ours(x, ids), ref(x, ids)
        torch.testing.assert_close(got[2], ref.tid2eid[ids.reshape(-1)])
    else:
        ref = hf_v4.DeepseekV4TopKRouter(cfg)
        randomize(ref)  # the correction bias too: it moves the selection
        ours = TopKRouter(D, E, k, cfg.routed_scaling_factor)
        ours.load_state_dict(ref.state_dict())
        got, want = ours(x), ref(x)
    torch.testing.assert_close(got[0], want[0], **TOL)  # logits
    w_got, i_got = by_expert(got[1], got[2])
    w_want, i_want = by_expert(want[1], want[2])
    torch.testing.assert_close(i_got, i_want)
    torch.testing.assert_close(w_got, w_want, **TOL)
    torch.testing.assert_close(w_got.sum(-1), torch.full((18,), cfg.routed_scaling_factor))


def test_experts_match_transformers():
    torch.manual_seed(7)
    cfg = hf_config(swiglu_limit=1.0)
    ref = hf_v4.DeepseekV4Experts(cfg)
    randomize(ref)
    ours = V4Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, 1.0)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, cfg.hidden_size)
    idx = hash_table(20, cfg.n_routed_experts, cfg.num_experts_per_tok)
    idx[3] = torch.tensor([5, 5, 2])  # a repeated expert counts twice in both
    w = torch.rand(20, cfg.num_experts_per_tok)
    torch.testing.assert_close(ours(x, idx, w), ref(x, idx, w), **TOL)


@pytest.mark.parametrize("layer", [0, 3])  # hash_moe, moe
def test_moe_block_matches_transformers(layer):
    torch.manual_seed(8 + layer)
    cfg = hf_config(swiglu_limit=2.0)  # low enough that random weights hit the clamp
    assert cfg.mlp_layer_types[layer] == ("hash_moe" if layer < 3 else "moe")
    ref = hf_v4.DeepseekV4SparseMoeBlock(cfg, layer)
    randomize(ref)
    if ref.is_hash:
        ref.gate.tid2eid.copy_(hash_table(cfg.vocab_size, cfg.n_routed_experts, 3))
    ours = V4MoE(
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
        cfg.routed_scaling_factor,
        cfg.swiglu_limit,
        hash_vocab_size=cfg.vocab_size if ref.is_hash else None,
    )
    ours.load_state_dict(ref.state_dict())  # every name and shape as in a checkpoint
    x = torch.randn(2, 11, cfg.hidden_size)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    torch.testing.assert_close(ours(x, ids), ref(x, ids), **TOL)


# --- 3. attention pieces -----------------------------------------------------------------

YARN = {
    "rope_type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
}


def test_v4_rope_matches_transformers():
    """The "main" (plain) and "compress" (YaRN) frequencies, and the interleaved rotation
    of the tail channels (and its inverse, as applied to the attention output)."""
    torch.manual_seed(10)
    cfg = hf_config(rope_parameters=dict(YARN))
    rd = cfg.qk_rope_head_dim
    ref = hf_v4.DeepseekV4RotaryEmbedding(cfg)
    torch.testing.assert_close(ref.main_inv_freq, inv_frequencies(rd, cfg.rope_theta), **TOL)
    ours_inv = inv_frequencies(rd, cfg.compress_rope_theta, YARN)
    torch.testing.assert_close(ref.compress_inv_freq, ours_inv, **TOL)
    assert ref.compress_attention_scaling == 1.0  # V4 does not scale cos/sin under YaRN
    x = torch.randn(2, 3, 10, cfg.head_dim)  # [B, H, S, D]
    pos = torch.randint(0, 1000, (2, 10))
    cos, sin = ref(x, pos, layer_type="compress")
    ocos, osin = cos_sin(pos, ours_inv)
    torch.testing.assert_close(ocos, cos, **TOL)
    want = hf_v4.apply_rotary_pos_emb(x, cos, sin)
    got = rope_tail(x, cos.unsqueeze(1), sin.unsqueeze(1))
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got[..., : cfg.head_dim - rd], x[..., : cfg.head_dim - rd])
    back = rope_tail(got, cos.unsqueeze(1), -sin.unsqueeze(1))
    torch.testing.assert_close(back, x, **TOL)


def test_grouped_linear_matches_transformers():
    torch.manual_seed(11)
    cfg = hf_config()
    g, per_group = cfg.o_groups, cfg.num_attention_heads * cfg.head_dim // cfg.o_groups
    ref = hf_v4.DeepseekV4GroupedLinear(per_group, g * cfg.o_lora_rank, g)
    ours = GroupedLinear(per_group, g * cfg.o_lora_rank, g)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, g, per_group)
    torch.testing.assert_close(ours(x), ref(x), **TOL)
    # group i uses only rows i * rank ... (i + 1) * rank of the weight, on its own inputs
    w = ref.weight[cfg.o_lora_rank : 2 * cfg.o_lora_rank]
    torch.testing.assert_close(ours(x)[:, :, 1], x[:, :, 1] @ w.t(), **TOL)


def sliding_mask(S: int, window: int) -> torch.Tensor:
    i, j = torch.arange(S).view(-1, 1), torch.arange(S).view(1, -1)
    allowed = (j <= i) & (j > i - window)
    return torch.zeros(S, S).masked_fill(~allowed, float("-inf")).view(1, 1, S, S)


def test_sink_attention_matches_transformers():
    torch.manual_seed(12)
    B, H, S, D = 2, 4, 9, 16
    holder = nn.Module()
    holder.sinks = nn.Parameter(torch.randn(H) * 2)
    holder.num_key_value_groups = H
    q, kv = torch.randn(B, H, S, D), torch.randn(B, 1, S, D)
    mask = sliding_mask(S, 4).expand(B, 1, S, S)
    want, _ = hf_v4.eager_attention_forward(holder, q, kv, kv, mask, scaling=D**-0.5)
    got = sink_attention(q, kv, mask, holder.sinks, D**-0.5)
    torch.testing.assert_close(got, want, **TOL)
    # the sink takes weight: with a huge sink, the output goes to 0
    far = sink_attention(q, kv, mask, torch.full((H,), 1e4), D**-0.5)
    torch.testing.assert_close(far, torch.zeros_like(far))


def compress_config(**kw):
    # 16 index heads: a score is exactly 0 (every head's ReLU at 0) with odds 2^-16, so
    # top-k never has to break ties at 0 (which it may break either way)
    return hf_config(
        rope_parameters=dict(YARN), index_n_heads=16, max_position_embeddings=256, **kw
    )


@pytest.mark.parametrize("S", [29, 7, 8])  # partial last window; no complete window; one
def test_hca_compressor_matches_transformers(S):
    torch.manual_seed(13)
    cfg = compress_config()
    rate = cfg.compress_rates["heavily_compressed_attention"]
    ref = hf_v4.DeepseekV4HCACompressor(cfg)
    randomize(ref)
    ours = Compressor(
        cfg.hidden_size, cfg.head_dim, rate, cfg.qk_rope_head_dim, cfg.compress_rope_theta, YARN
    )
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, S, cfg.hidden_size)
    pos = torch.arange(S).expand(2, S)
    want_kv, want_bias = ref(x, None, pos, None, 0)
    got = ours(x)
    assert got.shape == (2, S // rate, cfg.head_dim)
    torch.testing.assert_close(got, want_kv[:, 0], **TOL)
    if want_bias is not None:
        torch.testing.assert_close(causal_bias(pos, got.shape[1], rate), want_bias)


def test_csa_compressor_and_indexer_match_transformers():
    torch.manual_seed(14)
    cfg = compress_config()
    rate = cfg.compress_rates["compressed_sparse_attention"]
    ref = hf_v4.DeepseekV4CSACompressor(cfg)
    randomize(ref)
    rd, theta = cfg.qk_rope_head_dim, cfg.compress_rope_theta
    ours = Compressor(cfg.hidden_size, cfg.head_dim, rate, rd, theta, YARN, overlap=True)
    index = V4Indexer(
        cfg.hidden_size,
        cfg.q_lora_rank,
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.index_topk,
        rate,
        rd,
        theta,
        YARN,
    )
    sd = ref.state_dict()
    ours.load_state_dict({k: v for k, v in sd.items() if not k.startswith("indexer.")})
    index.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("indexer.")})
    B, S = 2, 30
    x, q_latent = torch.randn(B, S, cfg.hidden_size), torch.randn(B, S, cfg.q_lora_rank)
    pos = torch.arange(S).expand(B, S)
    want_kv, want_bias = ref(x, q_latent, pos, None, 0)
    got = ours(x)
    torch.testing.assert_close(got, want_kv[:, 0], **TOL)
    scores, _ = index.scores(x, q_latent, pos)
    assert (scores != 0).all()  # no ties at 0 that top-k could break either way
    top = index(x, q_latent, pos)
    torch.testing.assert_close(top, ref.indexer(x, q_latent, pos, None, 0))
    assert (top == -1).any() and (top >= 0).any()
    torch.testing.assert_close(selected_bias(top, got.shape[1]), want_bias)


def attention_from(cfg, i: int) -> V4Attention:
    """Layer i's attention with the settings of a transformers DeepseekV4Config."""
    t = cfg.layer_types[i]
    return V4Attention(
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim,
        cfg.qk_rope_head_dim,
        cfg.q_lora_rank,
        cfg.o_groups,
        cfg.o_lora_rank,
        cfg.sliding_window,
        t,
        cfg.compress_rates.get(t),
        cfg.rope_theta,
        cfg.compress_rope_theta,
        YARN,
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.index_topk,
        cfg.rms_norm_eps,
    )


@pytest.mark.parametrize(
    "layer_type",
    ["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention"],
)
def test_attention_matches_transformers(layer_type):
    """The whole layer, no cache: the pieces above put together as transformers does."""
    torch.manual_seed(15)
    cfg = compress_config(layer_types=[layer_type] * 4)
    cfg._attn_implementation = "eager"
    ref = hf_v4.DeepseekV4Attention(cfg, 0)
    randomize(ref)
    ours = attention_from(cfg, 0)
    ours.load_state_dict(ref.state_dict())  # every name and shape, the indexer's too
    B, S = 2, 30
    x = torch.randn(B, S, cfg.hidden_size)
    pos = torch.arange(S).expand(B, S)
    rope = hf_v4.DeepseekV4RotaryEmbedding(cfg)
    pe = {t: rope(x, pos, layer_type=t) for t in ("main", "compress")}
    mask = create_sliding_window_causal_mask(
        config=cfg, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos
    )
    want, _ = ref(x, pe, pos, mask)
    torch.testing.assert_close(ours(x, pos), want, **TOL)


# --- the pieces assembled: a block, and a whole (stateless) model ---------------------


def block_from(cfg, i: int) -> V4Block:
    """Layer i as a V4Block, with the settings of a transformers DeepseekV4Config."""
    moe = V4MoE(
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.n_routed_experts,
        cfg.num_experts_per_tok,
        cfg.routed_scaling_factor,
        cfg.swiglu_limit,
        hash_vocab_size=cfg.vocab_size if cfg.mlp_layer_types[i] == "hash_moe" else None,
    )
    hc = (cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
    return V4Block(attention_from(cfg, i), moe, cfg.hidden_size, *hc)


LAYER_TYPES = [
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "compressed_sparse_attention",
]


def model_config():
    cfg = compress_config(layer_types=LAYER_TYPES, swiglu_limit=3.0)
    cfg._attn_implementation = "eager"
    assert cfg.mlp_layer_types == ["hash_moe"] * 3 + ["moe"]
    return cfg


def randomize_v4(module: nn.Module, cfg) -> None:
    randomize(module, 0.15)
    for name, buf in module.named_buffers():
        if name.endswith("tid2eid"):
            buf.copy_(hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok))


@pytest.mark.parametrize("i", [0, 1, 2, 3])  # sliding+hash, CSA+hash, HCA+hash, CSA+moe
def test_block_matches_transformers(i):
    torch.manual_seed(16 + i)
    cfg = model_config()
    ref = hf_v4.DeepseekV4DecoderLayer(cfg, i)
    randomize_v4(ref, cfg)
    ours = block_from(cfg, i)
    ours.load_state_dict(ref.state_dict())
    B, S = 2, 30
    h = torch.randn(B, S, cfg.hc_mult, cfg.hidden_size)
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    pos = torch.arange(S).expand(B, S)
    rope = hf_v4.DeepseekV4RotaryEmbedding(cfg)
    pe = {t: rope(h, pos, layer_type=t) for t in ("main", "compress")}
    mask = create_sliding_window_causal_mask(
        config=cfg, inputs_embeds=h[:, :, 0], attention_mask=None, cache=None, position_ids=pos
    )
    want = ref(h, input_ids=ids, position_embeddings=pe, position_ids=pos, attention_mask=mask)
    torch.testing.assert_close(ours(h, pos, ids), want, **TOL)


class V4Sketch(nn.Module):
    """How the blocks make a model (and how the later V4 Transformer must name things):
    embed, copy into hc_mult streams, blocks, HyperHead, norm, head."""

    def __init__(self, cfg):
        super().__init__()
        self.hc_mult = cfg.hc_mult
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(block_from(cfg, i) for i in range(len(LAYER_TYPES)))
        self.model.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps)
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        x = m.embed_tokens(ids)
        h = x.unsqueeze(2).expand(-1, -1, self.hc_mult, -1)
        for layer in m.layers:
            h = layer(h, pos, ids)
        return self.lm_head(m.norm(m.hc_head(h)))


def test_assembled_model_logits_match_transformers():
    torch.manual_seed(20)
    cfg = model_config()
    ref = transformers.DeepseekV4ForCausalLM(cfg).eval()
    randomize_v4(ref, cfg)
    ours = V4Sketch(cfg)
    ours.load_state_dict(ref.state_dict())  # the checkpoint's names, one for one
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, **TOL)
