"""DeepSeek-V4's cached decoding (infer/cache_v4.py, infer/runner_v4.py) against the full
forward: logits at every prefill and decode position, greedy engine tokens against
generate_v4 (which recomputes the sequence per token), the cache's bytes, and the V4
checkpoint through Engine.load, the CLI and the OpenAI server.

Two small random configs: window-only, CSA and HCA layers (HCA first in one), hash and
learned routing, hc_mult 4 and 2, tied embeddings; prompts past the window and contexts
with more compressed entries than index_topk, so the indexer chooses."""

from __future__ import annotations

import pytest
import torch
from v4_configs import small

from nanoseek.compute import kv_cache_bytes
from nanoseek.config import CSA, HCA, V4Config, get_preset
from nanoseek.hub import save_pretrained
from nanoseek.infer import Engine, EngineError, KVCache, SamplingParams, V4Cache, V4Runner
from nanoseek.model.v4 import V4Transformer, generate_v4

CONFIGS = {
    # window / CSA / HCA / CSA, 2 hash layers, 4 streams, YaRN on the compress rope
    "mixed-hc4": small(index_topk=3),
    # HCA first, learned routing everywhere, 2 streams, tied embeddings, another window
    "hca-first-hc2": small(
        rope_scaling=None,
        compress_ratios=(8, 0, 4, 8),
        hc_mult=2,
        num_hash_layers=0,
        sliding_window=6,
        index_topk=2,
        tie_word_embeddings=True,
    ),
}


def random_model(cfg: V4Config, seed: int = 0) -> V4Transformer:
    """Every float tensor random (sinks, position biases, routing biases too)."""
    torch.manual_seed(seed)
    model = V4Transformer(cfg).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.15)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    return cfg, random_model(cfg)


