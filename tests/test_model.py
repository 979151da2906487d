"""The model against Hugging Face transformers' DeepSeek-V3, logit for logit, both ways."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.config import ModelConfig, get_preset
from nanoseek.hub import CheckpointError, dequantize_fp8, hf_state_dict, quantize_fp8

transformers = pytest.importorskip("transformers")  # a dev dependency: `make test` installs it


def hf_config(seed: int):
    """A random tiny DeepSeek-V3 config covering the switches that change the math."""
    rnd = random.Random(seed)
    n_group = rnd.choice([1, 2, 4])
    experts = 8
    yarn = seed % 2 == 0
    rope = {"rope_type": "default", "rope_theta": rnd.choice([10000.0, 50000.0])}
    if yarn:
        rope = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": rnd.choice([2.0, 4.0, 40.0]),
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": rnd.choice([1.0, 0.707]),
        }
    return transformers.DeepseekV3Config(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=16,
        num_hidden_layers=rnd.choice([2, 3]),
        num_attention_heads=rnd.choice([2, 4]),
        n_shared_experts=rnd.choice([1, 2]),
        n_routed_experts=experts,
        kv_lora_rank=rnd.choice([16, 24]),
        q_lora_rank=rnd.choice([None, 32]),
        qk_rope_head_dim=rnd.choice([4, 8]),
        v_head_dim=rnd.choice([8, 12]),
        qk_nope_head_dim=rnd.choice([8, 16]),
        n_group=n_group,
        topk_group=rnd.randint(1, n_group),
        num_experts_per_tok=rnd.choice([1, 2, 3]) if n_group < 4 else 2,
        first_k_dense_replace=rnd.choice([0, 1, 2]),
        routed_scaling_factor=rnd.choice([1.0, 2.5]),
        norm_topk_prob=rnd.choice([True, False]),
        rope_parameters=rope,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def randomize_biases(model) -> None:
    # a zero selection bias would hide a bias that is read wrongly
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            m.e_score_correction_bias.normal_(0, 0.05)


@pytest.mark.parametrize("seed", range(6))
def test_parity_both_ways(seed, tmp_path):
    torch.manual_seed(seed)
    cfg = hf_config(seed)
    ref = transformers.DeepseekV3ForCausalLM(cfg).eval()
    randomize_biases(ref)
    ref.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (3, 40))

    ours = nanoseek.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
    assert got.shape == (3, 40, cfg.vocab_size)
    assert (got - want).abs().max().item() <= 1e-4

    nanoseek.save_pretrained(ours, tmp_path / "ns")
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ns").eval()
    with torch.no_grad():
        again = back(ids).logits
    assert (again - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_parity_both_ways(method, tmp_path):
    torch.manual_seed(7)
    cfg = transformers.DeepseekV2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_shared_experts=2,
        n_routed_experts=8,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        v_head_dim=12,
        qk_nope_head_dim=8,
        n_group=4,
        topk_group=2,
        topk_method=method,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "rope_theta": 10000.0,
        },
    )
    ref = transformers.DeepseekV2ForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "hf")
    ours = nanoseek.from_pretrained(tmp_path / "hf")
    assert ours.config.scoring_func == "softmax"
    ids = torch.randint(0, 64, (2, 40))
    with torch.no_grad():
        got = ours(ids).logits
        assert (got - ref(ids).logits).abs().max().item() <= 1e-4
    nanoseek.save_pretrained(ours, tmp_path / "ns")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ns").eval()
    assert type(back).__name__ == "DeepseekV2ForCausalLM"
    with torch.no_grad():
        assert (back(ids).logits - got).abs().max().item() <= 1e-4


def test_nanoseek_model_with_mtp_roundtrips_and_opens_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = nanoseek.Transformer(get_preset("tiny")).eval()
    for moe in model.moe_layers():
        moe.gate.bias.normal_(0, 0.05)
    nanoseek.save_pretrained(model, tmp_path / "ckpt")
    names = load_file(tmp_path / "ckpt" / "model.safetensors").keys()
    L = model.config.num_hidden_layers
    assert f"model.layers.{L}.eh_proj.weight" in names  # MTP as an extra layer, official layout
    assert f"model.layers.{L}.shared_head.head.weight" in names

    loaded = nanoseek.from_pretrained(tmp_path / "ckpt")
    assert len(loaded.mtp) == 1
    for (n1, p1), (n2, p2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1

    ids = torch.randint(0, 256, (2, 24))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-4


def test_fp8_checkpoint_loads_dequantised(tmp_path):
    torch.manual_seed(1)
    model = nanoseek.Transformer(get_preset("tiny")).eval()
    tensors = hf_state_dict(model)
    fp8 = {}
    for name, t in tensors.items():
        is_linear = (
            t.dim() == 2 and "embed" not in name and "mlp.gate." not in name and "head" not in name
        )
        if is_linear:
            q, s = quantize_fp8(t)
            fp8[name], fp8[name.replace(".weight", ".weight_scale_inv")] = q, s
        else:
            fp8[name] = t
    (tmp_path / "fp8").mkdir()
    save_file(fp8, str(tmp_path / "fp8" / "model.safetensors"))
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(model.config.to_hf_dict()))

    # the reference: the same model with each weight replaced by its dequantised value
    ref_dir = tmp_path / "ref"
    (ref_dir).mkdir()
    deq = {
        n: dequantize_fp8(fp8[n], fp8[n.replace(".weight", ".weight_scale_inv")])
        if fp8[n].dtype == torch.float8_e4m3fn
        else t
        for n, t in tensors.items()
    }
    save_file(deq, str(ref_dir / "model.safetensors"))
    (ref_dir / "config.json").write_text(json.dumps(model.config.to_hf_dict()))

    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        got = nanoseek.from_pretrained(tmp_path / "fp8")(ids).logits
        want = nanoseek.from_pretrained(ref_dir)(ids).logits
        orig = model(ids).logits
    assert torch.equal(got, want)
    assert 0 < (got - orig).abs().max().item() < 0.05  # quantisation changed something, not much


def test_dequantize_fp8_blocks_match_a_plain_loop():
    torch.manual_seed(2)
    w = torch.randn(300, 260)
    q, s = quantize_fp8(w)
    assert s.shape == (3, 3)
    deq = dequantize_fp8(q, s)
    for bi in range(3):
        for bj in range(3):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            assert torch.equal(deq[blk], q[blk].float() * s[bi, bj])
    assert (deq - w).abs().max() < 0.07 * w.abs().max()


def test_sharded_checkpoint_loads(tmp_path):
    torch.manual_seed(3)
    model = nanoseek.Transformer(get_preset("tiny")).eval()
    tensors = hf_state_dict(model)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for f, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / f))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(nanoseek.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


# --- clear errors ------------------------------------------------------------------------


@pytest.fixture
def saved_tiny(tmp_path):
    model = nanoseek.Transformer(get_preset("tiny"))
    return nanoseek.save_pretrained(model, tmp_path / "ckpt")


def test_error_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        nanoseek.from_pretrained(tmp_path / "empty")


def test_error_unknown_model_type(saved_tiny):
    cfg = json.loads((saved_tiny / "config.json").read_text())
    cfg["model_type"] = "llama"
    (saved_tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'llama' is not a DeepSeek model"):
        nanoseek.from_pretrained(saved_tiny)


def test_error_missing_tensor(saved_tiny):
    f = saved_tiny / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.self_attn.kv_b_proj.weight"]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="kv_b_proj.weight is missing"):
        nanoseek.from_pretrained(saved_tiny)


def test_error_misshaped_tensor(saved_tiny):
    f = saved_tiny / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"o_proj.weight has shape \(3, 3\)"):
        nanoseek.from_pretrained(saved_tiny)


def test_error_truncated_file(saved_tiny):
    f = saved_tiny / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        nanoseek.from_pretrained(saved_tiny)


def test_error_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        nanoseek.from_pretrained(tmp_path / "nope")


def test_config_roundtrip_through_hf_json():
    for name in ("tiny", "small", "dense-small", "deepseek-v3", "deepseek-v2-lite"):
        cfg = get_preset(name)
        again = ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
        assert again == cfg, name


def test_loads_in_bfloat16_with_fp32_routing_bias(saved_tiny):
    ids = torch.randint(0, 256, (2, 16))
    ref = nanoseek.from_pretrained(saved_tiny)
    bf = nanoseek.from_pretrained(saved_tiny, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert all(m.gate.bias.dtype == torch.float32 for m in bf.moe_layers())
    with torch.no_grad():
        diff = (bf(ids).logits.float() - ref(ids).logits).abs().max().item()
    assert 0 < diff < 0.05
