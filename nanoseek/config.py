"""ModelConfig: every number that shapes a DeepSeek-V3 model, its presets, and the
mapping to and from Hugging Face `config.json`.

Field names are the Hugging Face ones, so a `config.json` reads straight into the
dataclass; the modules use the paper's names for their weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanoseek.utils import atomic_write_text, read_json


def is_yarn(scaling: dict[str, Any] | None) -> bool:
    """rope_scaling dicts say `type` (DeepSeek, transformers 4) or `rope_type` (transformers 5)."""
    return bool(scaling) and scaling.get("type", scaling.get("rope_type")) == "yarn"


# model_type -> the transformers class that reads its checkpoints
MODEL_TYPES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
}


class ConfigError(ValueError):
    """A config that cannot describe a model; the message names the field and the fix."""


@dataclass
class ModelConfig:
    # vocabulary and width
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # mla
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: uncompressed queries (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # rope / yarn
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor", ...}
    # dense layers
    first_k_dense_replace: int = 3
    intermediate_size: int = 18432
    # moe
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"  # V3: noaux_tc; V2: greedy / group_limited_greedy
    # mtp
    num_nextn_predict_layers: int = 1
    # DeepSeek Sparse Attention (V3.2's lightning indexer): read only when model_type is
    # "deepseek_v32"; names and defaults as transformers' DeepseekV32Config
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    model_type: str = "deepseek_v3"  # or "deepseek_v2", "deepseek_v32"

    def __post_init__(self) -> None:
        self.validate()

    # --- derived sizes -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        """V3.2: every attention layer has a lightning indexer (DeepSeek Sparse Attention)."""
        return self.model_type == "deepseek_v32"

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.n_routed_experts > 0 and layer_id >= self.first_k_dense_replace

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid ModelConfig: {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
        ):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)")
        need(
            self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or None"
        )
        need(
            self.scoring_func in ("sigmoid", "softmax"),
            f"scoring_func must be sigmoid or softmax, got {self.scoring_func!r}",
        )
        if self.n_routed_experts > 0:
            need(
                1 <= self.num_experts_per_tok <= self.n_routed_experts,
                "num_experts_per_tok must be between 1 and n_routed_experts",
            )
            need(
                self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                f"n_routed_experts ({self.n_routed_experts}) must divide into n_group ({self.n_group}) groups",
            )
            need(1 <= self.topk_group <= self.n_group, "topk_group must be between 1 and n_group")
            per_group = self.n_routed_experts // self.n_group
            need(
                self.topk_group * per_group >= self.num_experts_per_tok,
                "topk_group groups must hold at least num_experts_per_tok experts",
            )
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive")
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            need(self.intermediate_size > 0, "intermediate_size must be positive for dense layers")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
        need(
            self.model_type in MODEL_TYPES,
            f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}",
        )
        if self.has_indexer:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
            need(
                self.index_head_dim >= self.qk_rope_head_dim,
                "index_head_dim must be >= qk_rope_head_dim (the indexer ropes its first "
                "qk_rope_head_dim numbers)",
            )
            need(
                self.q_lora_rank is not None,
                "deepseek_v32 needs q_lora_rank (the indexer reads the compressed query)",
            )
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(
                kind in ("yarn", "default", None),
                f"rope_scaling type {kind!r} is not supported (only yarn)",
            )
            if kind == "yarn":
                need(float(self.rope_scaling.get("factor", 0)) >= 1, "yarn factor must be >= 1")
                need(
                    "original_max_position_embeddings" in self.rope_scaling,
                    "yarn rope_scaling needs original_max_position_embeddings",
                )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json --------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not self.has_indexer:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                d.pop(name)
        rope_params: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if is_yarn(self.rope_scaling):
            rope_params.update({k: v for k, v in self.rope_scaling.items() if k != "type"})
            rope_params["rope_type"] = "yarn"
        d.update(
            architectures=[MODEL_TYPES[self.model_type]],
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            attention_bias=False,
            rope_interleave=True,
            rope_parameters=rope_params,  # transformers >= 5
            n_group=self.n_group,
            topk_group=self.topk_group,
        )
        if self.has_indexer:  # transformers' V3.2 config has no such field (always interleaved)
            d.pop("rope_interleave")
        if is_yarn(self.rope_scaling):  # transformers 4.x reads this key
            d["rope_scaling"] = {
                **{k: v for k, v in self.rope_scaling.items() if k != "rope_type"},
                "type": "yarn",
            }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a DeepSeek model; "
                f"nanoseek reads {', '.join(repr(t) for t in MODEL_TYPES)} checkpoints"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta"}
        kw = {k: d[k] for k in names if k in d and (d[k] is not None or k == "q_lora_rank")}
        # rope: transformers 5 writes rope_parameters, 4.x writes rope_theta + rope_scaling
        rp = d.get("rope_parameters") or {}
        kw["rope_theta"] = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or (
            rp if rp.get("rope_type", "default") != "default" else None
        )
        if scaling:
            scaling = {k: v for k, v in scaling.items() if k not in ("rope_theta", "rope_type")}
            scaling["type"] = (d.get("rope_scaling") or {}).get("type", rp.get("rope_type", "yarn"))
            kw["rope_scaling"] = scaling
        if model_type == "deepseek_v2":
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("n_group", d.get("n_group") or 1)
            kw.setdefault("topk_group", d.get("topk_group") or 1)
            kw.setdefault("routed_scaling_factor", 1.0)
            kw["norm_topk_prob"] = False  # transformers' V2 gate never renormalises
            kw.setdefault("num_nextn_predict_layers", 0)
        for key in ("n_group", "topk_group"):
            if d.get(key) is None and key in kw:
                kw.pop(key)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e

    def save(self, path: str | Path) -> None:

        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json here; point at a checkpoint directory")
        return cls.from_hf_dict(read_json(path, "a model config", ConfigError), source=str(path))


# --- parameter counts (without building the model) ---------------------------------


# One arithmetic for parameters and FLOPs: every weight of a matrix is one multiply-add per
# token that passes through it, so these counts are also compute.py's MACs per token.


def attention_matrix_params(c: ModelConfig) -> int:
    """The weights of one MLA layer's projections (its norms not included)."""
    d, h = c.hidden_size, c.num_attention_heads
    if c.q_lora_rank is None:
        q = d * h * c.qk_head_dim
    else:
        q = d * c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim)
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    index = 0
    if c.has_indexer:  # wq_b (from the compressed query), wk, weights_proj
        index = c.q_lora_rank * c.index_n_heads * c.index_head_dim
        index += d * c.index_head_dim + d * c.index_n_heads
    return q + kv + h * c.v_head_dim * d + index