def test_cached_logits_equal_the_full_forward(case):
    """A ragged prefill (prompts of 13, 2 and 21 tokens: past the window, inside one
    compressor window, past index_topk entries), then 36 decode steps with every row at
    its own position: logits within 1e-4 of the full forward's at every position."""
    cfg, model = case
    B, steps = 3, 36
    ids = torch.randint(0, cfg.vocab_size, (B, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
    lens = torch.tensor([13, 2, 21])
    assert (lens + steps).max() // 4 > cfg.index_topk  # the indexer has entries to leave out
    cache = V4Cache(cfg, 5, 64, torch.float32, "cpu")
    runner = V4Runner(model, cache, track_expert_load=True)
    cache.allocate(1)  # the batch starts at slot 1
    start = cache.allocate(B)
    T = int(lens.max())
    h = runner.forward(ids[:, :T], torch.arange(T).expand(B, T), start, lens=lens)
    logits = runner.logits(h)
    for b in range(B):
        torch.testing.assert_close(logits[b, : lens[b]], full[b, : lens[b]], rtol=0, atol=1e-4)
    pos, rows = lens.clone(), torch.arange(B)
    for _ in range(steps):
        got = runner.logits(runner.forward(ids[rows, pos][:, None], pos[:, None], start))
        torch.testing.assert_close(got[:, 0], full[rows, pos], rtol=0, atol=1e-4)
        pos += 1
    counts = runner.expert_counts  # learned-routing layers: every token (pads too) routed k times
    assert counts.shape == (len(model.moe_layers()), cfg.n_routed_experts)
    assert (counts.sum(1) == (B * T + B * steps) * cfg.num_experts_per_tok).all()


def test_engine_greedy_equals_recompute(case):
    """Greedy Engine.generate against generate_v4, token for token: five prompts (1 to 30
    tokens) through 3 slots, so sequences finish early (the last slot moves into the hole)
    while others decode, and later prompts take slots earlier sequences left stale. Then
    a one-token prompt alone (its prefill is a decode step) in a used slot."""
    cfg, model = case
    gen = torch.Generator().manual_seed(2)
    lengths = (13, 1, 21, 6, 30)
    prompts = [torch.randint(0, cfg.vocab_size, (k,), generator=gen).tolist() for k in lengths]
    budgets = [18, 4, 12, 9, 6]
    eng = Engine(model, max_batch=3, max_len=64)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in budgets]
    outs = eng.generate(prompts, params)
    for p, n, out in zip(prompts, budgets, outs, strict=True):
        want = generate_v4(model, torch.tensor([p]), n)[0, len(p) :].tolist()
        assert out.token_ids == want and out.finish_reason == "length"
    assert eng.cache.used == 0
    out = eng.generate([[5]], params[:1])[0]
    assert out.token_ids == generate_v4(model, torch.tensor([[5]]), 18)[0, 1:].tolist()


def test_engine_refuses_what_v4_does_not_have():
    model = random_model(CONFIGS["mixed-hc4"])
    for kw, reason in (
        ({"speculative": True}, "MTP"),
        ({"prefix_cache": True}, "prefix cache"),
        ({"plain": True}, "one cached path"),
        ({"lookup_drafts": 1}, "lookup drafts"),
    ):
        with pytest.raises(EngineError, match=reason):
            Engine(model, **kw)


def expected_bytes(cfg: V4Config, slots: int, max_len: int, elt: int) -> int:
    """What a slot holds, from the config: the window ring and its positions; per CSA /
    HCA layer the entries (one spare) and the window being filled (CSA: 2 x head_dim wide,
    and the previous window's Ca half); per CSA layer the indexer's keys and state alike."""
    W, hd, ihd = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim
    per_slot = cfg.num_hidden_layers * W * hd * elt + W * 8
    for kind, rate in zip(cfg.layer_types, cfg.compress_ratios, strict=True):
        if kind == CSA:
            for d in (hd, ihd):
                per_slot += ((max_len // rate + 1) * d + 2 * rate * 2 * d + 2 * rate * d) * elt
        elif kind == HCA:
            per_slot += ((max_len // rate + 1) * hd + 2 * rate * hd) * elt
    return slots * per_slot // (slots * max_len)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bytes_per_token_is_what_the_config_implies(name):
    cfg = CONFIGS[name]
    cache = V4Cache(cfg, 3, 64, torch.float32, "cpu")
    assert cache.bytes_per_token() == expected_bytes(cfg, 3, 64, 4)
    # small-v4 in bf16: the accounting's window + entries + indexer keys, plus the pending
    # windows (a constant per slot), and far below V3's latent rows at long contexts
    v4, v3 = get_preset("small-v4"), get_preset("small")
    for ctx in (2048, 8192):
        ours = V4Cache(v4, 1, ctx, torch.bfloat16, "meta").bytes_per_token()
        assert ours == expected_bytes(v4, 1, ctx, 2)
        accounted = kv_cache_bytes(v4, ctx, "bf16")["per_token"]
        assert accounted <= ours < accounted + 160_000 / ctx
        assert ours < KVCache(v3, 1, ctx, torch.bfloat16, "meta").bytes_per_token() / 4


# --- a checkpoint: Engine.load, the CLI, the server ---------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from nanoseek.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["the cat sat on the mat", "a dog ran in the park"] * 20, 300)
    cfg = get_preset("tiny-v4").replace(vocab_size=tok.vocab_size)
    model = random_model(cfg)
    path = tmp_path_factory.mktemp("v4") / "ckpt"
    save_pretrained(model, path)
    tok.save(path)
    return path, model, tok


GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def test_engine_loads_a_v4_checkpoint(checkpoint):
    path, model, tok = checkpoint
    eng = Engine.load(path, max_len=128)
    assert isinstance(eng.cache, V4Cache) and eng.tokenizer is not None
    out = eng.generate(["the cat"], GREEDY)[0]
    prompt = torch.tensor([[tok.bos_id, *tok.encode("the cat")]])
    want = generate_v4(model, prompt, 8)[0, prompt.shape[1] :].tolist()
    assert out.token_ids == want and out.text == tok.decode(want)


def test_cli_generate_sample_and_chat_run_v4(checkpoint, cli, monkeypatch):
    path, _, _ = checkpoint
    want = Engine.load(path, max_len=128).generate(["the cat"], GREEDY)[0].text
    r = cli("generate", path, "the cat", "--max-tokens", 8, "--temperature", 0, "--max-len", 128)
    assert r.code == 0, r.err
    assert r.out == want + "\n"
    r = cli("sample", path, "the cat", "-n", 2, "--max-tokens", 4, "--seed", 1)
    assert r.code == 0 and r.out.count("--- sample") == 2, r.err
    lines = iter(["hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    r = cli("chat", path, "--max-tokens", 4)
    assert r.code == 0 and "bot> " in r.out, r.err
    r = cli("generate", path, "the cat", "--speculative")
    assert r.code != 0 and "MTP" in r.err


def test_openai_server_answers_for_a_v4_checkpoint(checkpoint):
    pytest.importorskip("openai")
    import openai
    from test_serve import metric, serving

    from nanoseek.serve import ServerSettings, create_app

    path, _, _ = checkpoint
    eng = Engine.load(path, max_len=128, track_expert_load=True)
    with serving(create_app(eng, ServerSettings(model_name="v4"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="v4",
            messages=[{"role": "user", "content": "the cat"}],
            max_tokens=5,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
        assert metric(url, "kv_cache_bytes") == eng.cache.nbytes()


def test_cli_serve_builds_a_v4_engine_without_prefix_cache(checkpoint, cli, monkeypatch):
    """`nanoseek serve` on a V4 checkpoint: the prefix cache is on by default only where
    the engine has one, so V4 starts without it (asking for it is refused)."""
    import socket

    pytest.importorskip("fastapi")
    served = []
    monkeypatch.setattr("nanoseek.serve.serve", lambda engine, *a, **kw: served.append(engine))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = checkpoint[0]
    r = cli("serve", path, "--port", port, "--device", "cpu", "--max-len", 64)
    assert r.code == 0, r.err
    assert isinstance(served[0].cache, V4Cache) and served[0].prefix is None
    r = cli("serve", path, "--port", port, "--device", "cpu", "--prefix-cache")
    assert r.code != 0 and "prefix cache" in r.err
