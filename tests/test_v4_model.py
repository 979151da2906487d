"""The DeepSeek-V4 model (nanoseek.model.v4) against transformers' DeepseekV4ForCausalLM:
logits and loss on small random configs that cover every layer type, hash and learned
routing, hc_mult 2 and 4; config.json both ways."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from v4_configs import small

from nanoseek.config import CSA, HCA, V4Config, get_preset, v4_param_counts
from nanoseek.hub import from_pretrained, save_pretrained
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model.v4 import V4Transformer, generate_v4

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.deepseek_v4")

TOL = dict(rtol=1e-4, atol=1e-4)

CONFIGS = {
    # window / CSA / HCA / CSA, 2 hash layers, YaRN on the compress rope, 4 streams
    "mixed-hc4": small(),
    # HCA first, 2 streams, other widths and groups, plain rope, a low clamp
    "hca-first-hc2": small(
        num_hidden_layers=3,
        compress_ratios=(8, 4, 0),
        hc_mult=2,
        num_hash_layers=1,
        q_lora_rank=16,
        o_groups=4,
        o_lora_rank=8,
        sliding_window=6,
        index_topk=3,
        swiglu_limit=1.5,
        rope_scaling=None,
    ),
    # learned routing everywhere, tied embeddings, wider compress rates
    "learned-tied": small(
        num_hidden_layers=5,
        compress_ratios=(4, 16, 0, 4, 16),
        compress_rates={CSA: 4, HCA: 16},
        num_hash_layers=0,
        tie_word_embeddings=True,
        num_experts_per_tok=2,
        index_topk=5,
    ),
}


def reference(cfg: V4Config, seed: int = 0):
    """transformers' model for our config, every float tensor random (none left at its
    zero / one init), hash tables random."""
    hf_cfg = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, t in ref.state_dict().items():
            if t.is_floating_point():
                t.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.15)
            elif name.endswith("tid2eid"):
                rows = [torch.randperm(cfg.n_routed_experts)[: t.shape[1]] for _ in range(len(t))]
                t.copy_(torch.stack(rows))
    return ref


def pair(name: str):
    cfg = CONFIGS[name]
    ref = reference(cfg)
    ours = V4Transformer(cfg).eval()
    ours.load_state_dict(ref.state_dict())  # the checkpoint's names, one for one (strict)
    return cfg, ours, ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_transformers(name):
    cfg = CONFIGS[name]
    hf_cfg = transformers.DeepseekV4Config(**cfg.to_hf_dict())
    assert hf_cfg.layer_types == cfg.layer_types
    assert hf_cfg.mlp_layer_types == cfg.mlp_layer_types
    assert hf_cfg.qk_rope_head_dim == cfg.qk_rope_head_dim
    assert V4Config.from_hf_dict(hf_cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg, ours, ref = pair(name)
    S = 40  # past the window (8 or 6), and more CSA entries (10) than index_topk
    ids = torch.randint(0, cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
    assert want.std() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", ["mixed-hc4", "hca-first-hc2"])
def test_loss_matches_transformers(name):
    """transformers shifts `labels` inside the loss; our `targets` are the next tokens."""
    cfg, ours, ref = pair(name)
    ids = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored positions count in neither
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    with torch.no_grad():
        want = ref(ids, labels=labels).loss
        got = ours(ids, targets=targets).loss
    torch.testing.assert_close(got, want, **TOL)


def test_tiny_v4_preset_builds_and_mixes_layer_types():
    cfg = get_preset("tiny-v4")
    assert isinstance(cfg, V4Config)
    assert set(cfg.layer_types) == {"sliding_attention", CSA, HCA}
    assert cfg.mlp_layer_types[0] == "hash_moe" and cfg.mlp_layer_types[-1] == "moe"
    model = V4Transformer(cfg)
    assert model.num_params() == v4_param_counts(cfg)["total"]  # the accounting agrees
    # the hash table sends each token to k distinct experts, not all to expert 0
    table = model.model.layers[0].mlp.gate.tid2eid
    assert (table.sort(-1).values.diff(dim=-1) > 0).all() and table.unique().numel() > 1
    torch.testing.assert_close(model.model.layers[1].self_attn.sinks, torch.zeros(4))
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    out = model(ids, targets=ids)
    assert out.logits.shape == (2, 40, cfg.vocab_size)
    # near-uniform predictions at init: loss ~ log(vocab)
    assert abs(out.loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


# --- checkpoints both ways ---------------------------------------------------------------


def _ids(cfg: V4Config, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["mixed-hc4", "learned-tied"])
def test_saved_by_us_loads_in_transformers(name, tmp_path):
    cfg, ours, _ = pair(name)
    save_pretrained(ours, tmp_path / "ckpt")
    theirs = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert theirs.config.layer_types == cfg.layer_types
    ids = _ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **TOL)


def test_saved_by_transformers_loads_in_nanoseek(tmp_path):
    """transformers writes DeepSeek's released names under its own `model.` prefix
    (`model.layers.0.attn.wq_a.weight`, per-expert `ffn.experts.E.w1`, `head.weight`)."""
    cfg, _, ref = pair("hca-first-hc2")
    ref.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.attn.wq_a.weight" in f.keys()
    ours = from_pretrained(tmp_path / "hf")
    assert isinstance(ours, V4Transformer) and ours.config == cfg
    ids = _ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, **TOL)


def test_released_layout_loads_in_nanoseek(tmp_path):
    """DeepSeek's own names (no `model.` prefix: `embed.weight`, `hc_head_fn`, ...), with
    a released-style config.json (compress_ratios, num_hash_layers, rope_scaling) and an
    MTP layer that V4Transformer skips."""
    cfg, _, ref = pair("mixed-hc4")
    ref.save_pretrained(tmp_path / "hf")
    tops = {"embed_tokens.weight": "embed.weight"}
    tops |= {f"hc_head.hc_{p}": f"hc_head_{p}" for p in ("fn", "base", "scale")}
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        tensors = {}
        for k in f.keys():
            short = k.removeprefix("model.")
            tensors[tops.get(short, short)] = f.get_tensor(k)
    tensors["mtp.0.emb.weight"] = torch.zeros(3)  # skipped, as transformers does
    (tmp_path / "rel").mkdir()
    save_file(tensors, str(tmp_path / "rel" / "model.safetensors"))
    released = {k: v for k, v in cfg.to_hf_dict().items() if k != "rope_parameters"}
    for k in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor"):
        released.pop(k)
    released |= dict(
        compress_ratios=list(cfg.compress_ratios) + [0],  # + the MTP block's
        compress_rate_csa=4,
        num_hash_layers=cfg.num_hash_layers,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        rope_scaling=cfg.rope_scaling,
        compress_rates=cfg.compress_rates,
    )
    (tmp_path / "rel" / "config.json").write_text(json.dumps(released))
    ours = from_pretrained(tmp_path / "rel")
    assert ours.config == cfg
    ids = _ids(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, **TOL)


def test_missing_tensor_is_a_checkpoint_error(tmp_path):
    from nanoseek.hub import CheckpointError

    _, ours, _ = pair("hca-first-hc2")
    save_pretrained(ours, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.layers.1.self_attn.compressor.indexer.q_b_proj.weight")
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="missing"):
        from_pretrained(tmp_path / "ckpt")


# --- generation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixed-hc4", "hca-first-hc2"])
def test_greedy_generation_matches_transformers(name):
    """generate_v4 recomputes the whole sequence per token, our engine decodes over its V4
    cache, transformers' over its window + compressor cache. Same tokens, past the window
    and across compressor windows."""
    cfg, ours, ref = pair(name)
    prompt = torch.randint(0, cfg.vocab_size, (1, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.generate(
            prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    got = generate_v4(ours, prompt, max_new_tokens=10)
    assert want.shape == (1, 23)
    torch.testing.assert_close(got, want)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    cached = Engine(ours, max_len=64).generate([prompt[0].tolist()], greedy)[0].token_ids
    assert cached == want[0, 13:].tolist()


# --- training ------------------------------------------------------------------------------


def test_tiny_v4_learns_repeated_data():
    """A few AdamW steps on the same batch: the loss falls well below log(vocab), with
    gradients through every part (hyper-connections, compressors, indexer keys, routers)."""
    torch.manual_seed(0)
    cfg = get_preset("tiny-v4")
    model = V4Transformer(cfg)
    data = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(5))
    ids, targets = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(25):
        loss = model(ids, targets=targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(5.545, abs=0.1)  # log(256)
    assert losses[-1] < 0.5 * losses[0], losses
    # the indexer's scores only choose (top-k): its query / key weights get no gradient
    # (as in V4's training, where a separate KL loss trains the indexer); all else does
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()}
    assert all(".indexer." in n for n in no_grad), no_grad
