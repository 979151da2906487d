"""GGUF export: the file read back holds the checkpoint's tensors as llama.cpp's converter
would write them, every key llama.cpp's deepseek2 loader reads, and nanoseek's tokenizer.
(That llama.cpp itself decodes it greedy-identically is benchmarks/gguf_llamacpp.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek.config import get_preset
from nanoseek.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from nanoseek.export import ExportError, export_gguf
from nanoseek.infer import Engine

TEXTS = [
    "def add(x, y):\n    return x + y  # héllo → ü\n" * 30,
    "the cat sat on the mat. 123 " * 30,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


def make_checkpoint(path: Path, tok: Tokenizer, **changes) -> Path:
    cfg = get_preset("tiny").replace(vocab_size=tok.vocab_size, **changes)
    torch.manual_seed(0)
    model = nanoseek.Transformer(cfg)
    with torch.no_grad():  # norms off 1 and routing biases off 0, so a swapped tensor shows
        for t in model.state_dict().values():
            t.add_(torch.randn_like(t) * 0.1)
    nanoseek.save_pretrained(model, path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("export") / "ckpt", tok)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> dict[str, gguf.GGUFReader]:
    out = tmp_path_factory.mktemp("gguf")
    return {
        dt: gguf.GGUFReader(export_gguf(ckpt, out / f"m-{dt}.gguf", dt, verbose=False))
        for dt in ("f32", "f16", "q8_0")
    }


def converter_tensors(ckpt: Path) -> dict[str, np.ndarray]:
    """What llama.cpp's convert_hf_to_gguf.py (DeepseekV2Model) makes of the checkpoint's
    safetensors, by its own name map (gguf.TensorNameMap): experts stacked, kv_b split into
    k_b (transposed) and v_b; plus the MTP layer as NextN tensors (the embedding and head it
    repeats are the model's own, so llama.cpp reads those)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    hf = {k: t.float() for k, t in load_file(ckpt / "model.safetensors").items()}
    n_mtp = sum(f"model.layers.{L + k}.eh_proj.weight" in hf for k in range(4))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, L + n_mtp)
    nextn = {
        "eh_proj.weight": "nextn.eh_proj.weight",
        "enorm.weight": "nextn.enorm.weight",
        "hnorm.weight": "nextn.hnorm.weight",
        "shared_head.norm.weight": "nextn.shared_head_norm.weight",
    }

    def gguf_name(hf_name: str) -> str:
        return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    out: dict[str, torch.Tensor] = {}
    experts: dict[str, list[torch.Tensor]] = {}
    for name, t in hf.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        suffix = name.split(".", 3)[-1] if layer is not None else ""
        if layer is not None and layer >= L:
            if suffix in nextn:
                out[f"blk.{layer}.{nextn[suffix]}"] = t
                continue
            if suffix in ("embed_tokens.weight", "shared_head.head.weight"):
                continue
        if ".mlp.experts." in name:  # model.layers.i.mlp.experts.e.gate_proj.weight
            parts = name.split(".")
            key = ".".join(parts[:5] + parts[6:])
            experts.setdefault(key, []).append((int(parts[5]), t))
            continue
        if name.endswith("kv_b_proj.weight"):
            kv_b = t.view(H, nope + v, -1)
            out[gguf_name(name.replace("kv_b", "k_b"))] = kv_b[:, :nope].transpose(1, 2)
            out[gguf_name(name.replace("kv_b", "v_b"))] = kv_b[:, nope:]
            continue
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        assert gguf_name(name) is not None, f"{name}: a tensor llama.cpp's converter does not know"
        out[gguf_name(name)] = t
    for key, ts in experts.items():
        out[gguf_name(key)] = torch.stack([t for _, t in sorted(ts, key=lambda x: x[0])])
    return {k: t.contiguous().numpy() for k, t in out.items()}


def read_tensor(t) -> np.ndarray:
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))


def fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


# --- tensors ------------------------------------------------------------------------------


def test_f32_tensors_read_back_equal_the_checkpoints(ckpt, exported):
    want = converter_tensors(ckpt)
    got = {t.name: t for t in exported["f32"].tensors}
    assert set(got) == set(want)  # nothing missing, nothing extra
    for name, t in got.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(read_tensor(t), want[name], err_msg=name)


