"""Export a checkpoint to GGUF, the one-file format llama.cpp, ollama and LM Studio run.

The file follows what llama.cpp's own converter (convert_hf_to_gguf.py, DeepseekV2Model)
writes for DeepSeek-V3, architecture "deepseek2", and what its loader
(src/models/deepseek2.cpp) reads, with the differences a nanoseek checkpoint needs:
- the tokenizer: nanoseek's byte-level BPE splits text with GPT-2's regex, so it is written
  as tokenizer.ggml.pre = "gpt-2", a pre-tokenizer llama.cpp knows (its converter recognises
  tokenizers by a hash of their output on a fixed text, so it refuses every freshly trained
  one); BOS is added, as nanoseek adds it to every prompt.
- q_lora_rank null (uncompressed queries, as in `small`) is written as q_lora_rank = 0: the
  loader requires the key (unless the model has 26 or 27 layers, which it takes for
  DeepSeek-V2-Lite), and 0 makes it read `attn_q` instead of `attn_q_a`/`attn_q_b`.
- the MTP module is kept as llama.cpp's NextN layer (blk.{L}.*, nextn_predict_layers = 1),
  which it runs as a speculative draft head, when llama.cpp can run it (an MoE block with
  compressed queries); otherwise it is dropped, and the export says so.

Tensors are the checkpoint's, renamed (gguf's MODEL_TENSOR names) and rearranged as the
converter does: routed experts stacked per layer; kv_b split per head into k_b (transposed,
[H, C, nope]) and v_b ([H, v, C]) for llama.cpp's absorbed MLA. The rope slices stay as
they are: DeepSeek's interleaved pairs are llama.cpp's "normal" rope. Norms, biases and the
router stay float32; the other matrices are stored in `dtype` (q8_0: rows whose length is
not a multiple of 32 fall back to f16, as in the converter). Written one tensor at a time:
peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.config import ModelConfig, is_yarn
from nanoseek.data.tokenizer import ADD_BOS, ADD_EOS, CHAT_TEMPLATE, Tokenizer
from nanoseek.hub import from_pretrained, resolve_checkpoint
from nanoseek.model import Transformer
from nanoseek.utils import atomic_path

DTYPES = ("f32", "f16", "q8_0")
GGUF_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split regex, which ByteLevel uses


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked; the message says why and what to do."""


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ExportError(
            "GGUF export needs the `gguf` package: pip install 'nanoseek[export]'"
        ) from e
    return gguf


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # float32 data, made when written


