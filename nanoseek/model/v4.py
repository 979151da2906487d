"""The DeepSeek-V4 model: V4Blocks over hc_mult residual streams, built from a V4Config.

    ids -> embed_tokens -> copied into hc_mult streams [B, S, N, D] -> V4Block x L
        -> hc_head (collapse the streams) -> norm -> lm_head

Each layer's attention is window-only, CSA or HCA (`V4Config.compress_ratios`); the first
`num_hash_layers` MoE layers route by a token-id table. Parameter and buffer names are
transformers' DeepseekV4ForCausalLM's (`model.embed_tokens`, `model.layers.N...`,
`model.hc_head`, `model.norm`, `lm_head`), so its state dict loads one for one.

`forward` runs the whole sequence, stateless, and `generate_v4` decodes greedily by
recomputing it per new token: the reference for the engine, which decodes from a V4 cache
(`V4Model.forward` with one `V4LayerKV` per layer; nanoseek/infer/cache_v4.py). No MTP
module is built (checkpoints' MTP layers are ignored, as transformers does).

Training (`nanoseek train --preset tiny-v4`): `forward` reports the learned-routing layers'
expert counts for auxiliary-loss-free balancing, and `indexer_kl_v4` is the CSA indexers'
own loss (the LM loss never reaches them).
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import V4Config
from nanoseek.model.attention_v4 import V4Attention, V4LayerKV
from nanoseek.model.block_v4 import V4Block
from nanoseek.model.hyper import HyperHead
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.moe_v4 import HashRouter, TopKRouter, V4MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.transformer import ModelOutput


def build_block(cfg: V4Config, i: int) -> V4Block:
    """Layer i: its attention type from compress_ratios, hash or learned routing."""
    layer_type = cfg.layer_types[i]
    attn = V4Attention(
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.head_dim,
        cfg.qk_rope_head_dim,
        cfg.q_lora_rank,
        cfg.o_groups,
        cfg.o_lora_rank,
        cfg.sliding_window,
        layer_type,
        cfg.compress_ratios[i] or None,
        cfg.rope_theta,
        cfg.compress_rope_theta,
        cfg.rope_scaling,
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.index_topk,
        cfg.rms_norm_eps,
    )
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
    return V4Block(attn, moe, cfg.hidden_size, *hc)


class V4Model(nn.Module):
    """The body (transformers' DeepseekV4Model): ids [B, S] -> final-norm hidden [B, S, D]."""

    def __init__(self, cfg: V4Config):
        super().__init__()
        self.hc_mult = cfg.hc_mult
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(build_block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        counts: list[torch.Tensor] | None = None,
        cache: list[V4LayerKV] | None = None,
    ) -> torch.Tensor:
        """`counts`: gets each learned-routing MoE layer's tokens per expert (V4MoE).
        `cache`: one V4LayerKV per layer when the ids are one step of cached decoding (a
        prefill from position 0 or one token per sequence; nanoseek/infer/runner_v4.py)."""
        h = self.streams(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, position_ids, input_ids, counts, None if cache is None else cache[i])
        return self.norm(self.hc_head(h))

    def streams(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual streams entering layer 0 [B, S, hc_mult, D]: each one the embedding."""
        return self.embed_tokens(input_ids).unsqueeze(2).expand(-1, -1, self.hc_mult, -1)


class V4Transformer(nn.Module):
    """DeepSeek-V4 for causal LM (transformers' DeepseekV4ForCausalLM; the cache is the
    engine's, nanoseek/infer/cache_v4.py).

    `forward(input_ids, targets)` returns the same `ModelOutput` as `Transformer.forward`
    (lazy logits, the fused head + cross-entropy loss, `expert_counts` of the learned-routing
    MoE layers), so training code can treat both alike; the MTP / balance losses are left
    empty."""

    def __init__(self, cfg: V4Config):
        super().__init__()
        cfg.validate_buildable()
        self.config = cfg
        self.model = V4Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Matrices N(0, initializer_range); norms and hyper-connection scales 1; biases,
        attention sinks and compressor position biases 0 (transformers' _init_weights);
        the hash layers' token -> experts table a fixed random choice of distinct experts
        (transformers leaves it zero, which would send every token to expert 0)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("base", "hc_base", "sinks", "position_bias"):
                nn.init.zeros_(p)
            elif leaf in ("scale", "hc_scale") or p.dim() == 1:  # norms' weights too
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        gen = torch.Generator().manual_seed(0)  # the same table for every model of a config
        for m in self.modules():
            if isinstance(m, TopKRouter):
                m.e_score_correction_bias.zero_()
            elif isinstance(m, HashRouter):
                vocab, k = m.tid2eid.shape
                scores = torch.rand(vocab, m.weight.shape[0], generator=gen, device="cpu")
                table = scores.argsort(-1)[:, :k]
                m.tid2eid.copy_(table)

    def moe_layers(self) -> list[V4MoE]:
        """The MoE layers with learned routing, in `expert_counts` row order: those whose
        `gate.e_score_correction_bias` auxiliary-loss-free balancing moves (the first
        num_hash_layers route by a fixed token table: nothing to balance)."""
        return [m for m in self.modules() if isinstance(m, V4MoE) and not m.is_hash]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mtp_weight: float = 0.0,
        balance_weight: float = 0.0,
    ) -> ModelOutput:
        """input_ids [B, S] -> logits [B, S, vocab]; with `targets` [B, S] (the next token
        at each position, -100 = ignore), also the mean cross-entropy `loss`.
        `mtp_weight` and `balance_weight` are Transformer.forward's, accepted so that
        training code can call both alike; both are no-ops here (no MTP module, no
        sequence-wise balance loss for V4 yet)."""
        B, S = input_ids.shape
        if positions is None:
            positions = torch.arange(S, device=input_ids.device).expand(B, S)
        counts: list[torch.Tensor] = []
        h = self.model(input_ids, positions, counts)
        out = ModelOutput(hidden=h, head=self.lm_head)
        out.expert_counts = torch.stack(counts) if counts else None
        if targets is None:
            out._logits = self.lm_head(h)
        else:
            out.main_loss = linear_cross_entropy(
                h.flatten(0, 1), self.lm_head.weight, targets.flatten()
            )
            out.loss = out.main_loss
        return out


def indexer_kl_v4(model: V4Transformer, input_ids: torch.Tensor) -> torch.Tensor:
    """The CSA indexers' loss, averaged over the CSA layers (`V4Attention.indexer_kl`): the
    model runs once more without gradient, and each CSA layer's indexer is scored against
    its attention on the layer's (detached) input, so the gradient reaches the indexers
    only. Add it to the LM loss, as V3.2's sparse stage does (indexer.indexer_kl).
    0 (no gradient) when no query sees a compressed entry yet (a short sequence)."""
    B, S = input_ids.shape
    positions = torch.arange(S, device=input_ids.device).expand(B, S)
    with torch.no_grad():
        h = model.model.streams(input_ids)
    losses = []
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            with torch.no_grad():
                x = layer.input_layernorm(layer.attn_hc(h)[2])
            kl = layer.self_attn.indexer_kl(x, positions)
            if kl is not None:
                losses.append(kl)
        with torch.no_grad():
            h = layer(h, positions, input_ids)
    return torch.stack(losses).mean() if losses else h.new_zeros((), dtype=torch.float32)


@torch.no_grad()
def generate_v4(
    model: V4Transformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy decoding, [B, S] -> [B, S + n]: each new token recomputes the whole forward
    (O(n) forwards over a growing sequence): the reference the cached engine is tested
    against (`Engine` decodes V4 from its cache). Stops early when every row has
    produced `eos_token_id`; rows that finished keep emitting it."""
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        nxt = model.lm_head(model.model(ids, pos)[:, -1]).argmax(dim=-1)  # the last row only
        if eos_token_id is not None:
            nxt = torch.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if eos_token_id is not None and done.all():
            break
    return ids