def test_f16_and_q8_0_read_back_within_their_rounding(ckpt, exported):
    want = converter_tensors(ckpt)
    T = gguf.GGMLQuantizationType
    for dtype in ("f16", "q8_0"):
        kinds = set()
        for t in exported[dtype].tensors:
            x, y = want[t.name], read_tensor(t)
            kinds.add(t.tensor_type)
            if x.ndim == 1 or ".ffn_gate_inp." in t.name:  # norms, biases, router: as is
                assert t.tensor_type == T.F32, t.name
                np.testing.assert_array_equal(y, x, err_msg=t.name)
            elif t.tensor_type == T.F16:  # f16, or q8_0's fallback for rows not of 32s
                assert dtype == "f16" or x.shape[-1] % 32, t.name
                np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
            else:  # q8_0: 32 values share a scale amax/127 (fp16); within 0.6 of a step
                assert t.tensor_type == T.Q8_0 and dtype == "q8_0", t.name
                xb, yb = x.reshape(-1, 32), y.reshape(-1, 32)
                step = np.abs(xb).max(axis=1, keepdims=True) / 127
                assert (np.abs(xb - yb) <= 0.6 * step + 1e-12).all(), t.name
        assert {T.F32, T.F16} <= kinds if dtype == "f16" else T.Q8_0 in kinds


# --- metadata -----------------------------------------------------------------------------


def test_metadata_has_every_key_llama_cpp_reads(exported):
    f = fields(exported["f32"])
    cfg = get_preset("tiny")
    # llama_model_deepseek2::load_arch_hparams and llama_model::load_hparams (llama.cpp
    # 0c1e57098): the keys it requires, and those it reads with defaults that would be wrong
    want = {
        "general.architecture": "deepseek2",
        "general.file_type": 0,
        "deepseek2.block_count": cfg.num_hidden_layers + 1,  # + the NextN (MTP) layer
        "deepseek2.nextn_predict_layers": 1,
        "deepseek2.context_length": cfg.max_position_embeddings,
        "deepseek2.embedding_length": cfg.hidden_size,
        "deepseek2.feed_forward_length": cfg.intermediate_size,
        "deepseek2.attention.head_count": cfg.num_attention_heads,
        "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.q_lora_rank": cfg.q_lora_rank,
        "deepseek2.attention.kv_lora_rank": cfg.kv_lora_rank,
        "deepseek2.attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "deepseek2.attention.value_length": cfg.kv_lora_rank,
        "deepseek2.attention.key_length_mla": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        "deepseek2.attention.value_length_mla": cfg.v_head_dim,
        "deepseek2.rope.dimension_count": cfg.qk_rope_head_dim,
        "deepseek2.rope.freq_base": cfg.rope_theta,
        "deepseek2.leading_dense_block_count": cfg.first_k_dense_replace,
        "deepseek2.expert_count": cfg.n_routed_experts,
        "deepseek2.expert_used_count": cfg.num_experts_per_tok,
        "deepseek2.expert_shared_count": cfg.n_shared_experts,
        "deepseek2.expert_feed_forward_length": cfg.moe_intermediate_size,
        "deepseek2.expert_weights_scale": cfg.routed_scaling_factor,
        "deepseek2.expert_weights_norm": True,
        "deepseek2.expert_gating_func": 2,  # sigmoid
        "deepseek2.expert_group_count": cfg.n_group,
        "deepseek2.expert_group_used_count": cfg.topk_group,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in want.items():
        assert key in f, key
        assert f[key] == pytest.approx(value), key
    assert pytest.approx(1e-6) == f["deepseek2.attention.layer_norm_rms_epsilon"]


def test_tokenizer_in_the_file_is_nanoseeks(exported, tok, ckpt):
    f = fields(exported["q8_0"])
    vocab = {i: t for t, i in tok._tok.get_vocab(with_added_tokens=True).items()}
    assert f["tokenizer.ggml.tokens"] == [vocab[i] for i in range(tok.vocab_size)]
    merges = json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    types = f["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == list(
        range(len(SPECIAL_TOKENS))
    )
    assert all(t == gguf.TokenType.NORMAL for t in types[len(SPECIAL_TOKENS) :])
    ids = ("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", tok.pad_id), ("eot", tok.end_id)
    for kind, i in ids:
        assert f[f"tokenizer.ggml.{kind}_token_id"] == i
    assert f["tokenizer.chat_template"].startswith("{{ bos_token }}")


def test_tokenizer_config_states_the_bos_nanoseek_adds(ckpt, tok):
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    model = nanoseek.from_pretrained(ckpt)
    ids = Engine(model, tok, max_len=64).encode("the cat")
    assert ids == [tok.bos_id, *tok.encode("the cat")]  # what add_bos_token says


# --- configurations -----------------------------------------------------------------------


def test_uncompressed_queries_export_and_mtp_is_dropped_where_llama_cpp_cannot_run_it(
    tmp_path, tok, capsys
):
    ckpt = make_checkpoint(tmp_path / "ckpt", tok, q_lora_rank=None)
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf"))
    assert "MTP module dropped" in capsys.readouterr().err
    f = fields(reader)
    assert f["deepseek2.attention.q_lora_rank"] == 0  # present: llama.cpp requires the key
    assert f["deepseek2.block_count"] == 3 and "deepseek2.nextn_predict_layers" not in f
    got = {t.name: read_tensor(t) for t in reader.tensors}
    assert "blk.0.attn_q.weight" in got and not any(".attn_q_a" in n for n in got)
    for name, x in converter_tensors(ckpt).items():
        if ".nextn." in name or name.startswith("blk.3."):
            assert name not in got
        else:
            np.testing.assert_array_equal(got[name], x, err_msg=name)


def test_dense_model_and_no_shared_expert_export(tmp_path, tok):
    dense = make_checkpoint(tmp_path / "dense", tok, n_routed_experts=0, first_k_dense_replace=3)
    f = fields(gguf.GGUFReader(export_gguf(dense, tmp_path / "d.gguf", verbose=False)))
    assert f["deepseek2.leading_dense_block_count"] == 3 and "deepseek2.expert_count" not in f
    # llama.cpp's MoE layers need a shared expert: none is written as one that adds zero
    ckpt = make_checkpoint(tmp_path / "noshared", tok, n_shared_experts=0)
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "s.gguf", verbose=False))
    assert fields(reader)["deepseek2.expert_shared_count"] == 1
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_shexp.weight")
    assert not read_tensor(down).any()