def export_gguf(
    checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "f32", verbose: bool = True
) -> Path:
    """Write `checkpoint` (a checkpoint or run directory with tokenizer.json) as one GGUF file
    at `out`, atomically. Returns `out`."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(checkpoint)
    if not (ckpt / "tokenizer.json").is_file():
        raise ExportError(
            f"{ckpt}: no tokenizer.json; a GGUF carries its tokenizer, so copy the "
            "training tokenizer (tokenizer.json + tokenizer_config.json) into the checkpoint"
        )
    tok = Tokenizer.load(ckpt)
    spec = _tokenizer_spec(tok)  # before the (slower) weights: a refused tokenizer fails fast
    if ModelConfig.load(ckpt).model_type == "deepseek_v32":
        raise ExportError(
            f"{ckpt}: DeepSeek-V3.2 (sparse attention) checkpoints are not exported; "
            "llama.cpp runs them as architecture deepseek32, which this export does not write"
        )
    model = from_pretrained(ckpt, dtype=torch.float32)
    cfg = model.config
    log = (lambda msg: print(msg, file=sys.stderr)) if verbose else (lambda msg: None)

    keep_mtp, why = mtp_support(cfg)
    if lost := _unplaced(model, keep_mtp):
        raise ExportError(
            f"{ckpt}: llama.cpp's deepseek2 layout has no place for {len(lost)} of the model's "
            f"tensors ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''}); not exported"
        )
    if cfg.num_nextn_predict_layers and not keep_mtp:
        log(f"export: MTP module dropped: {why}")
    elif cfg.num_nextn_predict_layers > 1:
        n = cfg.num_nextn_predict_layers
        log(f"export: MTP module{f's 2..{n}' if n > 2 else ' 2'} dropped ({why})")
    tensors = list(_tensors(gguf, model, dtype, keep_mtp))

    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]
    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            where = ckpt.resolve()  # a run's checkpoint is named by its run
            writer.add_name(where.parent.name if where.name == "ckpt" else where.name)
            writer.add_file_type(
                {
                    "f32": gguf.LlamaFileType.ALL_F32,
                    "f16": gguf.LlamaFileType.MOSTLY_F16,
                    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                }[dtype]
            )
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_hparams(gguf, writer, cfg, keep_mtp, log)
            _add_tokenizer(gguf, writer, tok, spec, cfg.vocab_size)
            for t in tensors:  # the header first, then one tensor at a time
                block, size = gguf.GGML_QUANT_SIZES[t.qtype]
                n_bytes = int(np.prod(t.shape)) // block * size
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), n_bytes, t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                data = np.ascontiguousarray(t.make(), dtype=np.float32)
                writer.write_tensor_data(gguf.quants.quantize(data, t.qtype))
        finally:
            writer.close()
    log(f"export: {out} ({len(tensors)} tensors, {dtype}, {out.stat().st_size / 1e6:.1f} MB)")
    return out


def mtp_support(cfg: ModelConfig) -> tuple[bool, str]:
    """Whether llama.cpp can run the (first) MTP module as its NextN draft head, and why not."""
    if cfg.num_nextn_predict_layers == 0:
        return False, "the model has none"
    if not cfg.is_moe_layer(cfg.num_hidden_layers):
        return (
            False,
            "llama.cpp's deepseek2 NextN layer must be an MoE block; this model's is dense",
        )
    if cfg.q_lora_rank is None:
        return False, "llama.cpp's deepseek2 NextN layer needs compressed queries (q_lora_rank)"
    return True, "llama.cpp runs one NextN layer"


def _groups_used(cfg: ModelConfig) -> bool:
    """Whether routing is group-limited in a way that changes which experts are chosen."""
    return cfg.n_group > 1 and cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group


def _add_hparams(gguf, w, cfg: ModelConfig, keep_mtp: bool, log) -> None:
    """The deepseek2 keys llama.cpp reads, valued as its converter would value them."""
    n_mtp = 1 if keep_mtp else 0
    w.add_block_count(cfg.num_hidden_layers + n_mtp)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_vocab_size(cfg.vocab_size)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    # MLA runs as multi-query attention over the latent: one kv "head" of C + R
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_q_lora_rank(cfg.q_lora_rank or 0)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if is_yarn(cfg.rope_scaling):
        s = cfg.rope_scaling
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(s["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
        if s.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(s["beta_fast"]))
        if s.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(s["beta_slow"]))
        if s.get("attention_factor") is not None:
            w.add_rope_scaling_yarn_attn_factor(float(s["attention_factor"]))
        if s.get("mscale_all_dim") is not None:  # llama.cpp divides this 0.1 back out
            w.add_rope_scaling_yarn_log_mul(0.1 * float(s["mscale_all_dim"]))
    # feed-forward: dense leading layers, then MoE
    moe = cfg.n_routed_experts > 0
    n_all = cfg.num_hidden_layers + n_mtp
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if moe else n_all)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size if moe else cfg.intermediate_size)
    # llama.cpp requires shared experts in an MoE layer: none are written as one of zeros
    w.add_expert_shared_count(max(cfg.n_shared_experts, 1) if moe else 0)
    if not moe:
        return
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_gating_func(
        gguf.ExpertGatingFuncType.SIGMOID
        if cfg.scoring_func == "sigmoid"
        else gguf.ExpertGatingFuncType.SOFTMAX
    )
    if cfg.q_lora_rank and cfg.num_hidden_layers in (26, 27):
        log(
            f"export: warning: llama.cpp takes a {cfg.num_hidden_layers}-layer deepseek2 model "
            "for DeepSeek-V2-Lite and ignores q_lora_rank: it will not load this file"
        )
    if _groups_used(cfg):
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        if cfg.scoring_func == "softmax":
            log(
                "export: warning: llama.cpp scores an expert group by its top-2 sum (V3); "
                "this V2 model's group_limited_greedy uses the max, so routing may differ"
            )


def _tokenizer_spec(tok: Tokenizer) -> dict:
    """The tokenizer's tokenizer.json, if llama.cpp's "gpt2" tokenizer with the "gpt-2"
    pre-tokenizer splits and merges text as it does."""
    spec = json.loads(tok._tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or spec.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
    ):
        raise ExportError(
            "the checkpoint's tokenizer is not a nanoseek byte-level BPE (BPE model, ByteLevel "
            "pre-tokenizer without prefix space, no normalizer); llama.cpp would split text "
            "differently, so it is not exported"
        )
    return spec


def _add_tokenizer(gguf, w, tok: Tokenizer, spec: dict, vocab_size: int) -> None:
    """nanoseek's byte-level BPE as llama.cpp's "gpt2" tokenizer, with GPT-2's pre-tokenizer."""
    vocab = tok._tok.get_vocab(with_added_tokens=True)
    if tok.vocab_size > vocab_size:
        raise ExportError(
            f"the tokenizer has {tok.vocab_size} tokens, the model's vocabulary {vocab_size}: "
            "is it the tokenizer of another checkpoint?"
        )
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer never makes
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (
            gguf.TokenType.CONTROL
            if i in special
            else gguf.TokenType.USER_DEFINED
            if i in added
            else gguf.TokenType.NORMAL
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_eot_token_id(tok.end_id)  # the end of a chat turn: nanoseek stops there too
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(ADD_BOS)
    w.add_add_eos_token(ADD_EOS)
    w.add_chat_template(CHAT_TEMPLATE)


# --- tensors -----------------------------------------------------------------------------

# nanoseek names inside a block -> gguf MODEL_TENSOR member names (".weight" unless a bias)
_BLOCK = {
    "attn_norm.weight": "ATTN_NORM",
    "ffn_norm.weight": "FFN_NORM",
    "attn.wq.weight": "ATTN_Q",
    "attn.wq_a.weight": "ATTN_Q_A",
    "attn.q_norm.weight": "ATTN_Q_A_NORM",
    "attn.wq_b.weight": "ATTN_Q_B",
    "attn.wkv_a.weight": "ATTN_KV_A_MQA",
    "attn.kv_norm.weight": "ATTN_KV_A_NORM",
    "attn.wo.weight": "ATTN_OUT",
    "ffn.w1.weight": "FFN_GATE",
    "ffn.w2.weight": "FFN_DOWN",
    "ffn.w3.weight": "FFN_UP",
    "ffn.gate.weight": "FFN_GATE_INP",
    "ffn.gate.bias": "FFN_EXP_PROBS_B",
    "ffn.shared.w1.weight": "FFN_GATE_SHEXP",
    "ffn.shared.w2.weight": "FFN_DOWN_SHEXP",
    "ffn.shared.w3.weight": "FFN_UP_SHEXP",
}
_MTP = {
    "enorm.weight": "NEXTN_ENORM",
    "hnorm.weight": "NEXTN_HNORM",
    "eh_proj.weight": "NEXTN_EH_PROJ",
    "norm.weight": "NEXTN_SHARED_HEAD_NORM",
}
_TOP = {"embed.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM", "head.weight": "OUTPUT"}


def _tensors(gguf, model: Transformer, dtype: str, keep_mtp: bool) -> Iterator[_Tensor]:
    cfg = model.config
    T = gguf.GGMLQuantizationType
    weight_type = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}[dtype]

    def name(member: str, bid: int | None, suffix: str) -> str:
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[member]].format(bid=bid) + suffix

    def tensor(member: str, bid: int | None, suffix: str, make, shape) -> _Tensor:
        qtype = weight_type
        if len(shape) == 1 or member in ("FFN_GATE_INP",):  # as llama.cpp's converter
            qtype = T.F32
        elif qtype == T.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0]:
            qtype = T.F16
        return _Tensor(name(member, bid, suffix), tuple(shape), qtype, make)

    def param(t: torch.Tensor) -> Callable[[], np.ndarray]:
        return lambda: t.detach().float().numpy()

    for ours, member in _TOP.items():
        if ours == "head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp falls back to token_embd
        t = model.get_parameter(ours)
        yield tensor(member, None, ".weight", param(t), t.shape)
    blocks = [(i, layer) for i, layer in enumerate(model.layers)]
    if keep_mtp:
        blocks.append((cfg.num_hidden_layers, model.mtp[0].block))
    for bid, block in blocks:
        own = dict(block.named_parameters()) | dict(block.named_buffers())
        for ours, member in _BLOCK.items():
            if ours not in own or (ours == "ffn.gate.bias" and cfg.scoring_func != "sigmoid"):
                continue
            suffix = ".bias" if ours.endswith(".bias") else ".weight"
            yield tensor(member, bid, suffix, param(own[ours]), own[ours].shape)
        yield from _mla_kv_b(tensor, block, bid)
        if "ffn.experts.w13" in own:
            yield from _experts(tensor, param, own, bid, cfg)
    if keep_mtp:
        mtp, bid = model.mtp[0], cfg.num_hidden_layers
        for ours, member in _MTP.items():
            t = mtp.get_parameter(ours)
            yield tensor(member, bid, ".weight", param(t), t.shape)


