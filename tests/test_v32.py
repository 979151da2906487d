"""DeepSeek-V3.2 (sparse attention, the lightning indexer) against transformers'
DeepseekV32ForCausalLM, logit for logit both ways and token for token; the warm-up."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek.config import ConfigError, ModelConfig, get_preset, param_counts
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model.indexer import dense_attention, indexer_kl, indexer_parameters

transformers = pytest.importorskip("transformers")

# (num_hidden_layers, heads, q_lora_rank, index heads, index_head_dim, index_topk, yarn).
# Index heads >= 6: with 2-3 heads, 10-30% of a tiny random model's index scores are
# exactly 0 (ReLU in every head), and which of several tied keys top-k keeps is arbitrary:
# transformers' own cached generation then differs from its full recompute (5 of 30
# prompts with 2 heads), so token-for-token tests would test the tie-breaking.
CONFIGS = [
    (2, 4, 32, 8, 16, 8, False),
    (3, 2, 24, 8, 8, 12, True),  # index_head_dim == qk_rope_head_dim: all of it roped
    (2, 4, 16, 6, 24, 5, False),
]


def hf_v32_config(i: int):
    layers, heads, q_rank, ih, idim, topk, yarn = CONFIGS[i]
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 0.707,  # cos/sin scaled by an attention factor != 1
        }
    return transformers.DeepseekV32Config(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        n_shared_experts=1,
        n_routed_experts=8,
        kv_lora_rank=16,
        q_lora_rank=q_rank,
        qk_rope_head_dim=8,
        v_head_dim=12,
        qk_nope_head_dim=16,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        index_n_heads=ih,
        index_head_dim=idim,
        index_topk=topk,
        max_position_embeddings=128,
        rope_parameters=rope,
    )


def randomize(model) -> None:
    """Non-trivial selection bias and indexer LayerNorm (ones / zeros would hide a misread)."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.05)
            elif name.endswith("k_norm.weight"):
                p.normal_(1, 0.2)
            elif name.endswith("k_norm.bias"):
                p.normal_(0, 0.2)


@pytest.fixture(scope="module", params=range(len(CONFIGS)))
def pair(request, tmp_path_factory):
    """(transformers' model, ours loaded from its save_pretrained, the directory)."""
    torch.manual_seed(request.param)
    cfg = hf_v32_config(request.param)
    ref = transformers.DeepseekV32ForCausalLM(cfg).eval()
    randomize(ref)
    path = tmp_path_factory.mktemp("v32") / "hf"
    ref.save_pretrained(path)
    return ref, nanoseek.from_pretrained(path), path


@pytest.mark.parametrize("T", [40, 6])  # past index_topk (sparse) and within it (dense)
def test_parity_both_ways(pair, T, tmp_path):
    ref, ours, _ = pair
    cfg = ref.config
    assert ours.config.model_type == "deepseek_v32"
    assert (ours.config.index_n_heads, ours.config.index_head_dim, ours.config.index_topk) == (
        cfg.index_n_heads,
        cfg.index_head_dim,
        cfg.index_topk,
    )
    ids = torch.randint(0, cfg.vocab_size, (3, T))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
        with dense_attention(ours):
            dense = ours(ids).logits
    assert got.shape == (3, T, cfg.vocab_size)
    assert (got - want).abs().max().item() <= 1e-4
    sparse_matters = (dense - got).abs().max().item()
    if T > cfg.index_topk:  # the test would pass with the indexer ignored otherwise
        assert sparse_matters > 1e-3
    else:
        assert sparse_matters == 0.0

    nanoseek.save_pretrained(ours, tmp_path / "ns")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ns").eval()
    assert type(back).__name__ == "DeepseekV32ForCausalLM"
    with torch.no_grad():
        again = back(ids).logits
    assert (again - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prefix_cache,plain", [(False, False), (True, False), (False, True)])
def test_greedy_generation_equals_transformers(pair, prefix_cache, plain):
    ref, _, path = pair
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, ref.config.vocab_size, (20,), generator=gen).tolist()  # > topk
    n = 12  # decoding past index_topk too: the cached indexer keys matter
    want = ref.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )[0, len(prompt) :].tolist()
    # absorbed (default) or plain, the indexer keys cached beside the latent rows
    eng = Engine.load(path, max_len=64, prefix_cache=prefix_cache, plain=plain)
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    # batched with a shorter prompt (ragged prefill), then again (a prefix-cache hit)
    for _ in range(2):
        outs = eng.generate([prompt, prompt[:7]], greedy)
        assert outs[0].token_ids == want


@pytest.mark.parametrize("plain", [False, True])
def test_engine_paths_equal_full_recompute(plain):
    """Both cached paths (absorbed MLA with the indexer over its cached keys; plain) against
    re-running forward on the whole sequence at every step, batched and with MTP
    speculation (8 index heads: see CONFIGS on ties)."""
    torch.manual_seed(3)
    model = nanoseek.Transformer(get_preset("tiny-v32").replace(index_topk=6)).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4]]
    n = 10
    want = []
    for p in prompts:
        ids = list(p)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        want.append(ids[len(p) :])
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in Engine(model, plain=plain).generate(prompts, greedy)] == want
    spec = Engine(model, speculative=True, plain=plain).generate(prompts, greedy)
    assert [o.token_ids for o in spec] == want


