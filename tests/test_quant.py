"""Int8 decoding (`Engine(quantize="int8")`): the C kernels against torch on the same int8
weights, and the engine against fp32 decoding (logits within a stated tolerance, greedy
text, compiled == eager)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.infer import Engine, EngineError, SamplingParams
from nanoseek.model.quant import Int8Weight, mm

if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):  # the kernel's ISA
    pytest.skip("int8 decoding needs an x86 CPU with AVX2", allow_module_level=True)

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def grouped_model(seed: int = 0, **changes) -> nanoseek.Transformer:
    """`tiny` with experts too large for the dense fold, so that they are quantized too."""
    torch.manual_seed(seed)
    cfg = nanoseek.get_preset("tiny").replace(**{"moe_intermediate_size": 256, **changes})
    model = nanoseek.Transformer(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("M,K,N", [(1, 256, 100), (3, 64, 37), (8, 96, 5), (20, 256, 64)])
def test_gemm_q8_equals_torch_on_the_same_int8_weights(M, K, N):
    torch.manual_seed(M)
    x, w = torch.randn(M, K), torch.randn(N, K)
    q = Int8Weight.rows(w)
    want = x @ q.dequantized().t()
    got = torch.ops.nanoseek.gemm_q8(x, q.q, q.scale)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    # and the quantization itself: each weight within half a step of its row's scale
    assert ((q.dequantized() - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()
    # mm: the same for a folded [in, out] weight, and the prefill path (dequantize) past 64 rows
    wf = Int8Weight.folded(w.t())
    assert torch.equal(mm(x, wf), got)
    xl = torch.randn(70, K)
    assert (mm(xl, wf) - xl @ q.dequantized().t()).abs().max() < 1e-4 * K


def test_moe_q8_equals_torch_on_the_same_int8_weights():
    torch.manual_seed(0)
    E, I, d, T, k = 6, 32, 64, 3, 2
    w13, w2 = Int8Weight.rows(torch.randn(E * 2 * I, d)), Int8Weight.rows(torch.randn(E * d, I))
    x, weights = torch.randn(T, d), torch.rand(T, k)
    idx = torch.tensor([[0, 5], [2, 2], [4, 1]])  # an expert chosen twice by one token
    got = torch.ops.nanoseek.moe_q8(x, weights, idx, w13.q, w13.scale, w2.q, w2.scale)
    W13, W2 = w13.dequantized().view(E, 2 * I, d), w2.dequantized().view(E, d, I)
    want = torch.zeros(T, d)
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            g, u = (W13[e] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (W2[e] @ (F.silu(g) * u))
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_int8_decoding_stays_close_to_fp32():
    """Decoding the same context (fp32's greedy tokens fed to both), every step's logits are
    within 2% of the logits' range of fp32's (attention, shared and routed experts and head
    all int8: tiny's rows are short, so rounding shows more than in `small`) and the argmax
    is fp32's at >= 90% of the steps of this random model (near-ties are common in it)."""
    m = grouped_model()
    ref = Engine(m, max_batch=2)
    q8 = Engine(m, max_batch=2, quantize="int8")
    assert q8.runner.folded.layers[1].ffn.experts_q8 is not None  # routed experts quantized
    ids = torch.randint(0, m.config.vocab_size, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    agree, steps, worst = 0, 0, 0.0
    for p in range(6, 40):
        la, lq = (e.runner.logits(e.runner.forward(ids, pos, 0))[:, -1] for e in (ref, q8))
        worst = max(worst, ((la - lq).abs().max() / (la.max() - la.min())).item())
        agree += (la.argmax(-1) == lq.argmax(-1)).sum().item()
        steps += 2
        ids, pos = la.argmax(-1, keepdim=True), torch.tensor([[p], [p]])
    assert worst < 0.02 and agree >= 0.9 * steps, (worst, agree, steps)


def test_int8_speculation_and_refresh():
    """The MTP module is quantized too (speculative greedy equals plain greedy at int8), and
    refresh_weights re-quantizes the new weights."""
    m = grouped_model(1)
    plain = Engine(m, quantize="int8").generate([[5, 6, 7]], GREEDY)[0].token_ids
    eng = Engine(m, quantize="int8", speculative=True, adaptive=False)
    assert eng.generate([[5, 6, 7]], GREEDY)[0].token_ids == plain
    with torch.no_grad():
        m.head.weight.mul_(-1)
    eng.refresh_weights()
    want = Engine(m, quantize="int8").generate([[5, 6, 7]], GREEDY)[0].token_ids
    assert eng.generate([[5, 6, 7]], GREEDY)[0].token_ids == want != plain


def test_int8_leaves_widths_the_kernel_cannot_read_in_fp32():
    """The kernel reads rows in steps of 8: experts 252 wide stay fp32 (routed, and the
    shared expert's down projection), the rest is int8, and decoding runs."""
    m = grouped_model(moe_intermediate_size=252)
    eng = Engine(m, quantize="int8")
    f = eng.runner.folded.layers[1].ffn
    assert f.experts_q8 is None and isinstance(f.w13, Int8Weight) and f.w2.dtype == torch.float32
    out = eng.generate([[3, 4, 5]], GREEDY)[0].token_ids
    assert len(out) == GREEDY.max_tokens


def test_int8_refuses_what_it_does_not_run():
    m = grouped_model()
    with pytest.raises(EngineError, match="unknown quantize"):
        Engine(m, quantize="int4")
    with pytest.raises(EngineError, match="absorbed path"):
        Engine(m, quantize="int8", plain=True)
    with pytest.raises(EngineError, match="float32 model"):
        Engine(grouped_model().to(torch.bfloat16), quantize="int8")


@pytest.mark.slow
def test_compiled_int8_equals_eager_int8():
    m = grouped_model(2)
    prompts = [[3, 4, 5, 6], [7, 8, 9]]
    ref = [c.token_ids for c in Engine(m, quantize="int8").generate(prompts, GREEDY)]
    got = Engine(m, quantize="int8", compile=True).generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == ref


def test_cli_generate_quantize_int8(tmp_path, cli):
    """`nanoseek generate --quantize int8` prints what Engine.load(quantize="int8") makes;
    a bf16 model is refused in one line."""
    from nanoseek.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["the cat sat on the mat. " * 50], vocab_size=300)
    nanoseek.save_pretrained(grouped_model(5, vocab_size=tok.vocab_size), tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    args = ("generate", tmp_path / "ckpt", "the cat", "--max-tokens", 5, "--temperature", 0)
    r = cli(*args, "--quantize", "int8")
    assert r.code == 0, r.err
    five = SamplingParams(max_tokens=5, temperature=0)
    want = Engine.load(tmp_path / "ckpt", quantize="int8").generate(["the cat"], five)[0]
    assert r.out == want.text + "\n"
    r = cli(*args, "--quantize", "int8", "--dtype", "bfloat16")
    assert r.code != 0 and "float32 model" in r.err and "Traceback" not in r.err
