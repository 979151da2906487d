"""The DeepSeek-V3 transformer: blocks, the model, the MTP modules, the loss.

Every module has two forms: `forward` (training, and the plain reference path over a
cache) and `decode` over weights that `fold` rearranged once (cached inference: absorbed
MLA, norms folded into matmuls; see attention.py and moe.py). The engine builds the
per-step `DecodeStep` and owns the cache; the math of both forms lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA, CacheRows, DecodeStep, FoldedMLA, LayerKV
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.moe import MLP, FoldedFFN, MoE, RoutingStats
from nanoseek.model.norm import RMSNorm, rms_unweighted
from nanoseek.model.quant import mm
from nanoseek.model.rope import attention_factor, cos_sin, inv_frequencies, rope_table


@dataclass
class FoldedBlock:
    attn: FoldedMLA
    ffn: FoldedFFN
    eps: torch.Tensor  # attn_norm / ffn_norm eps (they are equal), 0-dim fp32


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = (
            MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x, cos, sin, kv=None, positions=None, stats: RoutingStats | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv, positions)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, stats) if isinstance(self.ffn, MoE) else self.ffn(h))

    def fold(self, dispatch: str = "auto") -> FoldedBlock:
        ffn = self.ffn.fold(self.ffn_norm, dispatch) if isinstance(self.ffn, MoE) else None
        return FoldedBlock(
            self.attn.fold(self.attn_norm),
            ffn or self.ffn.fold(self.ffn_norm),
            self.attn_norm.eps_tensor(self.attn_norm.weight.device),
        )

    def decode(
        self, f: FoldedBlock, x, st: DecodeStep, cache, layer, counts=None, index=None
    ) -> torch.Tensor:
        """x [B*T, d] -> [B*T, d] over layer `layer` of the latent cache (see MLA.decode)."""
        x = x + self.attn.decode(f.attn, rms_unweighted(x, f.eps), st, cache, layer, index)
        return x + self.ffn.decode(f.ffn, rms_unweighted(x, f.eps), counts)


@dataclass
class FoldedMTP:
    eh: torch.Tensor  # [2d, d]: eh_proj with enorm | hnorm folded into its two column halves
    block: FoldedBlock
    eps: torch.Tensor  # enorm / hnorm eps
    norm_eps: torch.Tensor


class MTPModule(nn.Module):
    """Depth-k multi-token prediction: combine RMSNorm(h_{k-1}) with RMSNorm(Emb(t_{i+k})),
    run one block, and predict t_{i+k+1} with the shared head (after its own norm)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h_prev, emb_next, cos, sin, kv=None, positions=None, stats=None):
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, kv, positions, stats)

    @torch.no_grad()
    def fold(self, dispatch: str = "auto") -> FoldedMTP:
        dev = self.eh_proj.weight.device
        eh = (self.eh_proj.weight * torch.cat([self.enorm.weight, self.hnorm.weight])).t()
        return FoldedMTP(
            eh, self.block.fold(dispatch), self.enorm.eps_tensor(dev), self.norm.eps_tensor(dev)
        )

    def decode(
        self, f: FoldedMTP, h, emb_next, st: DecodeStep, cache, layer, index=None
    ) -> torch.Tensor:
        """h, emb_next [N, d] -> the module's normed output [N, d]."""
        # enorm and hnorm share an eps: normalise [emb, h] as one [N, 2, d] tensor
        both = rms_unweighted(torch.stack([emb_next, h], 1), f.eps)
        x = self.block.decode(f.block, mm(both.flatten(1), f.eh), st, cache, layer, index=index)
        return rms_unweighted(x, f.norm_eps) * self.norm.weight