def _unplaced(model: Transformer, keep_mtp: bool) -> list[str]:
    """The model's tensors that `_tensors` would not write (MTP modules llama.cpp cannot run
    aside): a part of the model the GGUF would silently lose."""
    cfg = model.config
    placed = set(_TOP)
    blocks = [f"layers.{i}." for i in range(cfg.num_hidden_layers)]
    if keep_mtp:
        blocks.append("mtp.0.block.")
        placed |= {f"mtp.0.{k}" for k in _MTP}
    for prefix in blocks:
        extra = ("attn.wkv_b.weight", "ffn.experts.w13", "ffn.experts.w2")
        placed |= {prefix + k for k in (*_BLOCK, *extra)}
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    kept_mtp = ("mtp.0.",) if keep_mtp else ()
    return [
        n for n in names if n not in placed and (not n.startswith("mtp.") or n.startswith(kept_mtp))
    ]


def _mla_kv_b(tensor, block, bid: int) -> Iterator[_Tensor]:
    """kv_b [H*(nope+v), C] -> k_b [H, C, nope] (transposed) and v_b [H, v, C], so llama.cpp
    absorbs them into the query and the output (convert_hf_to_gguf.py does the same)."""
    attn = block.attn
    H, nope, v, C = attn.n_heads, attn.nope, attn.v_dim, attn.kv_rank
    kv_b = attn.wkv_b.weight.detach().float().view(H, nope + v, C)
    yield tensor(
        "ATTN_K_B", bid, ".weight", lambda: kv_b[:, :nope].transpose(1, 2).numpy(), (H, C, nope)
    )
    yield tensor("ATTN_V_B", bid, ".weight", lambda: kv_b[:, nope:].numpy(), (H, v, C))


def _experts(tensor, param, own, bid: int, cfg: ModelConfig) -> Iterator[_Tensor]:
    """Stacked routed experts [E, ...] (nanoseek keeps them stacked, w13 = [gate; up])."""
    w13, w2 = own["ffn.experts.w13"].detach(), own["ffn.experts.w2"].detach()
    E, inter2, d = w13.shape
    inter = inter2 // 2
    yield tensor("FFN_GATE_EXP", bid, ".weight", param(w13[:, :inter]), (E, inter, d))
    yield tensor("FFN_UP_EXP", bid, ".weight", param(w13[:, inter:]), (E, inter, d))
    yield tensor("FFN_DOWN_EXP", bid, ".weight", param(w2), (E, d, inter))
    if cfg.n_shared_experts == 0:  # llama.cpp needs a shared expert: one that adds 0
        zeros = lambda *shape: lambda: np.zeros(shape, dtype=np.float32)
        yield tensor("FFN_GATE_SHEXP", bid, ".weight", zeros(inter, d), (inter, d))
        yield tensor("FFN_UP_SHEXP", bid, ".weight", zeros(inter, d), (inter, d))
        yield tensor("FFN_DOWN_SHEXP", bid, ".weight", zeros(d, inter), (d, inter))