def ffn_matrix_params(c: ModelConfig, layer_id: int) -> dict[str, int]:
    """The feed-forward weights one token computes with in block `layer_id`, by part."""
    d = c.hidden_size
    if not c.is_moe_layer(layer_id):
        return {"dense_mlp": 3 * d * c.intermediate_size}  # SwiGLU: w1, w3 up, w2 down
    expert = 3 * d * c.moe_intermediate_size
    return {
        "gate": d * c.n_routed_experts,
        "routed_experts": c.num_experts_per_tok * expert,
        "shared_experts": c.n_shared_experts * expert,
    }


def _layer_params(c: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(total, activated) parameters of one transformer block."""
    d = c.hidden_size
    norms = 2 * d + c.kv_lora_rank + (c.q_lora_rank or 0)  # attn/ffn, kv_norm, q_norm
    if c.has_indexer:
        norms += 2 * c.index_head_dim  # the indexer's k_norm (a LayerNorm: weight and bias)
    active = attention_matrix_params(c) + norms + sum(ffn_matrix_params(c, layer_id).values())
    idle = 0  # routed experts a token does not use
    if c.is_moe_layer(layer_id):
        idle = (c.n_routed_experts - c.num_experts_per_tok) * 3 * d * c.moe_intermediate_size
    return active + idle, active


def param_counts(c: ModelConfig, include_mtp: bool = False) -> dict[str, int]:
    """Total and activated parameter counts, computed from the config alone.

    Total counts every matrix. Activated counts the parameters a token computes with: the
    input embedding is a table lookup, so it is left out (as in DeepSeek's "37B activated");
    the output head is in. MTP modules are excluded by default, as DeepSeek's
    "671B total" does (the released checkpoint, 685B, includes them).
    """
    emb = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else emb
    total = emb + head + c.hidden_size  # + final norm
    active = c.vocab_size * c.hidden_size + c.hidden_size  # the head (shared with emb if tied)
    for i in range(c.num_hidden_layers):
        t, a = _layer_params(c, i)
        total += t
        active += a
    mtp_t = mtp_a = 0
    for _ in range(c.num_nextn_predict_layers):
        t, a = _layer_params(
            c, c.num_hidden_layers
        )  # MTP blocks are MoE blocks past the last layer
        extra = (
            2 * c.hidden_size * c.hidden_size + 3 * c.hidden_size
        )  # eh_proj + enorm/hnorm/head norm
        mtp_t += t + extra
        mtp_a += a + extra
    if include_mtp:
        total += mtp_t
        active += mtp_a
    return {"total": total, "activated": active, "mtp": mtp_t, "embedding": emb + head}


def kv_cache_bytes_per_token(c: ModelConfig, bytes_per_value: int = 2) -> dict[str, int]:
    """Latent cache (c_kv + k_rope) versus full per-head keys and values, all layers; V3.2
    also caches one indexer key per layer (`indexer`, in neither)."""
    latent = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * bytes_per_value
    indexer = c.num_hidden_layers * c.index_head_dim * bytes_per_value if c.has_indexer else 0
    full = (
        c.num_hidden_layers
        * c.num_attention_heads
        * (c.qk_head_dim + c.v_head_dim)
        * bytes_per_value
    )
    return {"latent": latent, "full": full, "indexer": indexer}


# --- DeepSeek-V4 ----------------------------------------------------------------------


V4_LAYER_RATIOS = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}
CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"


def _v4_default_rates() -> dict[str, int]:
    return {CSA: V4_LAYER_RATIOS[CSA], HCA: V4_LAYER_RATIOS[HCA]}


@dataclass
class V4Config:
    """The shape of a DeepSeek-V4 model: what `V4Transformer` builds, and what parameter,
    FLOP and KV-cache accounting reads.

    V4 is not a ModelConfig: its attention is shared-KV multi-query attention (one 512-wide
    head read as key and value) over a 128-token sliding window plus, per layer, either
    nothing, compressed sparse attention (CSA: one entry per 4 tokens, a lightning indexer
    picks index_topk of them) or heavily compressed attention (HCA: one entry per 128 tokens,
    all attended); a grouped low-rank output projection; hc_mult residual streams
    (hyper-connections); every layer MoE, the first num_hash_layers routed by a token-id
    hash. Field names are those of the released config.json (transformers' DeepseekV4Config);
    the per-layer schedule is the released `compress_ratios` (0 = window only), read against
    `compress_rates` (transformers' per-type rates, 4 and 128 unless a small model says less).
    """

    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # per layer: 0 sliding window only, else compress_rates[CSA] (CSA) or [HCA] (HCA)
    compress_ratios: tuple[int, ...] = ()
    compress_rates: dict[str, int] = dataclasses.field(default_factory=_v4_default_rates)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    # rope: plain `rope_theta` in window-only layers; `compress_rope_theta` (with the YaRN
    # `rope_scaling`, if any) wherever a compressor runs
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    model_type: str = "deepseek_v4"

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        rates = {**_v4_default_rates(), **(self.compress_rates or {})}
        self.compress_rates = {CSA: int(rates[CSA]), HCA: int(rates[HCA])}
        csa, hca = self.compress_rates[CSA], self.compress_rates[HCA]
        ratios = tuple(int(r) for r in self.compress_ratios[:n])
        if not ratios:  # transformers' default schedule: 2 HCA, then HCA / CSA interleaved
            ratios = (hca,) * min(n, 2) + tuple(csa if i % 2 else hca for i in range(max(n - 2, 0)))
        self.compress_ratios = ratios
        if csa <= 0 or hca <= 0 or csa == hca:
            raise ConfigError(
                f"invalid V4Config: compress_rates must be two different positive rates, got "
                f"{self.compress_rates}"
            )
        if len(ratios) != n or set(ratios) - {0, csa, hca}:
            raise ConfigError(
                f"invalid V4Config: compress_ratios needs {n} entries of 0, {csa} or {hca}, "
                f"got {ratios}"
            )
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"invalid V4Config: {name} must be positive")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError("invalid V4Config: o_groups must divide heads x head_dim")

    @property
    def layer_counts(self) -> dict[int, int]:
        """How many layers of each compress ratio (0 window only, then CSA's, HCA's)."""
        rates = (0, self.compress_rates[CSA], self.compress_rates[HCA])
        return {r: self.compress_ratios.count(r) for r in rates}

    @property
    def layer_types(self) -> list[str]:
        """transformers' per-layer attention types."""
        by_rate = {0: "sliding_attention", **{r: t for t, r in self.compress_rates.items()}}
        return [by_rate[r] for r in self.compress_ratios]

    @property
    def has_indexer(self) -> bool:
        """Some layer is CSA, whose lightning indexer chooses the entries each query reads."""
        return CSA in self.layer_types

    @property
    def mlp_layer_types(self) -> list[str]:
        n, k = self.num_hidden_layers, min(self.num_hash_layers, self.num_hidden_layers)
        return ["hash_moe"] * k + ["moe"] * (n - k)

    def validate_buildable(self) -> None:
        """What V4Transformer needs beyond the accounting's checks."""
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"V4 scoring_func {self.scoring_func!r}: only sqrtsoftplus is built")
        if self.n_shared_experts != 1:
            raise ConfigError("V4 builds exactly one shared expert (n_shared_experts = 1)")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ConfigError("num_experts_per_tok must be between 1 and n_routed_experts")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise ConfigError("qk_rope_head_dim must be even and at most head_dim")
        if CSA in self.layer_types and self.qk_rope_head_dim > self.index_head_dim:
            raise ConfigError("index_head_dim must be >= qk_rope_head_dim (indexer keys are roped)")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> V4Config:
        """The released config.json (compress_ratios, num_hash_layers, rope_scaling) or
        transformers' (layer_types, compress_rates, mlp_layer_types, rope_parameters)."""
        if d.get("model_type") != "deepseek_v4":
            raise ConfigError(f"{source}: model_type {d.get('model_type')!r} is not deepseek_v4")
        derived = {"compress_ratios", "compress_rates", "rope_scaling", "qk_rope_head_dim"}
        names = {f.name for f in dataclasses.fields(cls)} - derived
        kw = {k: d[k] for k in names if d.get(k) is not None}
        rates = {**_v4_default_rates(), **(d.get("compress_rates") or {})}
        kw["compress_rates"] = rates
        if d.get("compress_ratios") is not None:  # the released checkpoints' per-layer list
            kw["compress_ratios"] = tuple(d["compress_ratios"])
        elif d.get("layer_types"):  # transformers' names
            kw["compress_ratios"] = tuple({**V4_LAYER_RATIOS, **rates}[t] for t in d["layer_types"])
        if d.get("mlp_layer_types"):
            types = list(d["mlp_layer_types"])
            k = types.count("hash_moe")
            if types != ["hash_moe"] * k + ["moe"] * (len(types) - k):
                raise ConfigError(f"{source}: hash_moe layers must come first, got {types}")
            kw["num_hash_layers"] = k
        if d.get("qk_rope_head_dim") is not None:
            kw["qk_rope_head_dim"] = int(d["qk_rope_head_dim"])
        elif d.get("partial_rotary_factor") is not None:
            kw["qk_rope_head_dim"] = int(kw.get("head_dim", 512) * d["partial_rotary_factor"])
        # rope: transformers 5 nests {"main": ..., "compress": ...}; the release has
        # rope_theta, compress_rope_theta and a (YaRN) rope_scaling for the compress rope
        rp = d.get("rope_parameters") or {}
        compress = rp.get("compress") if isinstance(rp.get("compress"), dict) else rp
        if isinstance(rp.get("main"), dict) and "rope_theta" in rp["main"]:
            kw["rope_theta"] = float(rp["main"]["rope_theta"])
        if "rope_theta" in compress and isinstance(rp.get("compress"), dict):
            kw["compress_rope_theta"] = float(compress["rope_theta"])
        scaling = d.get("rope_scaling") or compress
        if is_yarn(scaling):
            drop = ("rope_theta", "partial_rotary_factor", "attention_factor", "rope_type")
            kw["rope_scaling"] = {k: v for k, v in scaling.items() if k not in drop}
            kw["rope_scaling"]["type"] = "yarn"
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in transformers' names (DeepseekV4Config reads it as it is)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("compress_ratios", "num_hash_layers", "rope_scaling", "qk_rope_head_dim"):
            d.pop(name)
        prf = self.qk_rope_head_dim / self.head_dim
        compress: dict[str, Any] = {"rope_type": "default"}
        if is_yarn(self.rope_scaling):
            compress = {k: v for k, v in self.rope_scaling.items() if k != "type"}
            compress.update(rope_type="yarn", attention_factor=1.0)  # V4 does not scale cos/sin
        d.update(
            architectures=["DeepseekV4ForCausalLM"],
            layer_types=self.layer_types,
            mlp_layer_types=self.mlp_layer_types,
            partial_rotary_factor=prf,
            num_key_value_heads=1,
            hidden_act="silu",
            norm_topk_prob=True,
            rope_parameters={
                "main": {"rope_type": "default", "rope_theta": self.rope_theta},
                "compress": {**compress, "rope_theta": self.compress_rope_theta},
            },
        )
        for part in d["rope_parameters"].values():
            part["partial_rotary_factor"] = prf
        return d

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> V4Config:
        return dataclasses.replace(self, **changes)


def _v4_block_params(c: V4Config, ratio: int) -> tuple[int, int]:
    """(total, activated) parameters of one V4 block with the given compress ratio."""
    d, h, hd, ih, ihd = (
        c.hidden_size,
        c.num_attention_heads,
        c.head_dim,
        c.index_n_heads,
        c.index_head_dim,
    )
    attn = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * hd  # wq_a, q_norm, wq_b
    attn += d * hd + hd  # shared-KV projection and its norm
    attn += h * hd // c.o_groups * c.o_groups * c.o_lora_rank  # grouped wo_a
    attn += c.o_groups * c.o_lora_rank * d + h  # wo_b, attention sinks
    if ratio == c.compress_rates[HCA]:  # HCA compressor: kv and gate projections, bias, norm
        attn += 2 * d * hd + ratio * hd + hd
    elif (
        ratio == c.compress_rates[CSA]
    ):  # CSA: overlapping windows (2x wide), plus the lightning indexer
        attn += 2 * 2 * d * hd + ratio * 2 * hd + hd
        attn += 2 * 2 * d * ihd + ratio * 2 * ihd + ihd  # the indexer's own compressor
        attn += c.q_lora_rank * ih * ihd + d * ih  # indexer queries and head weights
    expert = 3 * d * c.moe_intermediate_size
    n = c.hc_mult
    hc = 2 * ((2 + n) * n * n * d + (2 + n) * n + 3)  # attention and FFN hyper-connections
    active = attn + hc + 2 * d + d * c.n_routed_experts  # + 2 norms + the router
    active += (c.n_shared_experts + c.num_experts_per_tok) * expert
    idle = (c.n_routed_experts - c.num_experts_per_tok) * expert
    return active + idle, active


def v4_param_counts(c: V4Config, include_mtp: bool = False) -> dict[str, int]:
    """param_counts for DeepSeek-V4, with the same conventions (embedding lookup not
    activated, head activated, MTP out unless asked). Checked against transformers'
    DeepseekV4ForCausalLM built on the meta device."""
    emb = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else emb
    hc_head = c.hc_mult * c.hc_mult * c.hidden_size + c.hc_mult + 1
    total = emb + head + c.hidden_size + hc_head
    active = c.vocab_size * c.hidden_size + c.hidden_size + hc_head
    for ratio in c.compress_ratios:
        t, a = _v4_block_params(c, ratio)
        total += t
        active += a
    # each MTP module: a sliding-window block, e/h projections (2 d x d), their norms
    t, a = _v4_block_params(c, 0)
    extra = 2 * c.hidden_size * c.hidden_size + 3 * c.hidden_size + hc_head
    mtp_t = c.num_nextn_predict_layers * (t + extra)
    mtp_a = c.num_nextn_predict_layers * (a + extra)
    if include_mtp:
        total += mtp_t
        active += mtp_a
    return {"total": total, "activated": active, "mtp": mtp_t, "embedding": emb + head}


def any_param_counts(c: ModelConfig | V4Config, include_mtp: bool = False) -> dict[str, int]:
    return (v4_param_counts if isinstance(c, V4Config) else param_counts)(c, include_mtp)


# --- presets -----------------------------------------------------------------------


def _tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        max_position_embeddings=256,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.0,
        num_nextn_predict_layers=1,
    )


def _tiny_v32() -> ModelConfig:
    # tiny with V3.2's lightning indexer: attention is sparse past index_topk tokens
    return _tiny().replace(
        model_type="deepseek_v32", index_n_heads=8, index_head_dim=16, index_topk=32
    )


def _small() -> ModelConfig:
    # 44.5M total / 9.4M activated: a 5-minute CPU run learns visible Python structure.
    # Every layer MoE, routing over all 32 experts: at 800K tokens this ended 0.09-0.11 below
    # `dense-small`'s validation loss with a cosine LR schedule (0.06 with wsd, which lowers
    # both; benchmarks/moe_vs_dense.py, two seeds), where DeepSeek-V3's layout -- a dense
    # first layer, the top 4 from 2 of 4 groups (groups bound a token's nodes: nothing to
    # save on one device) -- ended level. routed_scaling_factor 4 or 64 experts gained
    # 0.01-0.05 (within a run's noise), 8 lost 0.03: 2.5 stays.
    return ModelConfig(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=6,
        max_position_embeddings=1024,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=64,
        first_k_dense_replace=0,
        intermediate_size=1024,  # unused: no dense layer (the MTP module's block is MoE too)
        moe_intermediate_size=256,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=1,
    )


def _small_v32() -> ModelConfig:
    # `small` with V3.2's lightning indexer (sparse past 256 tokens): compressed queries
    # (the indexer reads them) narrowed to 96 so the activated count stays ~`small`'s (9.4M)
    return _small().replace(
        model_type="deepseek_v32",
        q_lora_rank=96,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=256,
    )


def _small_v4() -> V4Config:
    # DeepSeek-V4 at `small`'s scale and activated parameters (~9.25M; benchmarks/family.py):
    # V4-Flash's layout shrunk -- a window-only layer, then CSA / HCA alternating (rates 4
    # and 128, a 128-token window), 4 residual streams, the first layer hash-routed, every
    # layer MoE (32 experts, top 4 + 1 shared); index_topk 64 entries = 256 tokens, as
    # small-v32's 256; head_dim 128 (vs small's 128 + 32 latent), rope on 1/8 of it as V4
    return V4Config(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        head_dim=128,
        qk_rope_head_dim=16,
        q_lora_rank=96,
        o_groups=2,
        o_lora_rank=48,
        sliding_window=128,
        compress_ratios=(0, 4, 128, 4, 128, 4),
        index_n_heads=4,
        index_head_dim=32,
        index_topk=64,
        hc_mult=4,
        moe_intermediate_size=224,
        n_routed_experts=32,
        num_experts_per_tok=4,
        num_hash_layers=1,
        num_nextn_predict_layers=0,  # V4Transformer has no MTP module yet
        max_position_embeddings=1024,
    )


def _dense_small() -> ModelConfig:
    return dense_twin(_small())


def dense_twin(s: ModelConfig) -> ModelConfig:
    """A MoE config's dense twin: every layer dense, its MLP as wide as the shared + top-k
    experts a token (`small`: 5 x 256 = 1280), so both activate the same parameters."""
    width = (s.n_shared_experts + s.num_experts_per_tok) * s.moe_intermediate_size
    return s.replace(
        first_k_dense_replace=s.num_hidden_layers,
        intermediate_size=width,
        n_routed_experts=0,
        n_shared_experts=0,
        n_group=1,
        topk_group=1,
    )


def _deepseek_v3() -> ModelConfig:
    return ModelConfig(
        max_position_embeddings=163840,
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )


def _deepseek_v32() -> ModelConfig:
    # deepseek-ai/DeepSeek-V3.2(-Exp) config.json: V3's shape plus the lightning indexer
    # (index_n_heads 64, index_head_dim 128, index_topk 2048, transformers' defaults too)
    return _deepseek_v3().replace(
        model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048
    )


def _tiny_v4() -> V4Config:
    # a trainable DeepSeek-V4: window-only, CSA and HCA layers (HCA every 16 tokens, so a
    # 256-token context has entries), the first layer hash-routed, 2 residual streams
    return V4Config(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=32,
        qk_rope_head_dim=8,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=32,
        sliding_window=16,
        compress_ratios=(0, 4, 16, 4),
        compress_rates={CSA: 4, HCA: 16},
        index_n_heads=4,
        index_head_dim=16,
        index_topk=8,
        hc_mult=2,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        num_hash_layers=1,
        num_nextn_predict_layers=0,  # V4Transformer has no MTP module yet
        max_position_embeddings=256,
    )


def _deepseek_v4_flash() -> V4Config:
    # deepseek-ai/DeepSeek-V4-Flash config.json (= transformers' DeepseekV4Config defaults):
    # 2 window-only layers, then CSA / HCA alternating; the 44th ratio (0) is the MTP block's
    return V4Config(compress_ratios=(0, 0) + (4, 128) * 20 + (4,))


def _deepseek_v4_pro() -> V4Config:
    # deepseek-ai/DeepSeek-V4-Pro config.json: 2 HCA layers, then CSA / HCA alternating
    return V4Config(
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        o_lora_rank=1024,
        index_topk=1024,
        moe_intermediate_size=3072,
        n_routed_experts=384,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4,),
    )


def _deepseek_v2_lite() -> ModelConfig:
    return ModelConfig(
        vocab_size=102400,
        hidden_size=2048,
        num_hidden_layers=27,
        max_position_embeddings=163840,
        num_attention_heads=16,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        first_k_dense_replace=1,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        scoring_func="softmax",
        topk_method="greedy",
        num_nextn_predict_layers=0,
        bos_token_id=100000,
        eos_token_id=100001,
        model_type="deepseek_v2",
        rope_scaling={
            "type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
    )


PRESETS = {
    "tiny": _tiny,
    "tiny-v32": _tiny_v32,
    "tiny-v4": _tiny_v4,  # V4Configs (tiny-v4, small-v4): built as V4Transformer
    "small": _small,
    "small-v32": _small_v32,
    "small-v4": _small_v4,
    "dense-small": _dense_small,
    "deepseek-v3": _deepseek_v3,
    "deepseek-v32": _deepseek_v32,
    "deepseek-v2-lite": _deepseek_v2_lite,
}

# Presets nanoseek counts but does not build (hundreds of billions of parameters):
# `nanoseek compute context` and `info` read them.
ACCOUNTING_PRESETS = {
    "deepseek-v4-flash": _deepseek_v4_flash,
    "deepseek-v4-pro": _deepseek_v4_pro,
}


def get_preset(name: str) -> ModelConfig | V4Config:
    """A preset nanoseek can build: a ModelConfig (V2 / V3 / V3.2) or, for tiny-v4 and
    small-v4, a V4Config."""
    if name in ACCOUNTING_PRESETS:
        raise ConfigError(
            f"preset {name!r} is for accounting only (too large to build here; tiny-v4 "
            "is the buildable DeepSeek-V4); use it with `nanoseek compute context`"
        )
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def get_any_preset(name: str) -> ModelConfig | V4Config:
    """A preset nanoseek can build (ModelConfig) or only count (V4Config)."""
    if name in ACCOUNTING_PRESETS:
        return ACCOUNTING_PRESETS[name]()
    if name not in PRESETS:
        names = ", ".join([*PRESETS, *ACCOUNTING_PRESETS])
        raise ConfigError(f"unknown preset {name!r}; choose one of: {names}")
    return PRESETS[name]()


__all__ = [
    "ConfigError",
    "ModelConfig",
    "PRESETS",
    "ACCOUNTING_PRESETS",
    "V4Config",
    "get_preset",
    "get_any_preset",
    "v4_param_counts",
    "param_counts",
    "kv_cache_bytes_per_token",
]