# --- the command --------------------------------------------------------------------------


def test_cli_exports(cli, ckpt, tmp_path):
    r = cli("export", ckpt, "--format", "gguf", "--out", tmp_path / "m.gguf", "--dtype", "q8_0")
    assert r.code == 0, r.err
    assert fields(gguf.GGUFReader(tmp_path / "m.gguf"))["general.file_type"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "not a checkpoint directory"),
        ("dtype", "unsupported dtype 'q4_0'; choose one of: f32, f16, q8_0"),
        ("no-tokenizer", "no tokenizer.json"),
    ],
)
def test_bad_input_is_one_clear_error(cli, ckpt, tmp_path, case, match):
    src = tmp_path / "nope" if case == "missing" else ckpt
    if case == "no-tokenizer":
        src = tmp_path / "bare"
        nanoseek.save_pretrained(nanoseek.from_pretrained(ckpt), src)
    dtype = "q4_0" if case == "dtype" else "f32"
    r = cli("export", src, "--format", "gguf", "--out", tmp_path / "m.gguf", "--dtype", dtype)
    assert r.code == 2 and match in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ValueError, match=match.split(";")[0]):
        export_gguf(src, tmp_path / "m.gguf", dtype)


def test_unknown_tokenizer_shape_is_refused(tmp_path, ckpt, tok):
    spec = json.loads((ckpt / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True  # llama.cpp's gpt-2 split adds none
    (tmp_path / "ckpt").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "ckpt" / name).write_bytes((ckpt / name).read_bytes())
    (tmp_path / "ckpt" / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="not a nanoseek byte-level BPE"):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")


def test_a_tensor_the_layout_has_no_place_for_is_an_error_not_a_loss(tmp_path, ckpt, monkeypatch):
    import nanoseek.export as export

    def with_extra(path, dtype):  # a model part deepseek2 cannot hold (say, a new module's)
        model = nanoseek.from_pretrained(path, dtype=dtype)
        model.layers[0].attn.register_buffer("novel", torch.zeros(3))
        return model

    monkeypatch.setattr(export, "from_pretrained", with_extra)
    with pytest.raises(ExportError, match=r"no place for 1 of the model's tensors \(layers.0.attn"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
