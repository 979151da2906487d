"""The DeepSeek-V3 transformer: blocks, the model, the MTP modules, the loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA, LayerKV
from nanoseek.model.loss import linear_cross_entropy
from nanoseek.model.moe import MLP, MoE
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import attention_factor, cos_sin, inv_frequencies


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = (
            MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(self, x, cos, sin, kv=None, positions=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv, positions)
        return x + self.ffn(self.ffn_norm(x))


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

    def forward(self, h_prev, emb_next, cos, sin, kv=None, positions=None):
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, kv, positions)


@dataclass
class ModelOutput:
    hidden: torch.Tensor  # final-norm hidden states, what MTP module 1 reads
    head: nn.Module  # the output head: `logits` is computed from `hidden` on first use
    loss: torch.Tensor | None = None  # main + mtp_weight/D * sum(mtp) (+ balance loss)
    main_loss: torch.Tensor | None = None
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
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
        for moe in self.moe_layers():
            moe.gate.bias.zero_()

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        return cos_sin(positions, self.inv_freq, self.rope_factor)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        mtp_weight: float = 0.3,
        kv: list[LayerKV] | None = None,
        positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, vocab]. With `targets` [B, T] (ignore -100),
        also the loss, including MTP losses when the model has MTP modules."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions)
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if kv is None else kv[i], positions if kv else None)
        h = self.norm(h)
        out = ModelOutput(hidden=h, head=self.head)
        if targets is None:  # logits now, under the caller's autocast / no_grad
            out._logits = self.head(h)
            return out
        out.main_loss = linear_cross_entropy(h.flatten(0, 1), self.head.weight, targets.flatten())
        out.loss = out.main_loss
        if self.mtp and mtp_weight > 0:
            out.mtp_losses = self._mtp_losses(h, input_ids, targets, positions)
            out.loss = out.loss + mtp_weight / len(self.mtp) * sum(out.mtp_losses)
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None and self.training]
        if aux:
            out.loss = out.loss + sum(aux)
        return out

    def _mtp_losses(self, h, input_ids, targets, positions) -> list[torch.Tensor]:
        """Module k sees h_{k-1} at i and token i+k, and predicts token i+k+1 (= targets[i+k])."""
        losses = []
        T = input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            pos = positions[:, : T - k]
            cos, sin = self.rope(pos)
            h = module(h[:, : T - k], self.embed(input_ids[:, k:]), cos, sin)
            losses.append(
                linear_cross_entropy(
                    module.norm(h).flatten(0, 1), self.head.weight, targets[:, k:].flatten()
                )
            )
        return losses

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
