"""Read and write Hugging Face DeepSeek-V3 (and V2, V3.2) checkpoints: config.json + safetensors.
DeepSeek-V4 checkpoints (`model_type: deepseek_v4`) are handed to hub_v4.py.

One table maps nanoseek's paper names to Hugging Face's; routed experts, stored per expert
in the checkpoint, are stacked into one tensor here. Official FP8 weights
(float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block) are dequantised on
load. MTP modules live in the checkpoint as extra layers `model.layers.{L + k}`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.indexer import Indexer
from nanoseek.model.v4 import V4Transformer
from nanoseek.utils import atomic_dir, read_json

FP8_BLOCK = 128

# nanoseek suffix -> Hugging Face suffix, inside one block (`model.layers.{i}.`)
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    # V3.2's lightning indexer (same names on both sides)
    "attn.indexer.wq_b.weight": "self_attn.indexer.wq_b.weight",
    "attn.indexer.wk.weight": "self_attn.indexer.wk.weight",
    "attn.indexer.k_norm.weight": "self_attn.indexer.k_norm.weight",
    "attn.indexer.k_norm.bias": "self_attn.indexer.k_norm.bias",
    "attn.indexer.weights_proj.weight": "self_attn.indexer.weights_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
}
MTP_NAMES = {  # extra tensors of an MTP layer, besides its block
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message names the file and the problem."""


def hf_names(model: Transformer) -> dict[str, str]:
    """nanoseek parameter/buffer name -> Hugging Face name, for everything but stacked experts."""
    cfg = model.config
    names = {k: v for k, v in TOP_NAMES.items()}
    if cfg.tie_word_embeddings:
        names.pop("head.weight")
    for i in range(cfg.num_hidden_layers):
        names.update({f"layers.{i}.{a}": f"model.layers.{i}.{b}" for a, b in BLOCK_NAMES.items()})
    for k in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + k}."
        names.update({f"mtp.{k}.block.{a}": hf + b for a, b in BLOCK_NAMES.items()})
        names.update({f"mtp.{k}.{a}": hf + b for a, b in MTP_NAMES.items()})
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    if cfg.scoring_func == "softmax":  # V2 checkpoints have no selection bias
        own = {k: v for k, v in own.items() if not k.endswith("gate.bias")}
    return {a: b for a, b in names.items() if a in own}


def _expert_layers(model: Transformer) -> dict[str, str]:
    """nanoseek experts-module prefix -> Hugging Face `...mlp.experts` prefix."""
    cfg = model.config
    out = {}
    for name, _ in model.named_modules():
        m = re.fullmatch(r"(layers\.(\d+)|mtp\.(\d+)\.block)\.ffn\.experts", name)
        if m:
            layer = int(m.group(2)) if m.group(2) else cfg.num_hidden_layers + int(m.group(3))
            out[name] = f"model.layers.{layer}.mlp.experts"
    return out


# --- reading ----------------------------------------------------------------------------


