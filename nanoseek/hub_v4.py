"""DeepSeek-V4 checkpoints: config.json + safetensors, read in any of three layouts.

- transformers' module names (`model.layers.N.self_attn.q_a_proj.weight`, stacked
  experts `mlp.experts.gate_up_proj`): what `V4Transformer` names its tensors, and what
  we write. transformers' DeepseekV4ForCausalLM reads it as it is.
- DeepSeek's released names (`layers.N.attn.wq_a.weight`, `embed.weight`, `head.weight`,
  `hc_head_fn`, per-expert `ffn.experts.E.w1/w2/w3`), which transformers renames on load.
- transformers' `save_pretrained` output: it undoes those renames on save but keeps the
  `model.` prefix (`model.layers.N.attn.wq_a.weight`, `model.embed_tokens.weight`,
  `head.weight`) -- a mix of the two.

Every name is brought to the module name by one table (transformers' conversion table for
deepseek_v4, anchored per block so `model.norm` stays `model.norm`); per-expert tensors are
stacked. MTP layers (`mtp.*`, or layers past num_hidden_layers) are skipped: V4Transformer
has no MTP module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.config import V4Config
from nanoseek.model.v4 import V4Transformer

# released / saved name -> module name, inside one block (`layers.N.`); applied in order
BLOCK_RENAMES = [
    (r"^hc_(attn|ffn)_(fn|base|scale)$", r"\1_hc.\2"),
    (r"^attn_norm\.", "input_layernorm."),
    (r"^ffn_norm\.", "post_attention_layernorm."),
    (r"^attn\.indexer\.compressor\.", "attn.compressor.indexer."),
    (r"^attn\.indexer\.weights_proj\.", "attn.compressor.indexer.scorer.weights_proj."),
    (r"^attn\.indexer\.wq_b\.", "attn.compressor.indexer.q_b_proj."),
    (r"^attn\.", "self_attn."),
    (r"^ffn\.", "mlp."),
    (r"\.attn_sink$", ".sinks"),
    (r"\.ape$", ".position_bias"),
    (r"\.norm\.", ".kv_norm."),  # attention / compressor norms (the block's are renamed above)
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]
TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "embed_tokens.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w[123]|gate_proj|up_proj|down_proj)\.weight$"
)


def module_name(key: str) -> str | None:
    """A checkpoint tensor's name in V4Transformer (per-expert tensors keep their expert
    suffix, see EXPERT), or None for what V4Transformer has no place for (MTP)."""
    if key.startswith("mtp.") or key.endswith("weight_scale_inv"):
        return None  # FP8 scales are read beside their weights (_TensorSource.get)
    short = key.removeprefix("model.")
    if short in TOP_RENAMES:
        return TOP_RENAMES[short]
    if short in ("lm_head.weight",):
        return short
    m = re.match(r"^layers\.(\d+)\.(.*)$", short)
    if m is None:
        return "model." + short  # hc_head.*, already a module name
    rest = m.group(2)
    if not rest.startswith(("self_attn.", "mlp.", "attn_hc.", "ffn_hc.", "input_", "post_")):
        for pattern, repl in BLOCK_RENAMES:
            rest = re.sub(pattern, repl, rest)
    return f"model.layers.{m.group(1)}.{rest}"


def load_v4(path: Path, config: dict, src, dtype: torch.dtype, device) -> V4Transformer:
    """A V4Transformer from a checkpoint directory's config dict and tensors (`src`: hub's
    _TensorSource). Built on meta, then filled one tensor at a time."""
    from nanoseek.hub import CheckpointError, fill_tensor

    cfg = V4Config.from_hf_dict(config, str(path / "config.json"))
    with torch.device("meta"):
        model = V4Transformer(cfg).to(dtype)
        for moe in model.moe_layers():  # the routing bias stays fp32, like the reference
            if hasattr(moe.gate, "e_score_correction_bias"):
                moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    model = model.to_empty(device=device)
    own = model.state_dict(keep_vars=True)
    filled: set[str] = set()
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for key in src.files:
        name = module_name(key)
        if name is None:
            continue
        m = EXPERT.match(name)
        if m:
            experts.setdefault(m.group(1), {})[int(m.group(2)), m.group(3)] = src.get(key)
            continue
        layer = re.match(r"^model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= cfg.num_hidden_layers:
            continue  # an MTP layer stored as an extra layer
        if name not in own:
            raise CheckpointError(f"{path}: tensor {key} has no place in a DeepSeek-V4 model")
        fill_tensor(path, own[name], key, src.get(key))
        filled.add(name)
    for prefix, parts in experts.items():  # per-expert w1 (gate) / w3 (up) / w2 (down): stack
        if int(prefix.split(".")[2]) >= cfg.num_hidden_layers:
            continue
        get = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        parts = {(e, get.get(n, n)): t for (e, n), t in parts.items()}
        E = cfg.n_routed_experts
        try:
            gate_up = [torch.cat([parts[e, "gate_proj"], parts[e, "up_proj"]]) for e in range(E)]
            down = [parts[e, "down_proj"] for e in range(E)]
        except KeyError as e:
            raise CheckpointError(f"{path}: expert tensor {prefix}.{e} is missing") from None
        fill_tensor(path, own[prefix + ".gate_up_proj"], prefix, torch.stack(gate_up))
        fill_tensor(path, own[prefix + ".down_proj"], prefix, torch.stack(down))
        filled |= {prefix + ".gate_up_proj", prefix + ".down_proj"}
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        filled.add("lm_head.weight")
    missing = sorted(set(own) - filled)
    if missing:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint: {missing[:5]}")
    return model.eval()


def write_v4(
    model: V4Transformer,
    directory: Path,
    dtype: torch.dtype | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """config.json + model.safetensors (module names) into an existing directory.
    `tensors`: the model's state dict gathered whole, when its parameters are sharded."""
    tensors = {
        k: v.detach().contiguous().clone() for k, v in (tensors or model.state_dict()).items()
    }
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight")  # one copy: the embedding (safetensors shares none)
    if dtype is not None:  # floats only (tid2eid is an index); the routing bias stays fp32
        tensors = {
            k: v.to(dtype) if v.is_floating_point() and "e_score" not in k else v
            for k, v in tensors.items()
        }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