@dataclass
class FoldedModel:
    """Everything `Transformer.decode` reads, derived once from the weights (refold after
    the weights change, e.g. after an RL update)."""

    layers: list[FoldedBlock]
    mtp: list[FoldedMTP]
    head: torch.Tensor  # [d, vocab]
    norm_eps: torch.Tensor
    rope: torch.Tensor  # [P, 2, 1, R] (see rope.rope_table)
    dispatch: str


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # final-norm hidden states, what MTP module 1 reads
    head: nn.Module  # the output head: `logits` is computed from `hidden` on first use
    loss: torch.Tensor | None = None  # main + mtp_weight/D * sum(mtp) (+ balance loss)
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    balance_loss: torch.Tensor | None = None  # sequence-wise loss, summed over MoE layers
    # [len(moe_layers()), n_routed_experts]: tokens routed to each expert by this forward;
    # zero rows for MTP modules that did not run; None without MoE layers
    expert_counts: torch.Tensor | None = None
    _logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        """[B, T, vocab]. Lazy: the loss never needs them (see loss.py), training never reads them."""
        if self._logits is None:
            self._logits = self.head(self.hidden)
        return self._logits


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(
            MTPModule(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers)
        )
        # a plain fp32 tensor, not a buffer: model.to(bfloat16) must not round the frequencies
        self.inv_freq = inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.rope_factor = attention_factor(cfg.rope_scaling)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("weight"):
                nn.init.ones_(p)  # norms
            elif name.endswith("bias"):
                nn.init.zeros_(p)  # the V3.2 indexer's LayerNorm
        for moe in self.moe_layers():
            moe.gate.bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_sin(positions, self.inv_freq, self.rope_factor)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        mtp_weight: float = 0.3,
        balance_weight: float = 0.0,
        kv: list[LayerKV] | None = None,
        positions: torch.Tensor | None = None,
        counted: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, vocab]. With `targets` [B, T] (ignore -100),
        also the loss: main + mtp_weight / D * sum of the MTP losses (when the model has MTP
        modules) + balance_weight * the sequence-wise balance loss (summed over MoE layers, each
        layer's loss weighted by alpha as in DeepSeek-V3). `counted` [B, T] bool: the tokens
        whose routing counts in `expert_counts` (default: all; padding should not)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions)
        stats = RoutingStats(balance=balance_weight > 0 and targets is not None)
        stats.counted = None if counted is None else counted.flatten()
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if kv is None else kv[i], positions if kv else None, stats)
        h = self.norm(h)
        out = ModelOutput(hidden=h, head=self.head)
        if targets is None:  # logits now, under the caller's autocast / no_grad
            out._logits = self.head(h)
        else:
            out.main_loss = linear_cross_entropy(
                h.flatten(0, 1), self.head.weight, targets.flatten()
            )
            out.loss = out.main_loss
            if self.mtp and mtp_weight > 0:
                out.mtp_losses = self._mtp_losses(h, input_ids, targets, positions, stats, counted)
                out.loss = out.loss + mtp_weight / len(self.mtp) * sum(out.mtp_losses)
            if stats.balance_losses:
                out.balance_loss = torch.stack(stats.balance_losses).sum()
                out.loss = out.loss + balance_weight * out.balance_loss
        n_moe = len(self.moe_layers())
        if n_moe:
            counts = torch.stack(stats.counts)
            if len(stats.counts) < n_moe:  # MTP modules that did not run
                counts = torch.cat(
                    [counts, counts.new_zeros(n_moe - len(stats.counts), counts.shape[1])]
                )
            out.expert_counts = counts
        return out

    def _mtp_losses(
        self, h, input_ids, targets, positions, stats, counted=None
    ) -> list[torch.Tensor]:
        """Module k sees h_{k-1} at i and token i+k, and predicts token i+k+1 (= targets[i+k])."""
        losses = []
        T = input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            if counted is not None:  # position i counts if token i+k is not padding
                stats.counted = counted[:, k:].flatten()
            pos = positions[:, : T - k]
            cos, sin = self.rope(pos)
            h = module(h[:, : T - k], self.embed(input_ids[:, k:]), cos, sin, stats=stats)
            losses.append(
                linear_cross_entropy(
                    module.norm(h).flatten(0, 1), self.head.weight, targets[:, k:].flatten()
                )
            )
        return losses

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- cached decoding (the engine drives these; see DecodeStep) ------------------------
    @torch.no_grad()
    def fold(self, max_positions: int, dispatch: str = "auto", mtp: bool = True) -> FoldedModel:
        """The weights rearranged for `decode`, and a RoPE table over max_positions."""
        w = self.embed.weight
        return FoldedModel(
            layers=[b.fold(dispatch) for b in self.layers],
            mtp=[m.fold(dispatch) for m in self.mtp] if mtp else [],
            head=self.head.weight.t(),
            norm_eps=self.norm.eps_tensor(w.device),
            rope=rope_table(max_positions, self.inv_freq, self.rope_factor, w.dtype, w.device),
            dispatch=dispatch,
        )

    def decode(
        self,
        f: FoldedModel,
        ids: torch.Tensor,
        st: DecodeStep,
        cache: CacheRows,
        counts=None,
        index: CacheRows | None = None,
    ) -> torch.Tensor:
        """ids [B, T] -> final-norm hidden [B, T, d]. `cache`: every layer's latent rows
        (see MLA.decode); counts [n_moe, E] optionally accumulates the expert load; index
        (V3.2): the indexer keys' rows, likewise."""
        x = F.embedding(ids.view(-1), self.embed.weight)  # activations stay 2-D: [B*T, d]
        moe = 0
        for i, (layer, fl) in enumerate(zip(self.layers, f.layers, strict=True)):
            c = None
            if counts is not None and isinstance(layer.ffn, MoE):
                c, moe = counts[moe], moe + 1
            x = layer.decode(fl, x, st, cache, i, c, index)
        return (rms_unweighted(x, f.norm_eps) * self.norm.weight).view(*ids.shape, -1)

    def mtp_decode(
        self,
        f: FoldedModel,
        h: torch.Tensor,
        next_ids: torch.Tensor,
        st: DecodeStep,
        cache: CacheRows,
        index: CacheRows | None = None,
    ) -> torch.Tensor:
        """MTP module 1 over the cache: h [B, T, d] (the main model's final-norm hidden),
        next_ids [B, T] the token after each position -> its normed output [B, T, d] (the
        shared head turns it into logits for the token two ahead)."""
        emb = F.embedding(next_ids.view(-1), self.embed.weight)
        out = self.mtp[0].decode(f.mtp[0], h.reshape(emb.shape), emb, st, cache, 0, index)
        return out.view(*next_ids.shape, -1)
