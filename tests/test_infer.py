"""Inference engine: absorbed decode vs the plain path, batching, speculation, sampling, CLI."""

from __future__ import annotations

import pytest
import torch

import nanoseek
from nanoseek.config import kv_cache_bytes_per_token
from nanoseek.device import DeviceError
from nanoseek.infer import Engine, EngineError, KVCache, ModelRunner, SamplingError, SamplingParams
from nanoseek.infer.sampling import filtered_probs, sample
from nanoseek.model import moe

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def tiny_model(seed: int = 0, **changes) -> nanoseek.Transformer:
    torch.manual_seed(seed)
    model = nanoseek.Transformer(nanoseek.get_preset("tiny").replace(**changes)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():  # non-zero routing bias: selection != weighting
            moe.gate.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def model() -> nanoseek.Transformer:
    return tiny_model()


def test_dense_folded_moe_groups_a_large_batch(model):
    """Small experts fold to one dense matmul; past GROUPED_FROM_ROWS rows per expert the
    same folded layer runs the chosen experts in place instead. Both equal the training
    forward on the normed input (and count the same tokens)."""
    from nanoseek.model.moe import GROUPED_FROM_ROWS, MoE

    block = next(b for b in model.layers if isinstance(b.ffn, MoE))
    moe, norm = block.ffn, block.ffn_norm
    f = moe.fold(norm, "dense")
    assert f.dispatch == "dense"
    E, k = moe.n_experts, moe.gate.top_k
    for n in (GROUPED_FROM_ROWS * E // k - 1, 4 * GROUPED_FROM_ROWS * E // k):  # both sides
        x = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(n))
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        counts = torch.zeros(E, dtype=torch.long)
        with torch.no_grad():
            got = moe.decode(f, xn, counts)
            want = moe(norm(x))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert counts.sum() == n * k


@pytest.mark.parametrize(
    "q_lora_rank,dispatch",
    [
        (32, "dense"),
        (None, "dense"),
        (32, "grouped"),
        (None, "grouped"),
        (32, "gathered"),
        (32, "sorted"),
    ],
)
def test_absorbed_decode_matches_plain_path(q_lora_rank, dispatch):
    """Ragged batch: prefill, then 32 decode steps; absorbed and plain logits within 1e-5.
    Every MoE dispatch: all experts as one dense matmul (small experts), grouped_mm, each
    token's experts gathered (GPUs), and the sorted-experts loop of training."""
    m = tiny_model(1, q_lora_rank=q_lora_rank)
    cfg = m.config
    runners = [
        ModelRunner(m, KVCache(cfg, 4, 64, torch.float32, "cpu"), dispatch) for _ in range(2)
    ]
    lens = torch.tensor([9, 4, 6])
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    pos = torch.arange(9).expand(3, 9)
    h = [
        r.forward(ids, pos, 0, plain=plain) for r, plain in zip(runners, (False, True), strict=True)
    ]
    last = (torch.arange(3), lens - 1)
    assert (h[0][last] - h[1][last]).abs().max() < 1e-5
    tok = runners[1].logits(h[1][last]).argmax(-1, keepdim=True)
    p = lens[:, None]
    for _ in range(32):
        la, lp = (
            r.logits(r.forward(tok, p, 0, plain=plain))
            for r, plain in zip(runners, (False, True), strict=True)
        )
        assert (la - lp).abs().max() < 1e-5, (la - lp).abs().max()
        tok, p = lp[:, -1].argmax(-1, keepdim=True), p + 1
    assert runners[0].folded.layers[1].ffn.dispatch == dispatch
    # and the caches they wrote are the same latents
    a, b = runners[0].cache.latent, runners[1].cache.latent
    assert (a - b).abs().max() < 1e-5


def test_batched_generation_equals_one_by_one(model):
    prompts = [list(range(3, 3 + k)) for k in (5, 11, 2, 7)]
    batched = Engine(model).generate(prompts, GREEDY)
    single = [Engine(model).generate([p], GREEDY)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert all(len(c.token_ids) == 24 and c.finish_reason == "length" for c in batched)
    # the plain (re-expanded K/V) engine agrees token for token
    plain = Engine(model, plain=True).generate(prompts, GREEDY)
    assert [c.token_ids for c in plain] == [c.token_ids for c in batched]


def test_continuous_batching_join_and_leave(model):
    """Requests join a running batch and leave it at different times; same tokens as alone."""
    eng = Engine(model, max_batch=3)
    short = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    a = eng.add_request([5, 6, 7], GREEDY)
    b = eng.add_request([9, 8, 7, 6], short)
    for _ in range(3):
        eng.step()
    c = eng.add_request([11, 12], GREEDY)  # joins mid-run
    d = eng.add_request([13, 14, 15], short)  # waits for a free slot, then takes b's
    while eng.has_unfinished():
        eng.step()
    assert eng.cache.used == 0
    for seq in (a, b, c, d):
        alone = Engine(model).generate([seq.prompt_ids], seq.params)[0]
        assert seq.output_ids == alone.token_ids


@pytest.mark.parametrize("plain,dispatch", [(False, "dense"), (True, "dense"), (False, "grouped")])
def test_speculative_greedy_equals_plain_greedy(plain, dispatch):
    m = tiny_model(2)
    prompts = [list(range(3, 3 + k)) for k in (6, 3, 9)]
    ref = Engine(m).generate(prompts, GREEDY)
    eng = Engine(m, speculative=True, plain=plain, dispatch=dispatch)
    spec = eng.generate(prompts, GREEDY)
    assert [c.token_ids for c in spec] == [c.token_ids for c in ref]
    assert eng.spec_stats.drafted > 0 and 0 <= eng.spec_stats.acceptance <= 1


def test_adaptive_speculation_catches_up_exactly():
    """Steps with and without drafting, mixed: the same greedy tokens as plain decoding, and
    the MTP module's cache rows (written late, by the catch-up pass) equal those of an
    engine that drafts every step."""
    m = tiny_model(2)
    prompt, sp = [3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = Engine(m).generate([prompt], sp)[0].token_ids
    always = Engine(m, speculative=True, adaptive=False)
    assert always.generate([prompt], sp)[0].token_ids == ref
    mixed = Engine(m, speculative=True)
    pattern = iter([True, False, False, True, False, False, False, True, True, False, False] * 3)
    mixed.policy.choose = lambda B: next(pattern)
    seq = mixed.add_request(prompt, sp)
    mixed.step()  # prefill
    while len(seq.output_ids) < 14:
        mixed.step()
    mixed.policy.choose = lambda B: True  # one more verify step: it catches up first
    n = seq.num_tokens
    mixed.step()
    assert mixed.spec_stats.plain_steps > 0 and not seq.mtp_lag
    rows = (mixed.cache.mtp_latent[0, 0, : n - 1], always.cache.mtp_latent[0, 0, : n - 1])
    assert (rows[0] - rows[1]).abs().max() < 1e-5
    while mixed.has_unfinished():
        mixed.step()
    assert seq.output_ids == ref


def test_adaptive_speculation_pins_seeded_sampling():
    """A seeded sampled request draws what its seed says whatever the speculation policy
    would choose (it would choose by timing): its batches decode plainly, so it equals a
    non-speculative engine's output; greedy requests in the same engine still draft."""
    m = tiny_model(2)
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    want = Engine(m).generate([[3, 4, 5]], sp)[0].token_ids
    eng = Engine(m, speculative=True)
    eng.policy.choose = lambda B: True  # the timing says: draft
    assert eng.generate([[3, 4, 5]], sp)[0].token_ids == want
    assert eng.spec_stats.steps == 0
    eng.generate([[3, 4, 5]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert eng.spec_stats.steps > 0


def test_speculation_policy_prefers_what_pays():
    """SpecPolicy: drafts while (1 + acceptance) x plain step time beats a verify step's,
    per batch size, and probes the other mode now and then."""
    from nanoseek.infer.engine import FIRST_SAMPLES, PROBE_EVERY, SpecPolicy

    pol = SpecPolicy()
    for B, t_spec in ((1, 1.2), (8, 2.5)):
        for spec, t, acc in ((True, t_spec, 0.9), (False, 1.0, None)):
            for i in range(FIRST_SAMPLES + 1):  # the first is not timed
                assert pol.choose(B) == spec
                pol.record(spec, B, 9.0 if i == 0 else t, acc)
    n = 4 * PROBE_EVERY + 1  # far from break-even: one probe in 4 x PROBE_EVERY steps
    choices = {B: [pol.choose(B) for _ in range(n)] for B in (1, 8)}
    assert choices[1].count(False) == 1  # 1.9 x 1.0 > 1.2
    assert choices[8].count(True) == 1  # 1.9 x 1.0 < 2.5: drafting only to probe


def test_speculation_bookkeeping():
    """Every verify step commits 1 + accepted tokens: the counts add up to the output."""
    m = tiny_model(3)
    eng = Engine(m, speculative=True, adaptive=False)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    out = eng.generate([[4, 5, 6]], sp)[0]
    st = eng.spec_stats
    assert st.drafted == st.steps
    # the prefill commits the first token; the last step may be cut by max_tokens
    assert st.steps + st.accepted in (len(out.token_ids) - 1, len(out.token_ids))


def test_verify_accepts_the_leading_run_of_right_drafts():
    from nanoseek.infer.sampling import verify

    V = 10
    target = torch.tensor([[4, 7, 2, 9], [4, 7, 2, 9], [4, 7, 2, 9], [4, 7, 2, 9]])
    logits = torch.nn.functional.one_hot(target, V).float() * 5  # argmax = target at each position
    drafts = torch.tensor([[4, 7, 2], [4, 1, 2], [3, 7, 2], [4, 7, 2]])
    valid = torch.tensor([[True] * 3, [True] * 3, [True] * 3, [True, True, False]])
    toks, acc = verify(logits, drafts, [GREEDY] * 4, [None] * 4, valid)
    assert torch.equal(toks, target)
    assert acc.tolist() == [3, 1, 0, 2]  # a wrong or padding draft ends the run


def test_lookup_drafts_repeat_the_sequence():
    """The lookup proposes what followed the latest earlier occurrence of a token pair (the
    last two tokens, or the last token and the MTP draft), copied on past the end of the text
    as a loop; its index grows with the sequence."""
    from nanoseek.infer.scheduler import Sequence

    seq = Sequence(prompt_ids=[5, 6, 7, 8, 5, 6, 9], params=GREEDY)
    assert seq.last_pair == (6, 9) and seq.lookup(2) == []
    assert seq.lookup(2, draft=6) == []  # (last token, a draft) = (9, 6): never occurred
    seq.output_ids = [1, 5, 6]  # (5, 6) last followed by 9 at index 6
    assert seq.lookup(1) == [9] and seq.lookup(3) == [9, 1, 5]
    # past the end the copy repeats the loop since the match: 9 1 5 6 | 9 1 5 6 | 9
    assert seq.lookup(9) == [9, 1, 5, 6, 9, 1, 5, 6, 9]
    # with the MTP draft 9 after the last token 6: (6, 9) followed by 1; the loop 1 5 6 9
    assert seq.lookup(1, draft=9) == [1] and seq.lookup(6, draft=9) == [1, 5, 6, 9, 1, 5]
    assert seq.lookup(3, draft=7) == [8, 5, 6]  # (6, 7) at the start: no loop, no copying on
    assert seq.indexed == 10
    assert Sequence(prompt_ids=[4], params=GREEDY).last_pair == (4, 4)
    loop = Sequence(prompt_ids=[3, 3], params=GREEDY)  # (3, 3) followed by 3 nowhere yet
    loop.output_ids = [3]
    assert loop.lookup(4) == [3, 3, 3, 3]  # a loop of one token


def cycle_model(cycle: list[int]) -> nanoseek.Transformer:
    """A tiny model whose greedy text follows `cycle` (after token cycle[i], cycle[i + 1]) and
    whose MTP module drafts the token after that: every block adds nothing to the residual
    stream (zero output projections), embeddings are one-hot, and the head maps token x's
    embedding to the token after x. Drafts of both kinds are then known to be right."""
    m = tiny_model(2)
    d = m.config.hidden_size
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("attn.wo.weight", "w2.weight", "experts.w2")):
                p.zero_()
        m.embed.weight.zero_()
        m.head.weight.zero_()
        for i, x in enumerate(cycle):
            m.embed.weight[x, i] = 1.0
            m.head.weight[cycle[(i + 1) % len(cycle)], i] = 1.0
        m.mtp[0].eh_proj.weight.zero_()
        m.mtp[0].eh_proj.weight[:, :d] = torch.eye(d)  # the next token's embedding only
    return m


@pytest.mark.parametrize("lookup", [0, 1, 2])
def test_lookup_speculation_commits_more_and_equals_plain_greedy(lookup):
    """On text that repeats itself the lookup drafts are right: a verify step commits 2 +
    lookup tokens; batched with a short prompt (no lookup draft until its own output
    repeats: padding drafts instead), every output is plain greedy decoding's."""
    cycle = [3, 9, 4, 17, 5, 30, 6]
    m = cycle_model(cycle)
    sp = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True, logprobs=True)
    repeat, once = cycle * 2 + [3], [9, 4]
    ref = Engine(m).generate([repeat, once], sp)
    assert ref[0].token_ids[:7] == cycle[1:] + cycle[:1]  # the model follows the cycle
    eng = Engine(m, speculative=True, adaptive=False, lookup_drafts=lookup)
    got = eng.generate([repeat], sp)[0]
    assert got.token_ids == ref[0].token_ids
    assert got.logprobs == pytest.approx(ref[0].logprobs, abs=1e-5)  # each verified position's
    st = eng.spec_stats
    assert st.accepted == st.drafted  # every draft right
    assert st.steps == -(-24 // (2 + lookup))  # 1 prefill token, then 2 + lookup a step
    eng = Engine(m, speculative=True, adaptive=False, lookup_drafts=lookup)
    assert [c.token_ids for c in eng.generate([repeat, once], sp)] == [c.token_ids for c in ref]
    with pytest.raises(EngineError, match="lookup_drafts"):
        Engine(m, speculative=True, lookup_drafts=-1)


@pytest.mark.parametrize("plain", [False, True])
def test_lookup_drafts_alone_need_no_mtp(plain):
    """Prompt lookup decoding without the MTP module (a model without one): on repeating text
    each verify step commits 1 + lookup tokens; greedy output equals plain decoding's, a
    seeded sampled request in the batch draws what its seed says, and a batch with no
    lookup draft decodes plainly."""
    cycle = [3, 9, 4, 17, 5, 30, 6]
    m = cycle_model(cycle)
    m.mtp = torch.nn.ModuleList()  # as a transformers checkpoint: no MTP module
    sp = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)
    repeat = cycle * 2 + [3]
    ref = Engine(m).generate([repeat], sp)[0].token_ids
    eng = Engine(m, lookup_drafts=3, adaptive=False, plain=plain)
    assert eng.generate([repeat], sp)[0].token_ids == ref
    st = eng.spec_stats
    assert st.accepted == st.drafted and st.steps == 24 // 4  # 4 tokens a step
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    want = Engine(m).generate([[3, 4, 5]], seeded)[0].token_ids
    mixed = Engine(m, lookup_drafts=3)  # adaptive: a seeded sampled row pins its batch
    got = mixed.generate([repeat, [3, 4, 5]], [sp, seeded])
    assert got[0].token_ids == ref and got[1].token_ids == want
    short = cycle_model([3, 9, 4])  # a loop of 3: the lookup copies it on for all 6 drafts
    short.mtp = torch.nn.ModuleList()
    loop = Engine(short, lookup_drafts=6, adaptive=False, plain=plain)
    want = Engine(short).generate([[3, 9, 4, 3]], sp)[0].token_ids
    assert loop.generate([[3, 9, 4, 3]], sp)[0].token_ids == want
    st = loop.spec_stats
    assert st.accepted == st.drafted and st.steps == -(-24 // 7)  # 7 tokens a step
    fresh = Engine(m, lookup_drafts=2, adaptive=False)
    fresh.generate([[11, 12]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert fresh.spec_stats.steps == 0 and fresh.spec_stats.plain_steps == 2  # nothing to look up


def test_speculation_unavailable_without_mtp():
    with pytest.raises(EngineError, match="MTP"):
        Engine(tiny_model(0, num_nextn_predict_layers=0), speculative=True)


def test_cache_memory_is_the_latent_formula(model):
    cfg = model.config
    eng = Engine(model, max_batch=2)
    per_token = kv_cache_bytes_per_token(cfg, bytes_per_value=4)["latent"]
    assert eng.cache.bytes_per_token() == per_token == 3 * (32 + 8) * 4
    assert eng.cache.latent.nbytes == per_token * 2 * (eng.max_len + 1)
    assert eng.cache.mtp_latent is None  # allocated only for speculation


def test_sampling_top_k_top_p_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = filtered_probs(logits, [SamplingParams(top_k=2)])
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = filtered_probs(logits, [SamplingParams(top_p=0.7)])  # 0.5 < 0.7, 0.8 >= 0.7: two tokens
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0, 0]]))
    p = filtered_probs(logits, [SamplingParams(top_p=0.5)])
    assert torch.allclose(p, torch.tensor([[1.0, 0, 0, 0]]))
    # frequencies follow the distribution; top-k never leaves its set
    gen = torch.Generator().manual_seed(0)
    rows = logits.expand(4000, 4)
    draws = sample(rows, [SamplingParams()] * 4000, [None] * 4000)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert (freq - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03
    draws = sample(rows, [SamplingParams(top_k=2)] * 4000, [gen] * 4000)
    assert set(draws.tolist()) == {0, 1}
    assert sample(logits, [SamplingParams(temperature=0)], [None]).item() == 0


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    a = Engine(model).generate([[5, 6, 7]], sp)[0].token_ids
    b = Engine(model).generate([[1, 2], [5, 6, 7], [9]], sp)[1].token_ids
    c = (
        Engine(model)
        .generate([[5, 6, 7]], SamplingParams(**{**sp.__dict__, "seed": 8}))[0]
        .token_ids
    )
    assert a == b and a != c


def test_logprobs_and_stop_tokens(model):
    eng = Engine(model)
    out = eng.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, logprobs=True, ignore_eos=True)
    )[0]
    assert len(out.logprobs) == 8 and all(lp <= 0 for lp in out.logprobs)
    # the first token's logprob equals log_softmax of the full forward
    with torch.no_grad():
        ref = model(torch.tensor([[5, 6, 7]])).logits[0, -1].log_softmax(-1)
    assert abs(out.logprobs[0] - ref[out.token_ids[0]].item()) < 1e-5
    stop_at = out.token_ids[3]
    first = out.token_ids.index(stop_at)
    cut = eng.generate(
        [[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at])
    )[0]
    assert cut.token_ids == out.token_ids[:first] and cut.finish_reason == "stop"


def test_text_stop_strings_and_stream():
    from nanoseek.data.tokenizer import Tokenizer

    tok = Tokenizer.train(
        ["the cat sat on the mat. " * 50, "a dog ran far away. " * 50], vocab_size=300
    )
    eng = Engine(tiny_model(4, vocab_size=tok.vocab_size), tok)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    full = eng.generate(["the cat"], sp)[0]
    assert full.text == tok.decode(full.token_ids)
    streamed = "".join(eng.stream("the cat", sp))
    assert streamed == full.text
    stop = full.text[5:8]
    if stop.strip():
        cut = eng.generate(
            ["the cat"], SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True)
        )[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
        stop_params = SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True)
        assert "".join(eng.stream("the cat", stop_params)) == cut.text