class _TensorSource:
    """All tensors of a checkpoint directory (single file or sharded), read lazily."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.exists():
            index_json = read_json(index, "a safetensors index", CheckpointError)
            if not isinstance(index_json, dict) or "weight_map" not in index_json:
                raise CheckpointError(f"{index}: not a valid safetensors index (no weight_map)")
            weight_map = index_json["weight_map"]
            files = {k: path / f for k, f in weight_map.items()}
        elif single.exists():
            files = None
            self._single = single
        else:
            raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
        self._handles: dict[Path, object] = {}
        if files is None:
            h = self._open(single)
            files = {k: single for k in h.keys()}
        self.files = files

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.exists():
                raise CheckpointError(f"{f}: shard listed in the index is missing")
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, Exception) as e:
                raise CheckpointError(
                    f"{f}: unreadable safetensors file (truncated or corrupt?): {e}"
                ) from e
        return self._handles[f]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        try:
            t = self._open(f).get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"{f}: cannot read tensor {name} (truncated or corrupt?): {e}"
            ) from e
        scale_name = name.replace(".weight", ".weight_scale_inv")
        if t.dtype == torch.float8_e4m3fn and scale_name in self.files:
            t = dequantize_fp8(t, self._open(self.files[scale_name]).get_tensor(scale_name))
        return t


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK
) -> torch.Tensor:
    """float8 weight [out, in] times its per-(block x block) scale -> float32."""
    out, inp = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return weight.float() * scale


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek's release does it: scale each block so its max is fp8's max."""
    out, inp = weight.shape
    w = weight.float()
    rows, cols = -(-out // block), -(-inp // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out, :inp] = w
    blocks = padded.view(rows, block, cols, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).view(rows * block, cols * block)[:out, :inp]
    return q.to(torch.float8_e4m3fn), scale_inv


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory as is; a training run directory (`runs/X`, as a user naturally
    passes it) by its `ckpt/` checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a checkpoint directory (expected config.json + safetensors, "
            "or a run directory with ckpt/)"
        )
    # a run directory has a config.json of its own (the model it trains), but no weights
    weights = any(
        (path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")
    )
    if not weights and (path / "ckpt" / "config.json").exists():
        return path / "ckpt"
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: missing config.json (and no ckpt/ run checkpoint in it)")
    return path


def fill_tensor(path: Path, target: torch.Tensor, name: str, t: torch.Tensor) -> None:
    """Copy checkpoint tensor `name` into `target`, or say which shape config.json implied."""
    if tuple(t.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{path}: tensor {name} has shape {tuple(t.shape)}, "
            f"config.json implies {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(t)


def from_pretrained(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Transformer | V4Transformer:
    """Load a Hugging Face DeepSeek-V3 (or V2, V3.2, V4) checkpoint directory, or a nanoseek
    run directory (its `ckpt/`), into a nanoseek model (V4: a V4Transformer)."""
    path = resolve_checkpoint(path)
    d = read_json(path / "config.json", "a model config", ConfigError)
    if isinstance(d, dict) and d.get("model_type") == "deepseek_v4":
        from nanoseek.hub_v4 import load_v4

        return load_v4(path, d, _TensorSource(path), dtype, device)
    cfg = ModelConfig.load(path / "config.json")
    src = _TensorSource(path)
    present = sum(
        f"model.layers.{cfg.num_hidden_layers + k}.eh_proj.weight" in src
        for k in range(cfg.num_nextn_predict_layers)
    )
    if present < cfg.num_nextn_predict_layers:  # e.g. saved by transformers, which drops MTP layers
        cfg = cfg.replace(num_nextn_predict_layers=present)
    # Built on meta in the target dtype, then filled one tensor at a time: peak memory is
    # the model plus one tensor, not a second full-precision copy.
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
        for moe in model.moe_layers():  # the routing bias stays fp32, like the reference
            moe.gate.bias.data = moe.gate.bias.data.float()
        for m in model.modules():  # so do V3.2's per-head index weights, as in transformers
            if isinstance(m, Indexer):
                m.weights_proj.float()
    model = model.to_empty(device=device)
    for moe in model.moe_layers():
        moe.gate.bias.zero_()  # V2 checkpoints have none
    own = dict(model.named_parameters()) | dict(model.named_buffers())

    def fill(target: torch.Tensor, name: str, t: torch.Tensor) -> None:
        fill_tensor(path, target, name, t)

    for ours, theirs in hf_names(model).items():
        if theirs not in src:
            raise CheckpointError(f"{path}: tensor {theirs} is missing from the checkpoint")
        fill(own[ours], theirs, src.get(theirs))
    for ours, theirs in _expert_layers(model).items():
        w13, w2 = own[f"{ours}.w13"], own[f"{ours}.w2"]
        inter = w13.shape[1] // 2
        for e in range(cfg.n_routed_experts):
            p = f"{theirs}.{e}."
            for name, target in (
                ("gate_proj", w13[e, :inter]),
                ("up_proj", w13[e, inter:]),
                ("down_proj", w2[e]),
            ):
                if p + name + ".weight" not in src:
                    raise CheckpointError(
                        f"{path}: expert tensor {p}{name}.weight is missing from the checkpoint"
                    )
                fill(target, p + name + ".weight", src.get(p + name + ".weight"))
    if cfg.tie_word_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()


# --- writing ----------------------------------------------------------------------------


def hf_state_dict(
    model: Transformer, tensors: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, experts unstacked, MTP as extra layers.
    `tensors`: the model's state dict gathered whole, when its parameters are sharded
    (`Runtime.full_state_dict`)."""
    own = tensors or dict(model.named_parameters()) | dict(model.named_buffers())
    out = {theirs: own[ours].detach() for ours, theirs in hf_names(model).items()}
    for ours, theirs in _expert_layers(model).items():
        w13, w2 = own[f"{ours}.w13"].detach(), own[f"{ours}.w2"].detach()
        inter = w13.shape[1] // 2
        for e in range(w13.shape[0]):
            out[f"{theirs}.{e}.gate_proj.weight"] = w13[e, :inter]
            out[f"{theirs}.{e}.up_proj.weight"] = w13[e, inter:]
            out[f"{theirs}.{e}.down_proj.weight"] = w2[e]
    cfg = model.config
    for k in range(
        cfg.num_nextn_predict_layers
    ):  # the official layout repeats embed/head per MTP layer
        hf = f"model.layers.{cfg.num_hidden_layers + k}."
        out[hf + "embed_tokens.weight"] = own["embed.weight"].detach()
        head = own.get("head.weight", own["embed.weight"])  # tied: listed once, as embed
        out[hf + "shared_head.head.weight"] = head.detach()
    return {k: v.contiguous().clone() for k, v in out.items()}


def save_pretrained(
    model: Transformer | V4Transformer, path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write config.json + model.safetensors atomically: into a temp dir, then swapped in."""
    with atomic_dir(path) as tmp:
        write_pretrained(model, tmp, dtype)
    return Path(path)


def write_pretrained(
    model: Transformer | V4Transformer,
    directory: Path,
    dtype: torch.dtype | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """config.json + model.safetensors into an existing directory (not atomic on its own).
    `tensors`: as in `hf_state_dict`."""
    if isinstance(model, V4Transformer):
        from nanoseek.hub_v4 import write_v4

        write_v4(model, directory, dtype, tensors)
        return
    tensors = hf_state_dict(model, tensors)
    if dtype is not None:
        tensors = {
            k: v if k.endswith("e_score_correction_bias") else v.to(dtype)
            for k, v in tensors.items()
        }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