def test_config_fields_roundtrip_and_presets(tmp_path):
    cfg = get_preset("tiny-v32")
    assert cfg.has_indexer and not get_preset("tiny").has_indexer
    cfg.save(tmp_path / "config.json")
    again = ModelConfig.load(tmp_path)
    assert again == cfg
    d = cfg.to_hf_dict()
    assert d["architectures"] == ["DeepseekV32ForCausalLM"] and d["index_topk"] == 32
    assert "index_topk" not in get_preset("tiny").to_hf_dict()  # V3 config.json unchanged
    theirs = transformers.DeepseekV32Config.from_dict(d)
    assert (theirs.index_n_heads, theirs.index_head_dim) == (8, 16)
    # the indexer's parameters are counted
    model = nanoseek.Transformer(cfg.replace(num_nextn_predict_layers=0))
    assert param_counts(cfg)["total"] == model.num_params()
    with pytest.raises(ConfigError, match="q_lora_rank"):
        cfg.replace(q_lora_rank=None)  # transformers' V3.2 has no uncompressed-query form
    with pytest.raises(ConfigError, match="index_head_dim"):
        cfg.replace(index_head_dim=4)


def test_indexer_warmup_lowers_kl_to_dense_attention():
    torch.manual_seed(0)
    # init std 0.2, not 0.02: attention far from uniform, so there is something to learn
    cfg = get_preset("tiny-v32").replace(initializer_range=0.2)
    model = nanoseek.Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (4, 48))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "indexer" not in n}
    opt = torch.optim.Adam(indexer_parameters(model), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = indexer_kl(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.3 and losses[-1] < 0.25 * losses[0], losses  # measured: 0.68 -> 0.105
    for n, p in model.named_parameters():  # only the indexers learned
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
            assert p.grad is None, n
    # the loss is a KL: zero when the indexer's distribution is the attention's
    assert losses[-1] > 0


def test_sparse_stage_indexer_loss():
    """sparse=True: the KL over each query's selected keys; equal to the dense one while
    every key is selected, and it lowers with steps on the indexers while the rest of the
    model gets no gradient."""
    torch.manual_seed(1)
    model = nanoseek.Transformer(
        get_preset("tiny-v32").replace(index_topk=12, initializer_range=0.2)
    )
    short = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.allclose(indexer_kl(model, short, sparse=True), indexer_kl(model, short))
    ids = torch.randint(0, 256, (2, 40))
    opt = torch.optim.Adam(indexer_parameters(model), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = indexer_kl(model, ids, sparse=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is None for n, p in model.named_parameters() if "indexer" not in n)


def test_v32_with_mtp_roundtrips_and_loads_in_bfloat16(tmp_path):
    """Our own checkpoint keeps every indexer (the MTP block's too) and opens in
    transformers; in bfloat16 the per-head index weights stay float32, as there."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(get_preset("tiny-v32")).eval()
    randomize(model)
    nanoseek.save_pretrained(model, tmp_path / "ckpt")
    L = model.config.num_hidden_layers
    names = load_file(tmp_path / "ckpt" / "model.safetensors").keys()
    assert f"model.layers.{L}.self_attn.indexer.k_norm.bias" in names  # the MTP layer's
    loaded = nanoseek.from_pretrained(tmp_path / "ckpt")
    for (n1, p1), (n2, p2) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = torch.randint(0, 256, (2, 48))  # past index_topk = 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        want = model(ids).logits
        assert (hf(ids).logits - want).abs().max().item() <= 1e-4
    half = nanoseek.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert half.layers[0].attn.indexer.weights_proj.weight.dtype == torch.float32
    assert half.layers[0].attn.wq_b.weight.dtype == torch.bfloat16
    with torch.no_grad():
        err = (half(ids).logits.float() - want).abs().max().item()
        assert err < 0.1


def test_nanoseek_train_warms_up_the_indexers_then_trains_sparse(tmp_path, monkeypatch):
    """`nanoseek train --preset tiny-v32 --indexer-warmup-steps N`: the warm-up lowers the
    indexers' KL to dense attention, then training runs (sparse past index_topk tokens)."""
    from nanoseek.data import prepare
    from nanoseek.train import make_config, train
    from nanoseek.train import pretrain as pretrain_mod

    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"m{i}.py").write_text(f"def f{i % 5}(x):\n    return x + {i % 3}\n\n" * 8)
    shards = prepare(str(src), tmp_path / "shards", vocab_size=300, verbose=False)
    kls = []
    real = pretrain_mod.warm_up_indexers

    def record(*a, **kw):
        kls.extend(real(*a, **kw))
        return kls

    monkeypatch.setattr(pretrain_mod, "warm_up_indexers", record)
    run = dict(preset="tiny-v32", data=str(shards), out=str(tmp_path / "r"), steps=3)
    run.update(batch_size=2, seq_len=64, eval_every=0, eval_batches=1, progress=False)
    s = train(make_config(**run, threads=1, lr=3e-3, indexer_warmup_steps=12))
    assert len(kls) == 12 and kls[-1] < kls[0]
    assert s["steps"] == 3 and math.isfinite(s["final_val_loss"])
    # sparse training: the indexers' KL over their selected keys joins the loss
    recs = [
        json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["indexer_kl"] > 0 for r in recs)


def test_the_cache_holds_the_indexer_keys_beside_the_latent_rows():
    from nanoseek.config import kv_cache_bytes_per_token
    from nanoseek.infer import Engine

    cfg = nanoseek.get_preset("tiny-v32")
    kv = kv_cache_bytes_per_token(cfg, bytes_per_value=4)
    assert kv["indexer"] == cfg.num_hidden_layers * cfg.index_head_dim * 4
    engine = Engine(nanoseek.Transformer(cfg), max_batch=2)
    assert engine.cache.bytes_per_token() == kv["latent"] + kv["indexer"]
    assert kv_cache_bytes_per_token(nanoseek.get_preset("tiny"))["indexer"] == 0