def test_clear_errors(model, tmp_path):
    with pytest.raises(SamplingError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(SamplingError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    eng = Engine(model, max_len=16)
    with pytest.raises(EngineError, match="context"):
        eng.generate([list(range(20))], GREEDY)
    with pytest.raises(EngineError, match="tokenizer"):
        eng.generate(["hello"], GREEDY)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        Engine.load(tmp_path / "missing")
    with pytest.raises(DeviceError, match="'gpu0' is not available here; available: auto, cpu"):
        Engine.load(tmp_path / "missing", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' is not available here"):
            Engine.load(tmp_path / "missing", device="cuda")
    with pytest.raises(EngineError, match="exceeds the model's max_position_embeddings"):
        Engine(model, max_len=10**6)
    # generation stops at the context end
    out = eng.generate(
        [list(range(10))], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    )[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_default_context_is_capped():
    big = nanoseek.Transformer(nanoseek.get_preset("tiny").replace(max_position_embeddings=163840))
    eng = Engine(big, max_batch=2)
    assert eng.max_len == 4096  # not 163840 x slots preallocated


def test_loads_transformers_checkpoint_and_matches_its_greedy(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    nanoseek.save_pretrained(model, tmp_path / "ns")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ns").eval()
    hf.save_pretrained(tmp_path / "hf")  # no MTP layers in a transformers checkpoint
    eng = Engine.load(tmp_path / "hf")
    assert len(eng.model.mtp) == 0
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    ours = eng.generate(
        [[5, 6, 7, 8]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    assert ours[0].token_ids == ref[0, 4:].tolist()
    with pytest.raises(EngineError, match="MTP"):
        Engine.load(tmp_path / "hf", speculative=True)


@pytest.mark.parametrize("rank", [0, 1])  # the target's favourite, its second choice
def test_speculative_sampling_keeps_the_target_distribution(rank):
    from nanoseek.infer.sampling import verify

    torch.manual_seed(0)
    V, B = 6, 4000
    logits = torch.randn(1, 2, V).expand(B, 2, V).contiguous()
    params = [SamplingParams(temperature=0.9, top_k=5)] * B
    want = filtered_probs(logits[:1, 0], params[:1])[0]
    draft = torch.full((B, 1), int(want.argsort(descending=True)[rank]))  # often accepted
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    tokens, accepted = verify(logits, draft, params, gens)
    got = torch.bincount(tokens[:, 0], minlength=V).float() / B
    assert (got - want).abs().max().item() < 0.03
    assert torch.equal(accepted.bool(), tokens[:, 0] == draft[:, 0])
    assert 0.2 < accepted.float().mean().item() < 1.0  # accepts with probability p(draft)
    assert abs(accepted.float().mean().item() - want[draft[0, 0]].item()) < 0.03


# --- prefix cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("plain", [False, True])
def test_prefix_cache_gives_the_tokens_of_a_cold_prefill(plain):
    """A prompt that starts like an earlier one reuses its latent rows and prefills only the
    rest, batched with a cold prompt (ragged start positions); every output equals a cold
    engine's."""
    m = tiny_model(4)
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 200, (37,), generator=g).tolist()  # 2 blocks of 16 + 5
    first, second = system + [7, 8, 9], system + [10, 11, 12, 13]
    cold_prompt = torch.randint(3, 200, (9,), generator=g).tolist()
    eng = Engine(m, max_batch=4, plain=plain, prefix_cache=True)
    eng.generate([first], GREEDY)
    assert eng.prefix.hits == 0 and eng.prefix.tokens == 32
    warm = eng.generate([second, cold_prompt, first], GREEDY)
    cold = Engine(m, max_batch=4, plain=plain).generate([second, cold_prompt, first], GREEDY)
    assert [c.token_ids for c in warm] == [c.token_ids for c in cold]
    assert eng.prefix.hits == 2 and eng.prefix.reused_tokens == 64


def test_prefix_cache_keeps_the_recent_prompts_within_its_capacity():
    from nanoseek.infer.prefix import PrefixCache

    pc = PrefixCache(block=4, capacity_tokens=16)
    rows = lambda n: torch.arange(n, dtype=torch.float32).view(1, n, 1).expand(2, n, 3)
    a, b, c = list(range(10)), list(range(100, 112)), [0, 1, 2, 3, 50, 51, 52, 53, 54]
    pc.insert(a, rows(10))  # keeps 8 tokens
    pc.insert(b, rows(12))  # 20 > 16: a is dropped
    assert pc.tokens == 12 and pc.lookup(a) is None
    hit_rows, n = pc.lookup(b + [1])
    assert n == 12 and torch.equal(hit_rows, rows(12))
    assert pc.lookup(b)[1] == 8  # at least one token is left to prefill
    pc.insert(c, rows(9))  # b (12) + c (8) > 16: b, the least recently used, goes
    assert pc.lookup(b + [1]) is None and pc.lookup(c[:4] + [9, 9])[1] == 4


def test_generate_takes_a_run_directory(tmp_path, cli):
    """`nanoseek generate runs/X` (what a user naturally passes) uses runs/X/ckpt."""
    from nanoseek.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["the cat sat on the mat. " * 50], vocab_size=300)
    nanoseek.save_pretrained(tiny_model(5, vocab_size=tok.vocab_size), tmp_path / "run" / "ckpt")
    tok.save(tmp_path / "run" / "ckpt")
    r = cli("generate", tmp_path / "run", "the cat", "--max-tokens", 5, "--temperature", 0)
    assert r.code == 0, r.err
    five = SamplingParams(max_tokens=5, temperature=0)
    want = Engine.load(tmp_path / "run" / "ckpt").generate(["the cat"], five)[0]
    assert r.out == want.text + "\n" and "5 tokens" in r.err


@pytest.mark.slow
@pytest.mark.parametrize("dispatch,gather", [("dense", 2), ("grouped", 2), ("grouped", 0)])
def test_compiled_decode_matches_eager(dispatch, gather, monkeypatch):
    """`compile=True`: decode and verify steps through torch.compile give the eager logits
    (within 1e-4) over a growing context (one graph for every S), and the same greedy
    tokens, speculation included; the routed experts both gathered in place and through
    grouped_mm (`gather` = 0 pairs per expert: grouped_mm for every batch)."""
    monkeypatch.setattr(moe, "GATHER_PAIRS_PER_EXPERT", gather)
    m = tiny_model(1)
    cfg = m.config
    runners = [
        ModelRunner(m, KVCache(cfg, 2, 64, torch.float32, "cpu"), dispatch, compile=c)
        for c in (False, True)
    ]
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    tok = [r.logits(r.forward(ids, torch.arange(5).expand(2, 5), 0))[:, -1:] for r in runners]
    tok = tok[0].argmax(-1)
    for p in range(5, 25):
        pos = torch.tensor([[p], [p - 2]])
        la, lc = (r.logits(r.forward(tok, pos, 0)) for r in runners)
        assert (la - lc).abs().max() < 1e-4, (la - lc).abs().max()
        tok = la[:, -1].argmax(-1, keepdim=True)
    # a verify step of 8 drafts (9 positions a row) is compiled too
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    pos = torch.arange(25, 34).expand(2, 9)
    la, lc = (r.logits(r.forward(ids, pos, 0)) for r in runners)
    assert (la - lc).abs().max() < 1e-4, (la - lc).abs().max()
    prompts = [[3, 4, 5, 6], [7, 8, 9]]
    ref = [c.token_ids for c in Engine(m).generate(prompts, GREEDY)]
    got = Engine(m, compile=True, speculative=True, dispatch=dispatch).generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == ref
