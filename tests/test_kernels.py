"""nanoseek's C++ kernels (nanoseek.kernels). Decode: fp32 (the CPU engine's default for
models of 16 MB and more) and int8 (`Engine(quantize="int8")`): the kernels against torch on
the same weights, the fp32 engine against MKL's (`kernels=False`), and int8 against fp32
decoding (logits within a stated tolerance, greedy text, compiled == eager). Training: the
C++ expert loop against the Python one (outputs, gradients, losses), and its fallback."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.infer import Engine, EngineError, SamplingParams
from nanoseek.kernels import cpu_supported, decode_library
from nanoseek.model.quant import F32Weight, Int8Weight, mm

if not cpu_supported():  # the kernels' ISA
    pytest.skip("nanoseek's C++ kernels need an x86 CPU with AVX2", allow_module_level=True)
decode_library()  # builds (once per machine) and loads the torch.ops.nanoseek kernels

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


@pytest.mark.parametrize("M,K,N", [(1, 256, 100), (2, 64, 37), (8, 96, 5), (3, 8, 1)])
def test_gemm_f32_equals_torch(M, K, N):
    torch.manual_seed(M)
    x, w = torch.randn(M, K), torch.randn(N, K)
    got = torch.ops.nanoseek.gemm_f32(x, w)
    assert (got - x @ w.t()).abs().max() < 1e-5 * K
    # mm with a folded [in, out] weight: the kernel up to 8 rows, MKL past them
    wf = F32Weight.folded(w.t())
    assert wf.rows.data_ptr() == w.data_ptr()  # the transposed view is read in place
    assert torch.equal(mm(x, wf), got)
    xl = torch.randn(9, K)
    assert torch.equal(mm(xl, wf), xl @ w.t())


@pytest.mark.parametrize("T", [3, 13])
def test_moe_f32_equals_a_per_token_reference(T):
    """The kernel groups the (token, expert) pairs by expert, up to 8 rows a pass over its
    weights: with 13 tokens expert 0 has 11 pairs (a pass of 8 rows, then 3) and expert 3
    has 9 (8, then 1); an index past the experts is refused."""
    torch.manual_seed(1)
    E, I, d, k = 6, 32, 64, 2
    W13, W2 = torch.randn(E, 2 * I, d), torch.randn(E, d, I)
    x, weights = torch.randn(T, d), torch.rand(T, k)
    idx = torch.tensor([[0, 5], [2, 2], [4, 1]])  # an expert chosen twice by one token
    if T > 3:
        idx = torch.cat([idx, torch.tensor([[0, 3]] * 10)])  # expert 0: 11 pairs, 3: 10
        idx[-1, 1] = 5
    got = torch.ops.nanoseek.moe_f32(x, weights, idx, W13.flatten(0, 1), W2.flatten(0, 1))
    want = torch.zeros(T, d)
    for t in range(T):
        for j in range(k):
            g, u = (W13[idx[t, j]] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (W2[idx[t, j]] @ (F.silu(g) * u))
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.nanoseek.moe_f32(x, weights, idx + E, W13.flatten(0, 1), W2.flatten(0, 1))


def test_fp32_kernels_decode_what_mkl_decodes():
    """With kernels=True (the default for models of 16 MB and more) the engine runs its small
    matmuls and routed experts in the fp32 kernel: the same greedy text as with MKL
    (`kernels=False`), logits within float32 rounding, at batch 1 and 3, plain and
    speculative (whose verify steps run 2 rows a sequence)."""
    m = grouped_model()
    assert Engine(m).runner.kernels is False  # auto: a model this small decodes from cache
    for mtp in (False, True):
        mkl = Engine(m, max_batch=3, kernels=False, speculative=mtp, adaptive=False)
        ours = Engine(m, max_batch=3, kernels=True, speculative=mtp, adaptive=False)
        assert isinstance(ours.runner.folded.head, F32Weight)
        assert ours.runner.folded.layers[1].ffn.experts_kernel is not None
        assert isinstance(mkl.runner.folded.head, torch.Tensor)
        for prompts in ([[3, 4, 5]], [[3, 4, 5], [9, 8], [1, 2, 3, 4, 5, 6]]):
            want = [o.token_ids for o in mkl.generate(prompts, GREEDY)]
            assert [o.token_ids for o in ours.generate(prompts, GREEDY)] == want
    ids, pos = torch.randint(0, m.config.vocab_size, (2, 1)), torch.tensor([[0], [0]])
    la, lb = (e.runner.logits(e.runner.forward(ids, pos, 0)) for e in (mkl, ours))
    assert (la - lb).abs().max() < 1e-4 * la.abs().max()


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
    assert q8.runner.folded.layers[1].ffn.experts_kernel is not None  # routed experts quantized
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
    assert (
        f.experts_kernel is None and isinstance(f.w13, Int8Weight) and f.w2.dtype == torch.float32
    )
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
    with pytest.raises(EngineError, match="float32 model"):
        Engine(grouped_model().to(torch.bfloat16), kernels=True)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [{"quantize": "int8"}, {"kernels": True}])
def test_compiled_kernels_equal_eager_kernels(kw):
    m = grouped_model(2)
    prompts = [[3, 4, 5, 6], [7, 8, 9]]
    ref = [c.token_ids for c in Engine(m, **kw).generate(prompts, GREEDY)]
    got = Engine(m, compile=True, **kw).generate(prompts, GREEDY)
    assert [c.token_ids for c in got] == ref


def test_cli_generate_quantize_int8(tmp_path, cli):
    """`nanoseek generate --quantize int8` prints what Engine.load(quantize="int8") makes;
    a bf16 model is refused in one line; `--kernels on|off` reach the engine."""
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
    on, off = cli(*args, "--kernels", "on"), cli(*args, "--kernels", "off")
    assert on.code == 0 and off.code == 0, on.err + off.err
    assert on.out == off.out  # fp32 kernel and MKL: the same greedy text
    r = cli(*args, "--kernels", "on", "--dtype", "bfloat16")
    assert r.code != 0 and "float32 model" in r.err and "Traceback" not in r.err


def test_kernels_that_cannot_build_fall_back_or_say_why(tmp_path, monkeypatch):
    """Without a compiler, or with a cache directory it cannot write, the automatic choice
    decodes with MKL, and what asks for the kernels gets a one-line reason."""
    import nanoseek.infer.runner as runner
    from nanoseek.kernels import available

    monkeypatch.setattr(runner, "F32_KERNEL_MIN_BYTES", 0)  # auto would take the kernel
    m = grouped_model()
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    decode_library.cache_clear()
    try:
        assert not available()
        assert Engine(m).runner.kernels is False
        for kw in ({"quantize": "int8"}, {"kernels": True}):
            with pytest.raises(EngineError, match="install a C\\+\\+ compiler"):
                Engine(m, **kw)
        (tmp_path / "file").write_text("not a directory")
        monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "file"))
        monkeypatch.delenv("CXX")
        decode_library.cache_clear()
        with pytest.raises(EngineError, match="could not be built or loaded"):
            Engine(m, kernels=True)
        assert Engine(m).runner.kernels is False
    finally:
        decode_library.cache_clear()  # the next test builds or loads the real one


def test_kernels_give_the_same_bits_on_any_number_of_threads():
    """The kernels split their work over torch's threads (by output row, by (token, expert)
    pair); every output is computed the same way whatever the split."""
    torch.manual_seed(3)
    x, w = torch.randn(3, 256), torch.randn(1000, 256)
    q = Int8Weight.folded(w.t())
    E, I, d, T, k = 8, 64, 128, 5, 3
    W13, W2 = torch.randn(E * 2 * I, d), torch.randn(E * d, I)
    xt, weights, idx = torch.randn(T, d), torch.rand(T, k), torch.randint(0, E, (T, k))
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(
                (
                    torch.ops.nanoseek.gemm_f32(x, w),
                    torch.ops.nanoseek.gemm_q8(x, q.q, q.scale),
                    torch.ops.nanoseek.moe_f32(xt, weights, idx, W13, W2),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


def _experts_step(moe, x, probe, bf16=False):
    """One MoE layer's forward and backward: [output, dx, every parameter's gradient]."""
    moe.zero_grad()
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = moe(xg)
    (out.float() * probe).sum().backward()
    return [out.detach().float(), xg.grad] + [p.grad for p in moe.parameters()]


# 12: a row shorter than a vector; 20: a vector (8 or 16 lanes) and a tail
@pytest.mark.parametrize("inter", [32, 12, 20])
@pytest.mark.parametrize("threads", [1, 2])  # 2: the experts shared out between the threads
@pytest.mark.parametrize("favoured", [None, 5])
def test_fused_expert_loop_equals_the_python_loop(monkeypatch, inter, threads, favoured):
    """Training on CPU runs the experts in C++ (experts.cpp): the output and every gradient
    (the gate's through the gate weights) equal the Python loop's, to ~1e-6 in fp32 and
    within bf16's rounding under bf16 autocast (padded blocks there), an expert that gets no
    rows included (its gradient exactly zero), on one thread and with the experts run two
    threads at a time. `favoured`: an expert every token picks, so that bf16's padded blocks
    come in two sizes (128 rows and 64) and the threads' shares of rows are uneven."""
    from nanoseek.model import moe as M

    torch.manual_seed(7)
    cfg = nanoseek.get_preset("tiny").replace(moe_intermediate_size=inter)
    moe = M.MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.bias[3] = -100.0  # expert 3 is never chosen
    if favoured is not None:
        moe.gate.bias[favoured] = 100.0
        rows = (M.count_tokens(moe.gate(torch.randn(100, cfg.hidden_size))[1], 8) + 63) // 64
        assert sorted(set(rows.tolist())) == [0, 1, 2]
    x, probe = torch.randn(2, 50, cfg.hidden_size), torch.randn(2, 50, cfg.hidden_size)
    for dtype in (torch.float32, torch.bfloat16):
        assert M._expert_loop(x, dtype) is M._FusedExpertLoop
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = {bf16: _experts_step(moe, x, probe, bf16) for bf16 in (False, True)}
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(M, "EXPERT_KERNEL", False)
    assert M._expert_loop(x, torch.float32) is M._ExpertLoop
    loop = {bf16: _experts_step(moe, x, probe, bf16) for bf16 in (False, True)}
    for bf16, tol in ((False, 2e-6), (True, 0.02)):
        w13_grad, w2_grad = fused[bf16][3], fused[bf16][4]
        assert w13_grad[3].abs().max() == 0 and w2_grad[3].abs().max() == 0
        for got, want, fp32 in zip(fused[bf16], loop[bf16], loop[False], strict=True):
            assert (got - want).abs().max() <= tol * want.abs().max()
            assert (got - fp32).abs().max() <= tol * fp32.abs().max()
    assert not torch.equal(fused[False][0], torch.zeros_like(fused[False][0]))


@pytest.mark.parametrize("n_shared", [2, 0])
def test_fused_expert_loop_runs_the_shared_experts_as_experts(monkeypatch, n_shared):
    """Two shared experts (an MLP twice an expert's width) run in the C++ loop as two more
    experts every token picks: output and gradients (the shared MLP's included) equal the
    Python loop's, which adds the MLP's output; and a MoE without shared experts."""
    from nanoseek.model import moe as M

    torch.manual_seed(11)
    moe = M.MoE(nanoseek.get_preset("tiny").replace(n_shared_experts=n_shared))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, probe = torch.randn(3, 40, 64), torch.randn(3, 40, 64)
    shared = moe.experts._as_experts(moe.shared)[0]
    assert (shared is None) == (n_shared == 0) and (shared is None or len(shared) == n_shared)
    fused = {bf16: _experts_step(moe, x, probe, bf16) for bf16 in (False, True)}
    monkeypatch.setattr(M, "EXPERT_KERNEL", False)
    loop = {bf16: _experts_step(moe, x, probe, bf16) for bf16 in (False, True)}
    for bf16, tol in ((False, 2e-6), (True, 0.02)):
        for got, want in zip(fused[bf16], loop[bf16], strict=True):
            assert (got - want).abs().max() <= tol * want.abs().max()
    monkeypatch.setattr(M, "EXPERT_KERNEL", True)
    empty = _experts_step(moe, torch.zeros(0, 1, 64), torch.zeros(0, 1, 64), True)
    assert empty[0].shape == (0, 1, 64) and empty[1].shape == (0, 1, 64)  # no tokens: no rows


def _amx() -> bool:
    from nanoseek.kernels import experts_library

    experts_library()
    return torch.ops.nanoseek.experts_amx(64, 32)


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not _amx(), reason="this CPU has no AMX: the at::mm path runs")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_tiles_equal_the_mm_path(monkeypatch, threads):
    """On a CPU with AMX, bf16 experts run as brgemm blocks (experts.cpp): output and every
    gradient equal the at::mm path's (NANOSEEK_AMX=0) within bf16 rounding, with an expert
    that gets no rows (zero gradient) and one every token picks, on 1-3 threads (2 and 3:
    experts split between threads, their weight gradients summed in thread order: the same
    bits run after run)."""
    from nanoseek.model import moe as M

    torch.manual_seed(5)
    moe = M.MoE(nanoseek.get_preset("tiny").replace(moe_intermediate_size=32))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    moe.gate.bias[3], moe.gate.bias[5] = -100.0, 100.0
    x, probe = torch.randn(3, 70, 64), torch.randn(3, 70, 64)
    step = lambda: _with_threads(threads, lambda: _experts_step(moe, x, probe, bf16=True))  # noqa: E731
    amx, again = step(), step()
    monkeypatch.setenv("NANOSEEK_AMX", "0")
    plain = step()
    assert amx[3][3].abs().max() == 0 and amx[4][3].abs().max() == 0  # expert 3: no rows
    for got, same, want in zip(amx, again, plain, strict=True):
        assert torch.equal(got, same)
        assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert not torch.equal(amx[3], plain[3])  # fp32 sums (the mm path rounds to bf16): it ran


@pytest.mark.parametrize("tiles", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_weights_run_in_bf16_as_cast_ones(monkeypatch, tiles, threads):
    """experts_fwd's dtype: fp32 weights run in bf16 give the same bits, forward and backward,
    as weights cast to bf16 beforehand (the path before), shared experts included: on AMX
    tiles each expert's weights are rounded as they are packed, on the at::mm path
    (NANOSEEK_AMX=0) cast whole."""
    from nanoseek.model import moe as M

    if tiles and not _amx():
        pytest.skip("this CPU has no AMX: the at::mm path runs (the tiles=False case)")
    if not tiles:
        monkeypatch.setenv("NANOSEEK_AMX", "0")

    torch.manual_seed(3)
    E, k, d, inter, n = 6, 2, 64, 32, 90
    w13, w2 = torch.randn(E, 2 * inter, d) * 0.2, torch.randn(E, d, inter) * 0.2
    sw13, sw2 = torch.randn(1, 2 * inter, d) * 0.2, torch.randn(1, d, inter) * 0.2
    x, dout = torch.randn(n, d), torch.randn(n, d).bfloat16()
    weights = torch.rand(n, k)
    idx = torch.rand(n, E).topk(k, dim=1).indices
    src, slot, sizes = torch.ops.nanoseek.experts_dispatch(idx, E, M.PAD, 1)
    sizes = sizes.tolist()

    def run(ws, dtype):
        fwd = torch.ops.nanoseek.experts_fwd(x, weights, *ws, src, slot, sizes, dtype)
        _, xs, h, a, rw = fwd
        bwd = torch.ops.nanoseek.experts_bwd(
            dout, xs, h, a, rw, *ws, src, slot, k, sizes, torch.float32
        )
        return (*fwd, *bwd)

    fp32 = (w13, w2, sw13, sw2)
    got = _with_threads(threads, lambda: run(fp32, torch.bfloat16))
    want = _with_threads(threads, lambda: run(tuple(w.bfloat16() for w in fp32), None))
    assert got[2].dtype == torch.bfloat16 and got[7].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.skipif(not _amx(), reason="this CPU has no AMX: MLPs run on torch's matmuls")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mlp_runs_as_one_expert_on_amx(monkeypatch, threads):
    """Under bf16 autocast on a CPU with AMX a dense MLP runs as one expert in experts.cpp:
    its output and gradients (w1, w2, w3 and the input's) equal torch's within bf16
    rounding, its one expert split over 1-3 threads; fp32 stays on torch."""
    from nanoseek.model import moe as M

    torch.manual_seed(9)
    mlp = M.MLP(64, 96)
    x, probe = torch.randn(2, 150, 64), torch.randn(2, 150, 64)
    assert M._amx_runs(x, 64, 96) is False  # fp32: torch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert M._amx_runs(x, 64, 96)
        assert not M._amx_runs(x, 256, 96)  # rows wider than 128: at::mm measured faster
    step = lambda: _with_threads(threads, lambda: _experts_step(mlp, x, probe, bf16=True))  # noqa: E731
    kernel = step()
    monkeypatch.setattr(M, "EXPERT_KERNEL", False)
    torch_ = step()
    assert kernel[0].dtype == torch_[0].dtype
    for got, want in zip(kernel, torch_, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 0.02 * want.abs().max()


@pytest.mark.parametrize("E,k", [(32, 4), (8, 1), (37, 6), (5, 5)])
def test_topk_rows_picks_what_torch_topk_picks(E, k):
    """The gate's top-k in C++: each row's k largest, the same set torch.topk gives, largest
    first; of equal values the lower index (a row of ties)."""
    from nanoseek.model import moe as M

    M.expert_kernel_builds()
    g = torch.Generator().manual_seed(E * 10 + k)
    scores = torch.randn(300, E, generator=g)
    scores[7] = 0.5  # ties
    scores[9, 1], scores[10, :] = float("nan"), float("-inf")  # ranked by the sort instead
    got = torch.ops.nanoseek.topk_rows(scores, k)
    want = scores.topk(k, dim=-1).indices
    tied = (torch.arange(300) == 7) | (torch.arange(300) == 10)
    assert torch.equal(got[~tied].sort(dim=-1).values, want[~tied].sort(dim=-1).values)
    assert got[7].tolist() == list(range(k)) and got[10].tolist() == list(range(k))
    assert got[9, 0] == 1  # NaN first, as torch ranks it
    picked = scores.gather(1, got)[11:]
    assert (picked[:, :-1] >= picked[:, 1:]).all()
    assert torch.equal(M._top_k(scores, k), got)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.nanoseek.topk_rows(scores, E + 1)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(
    "changes",
    [
        {},  # `small`'s: top 4 of 32 in one group, normalised, scaled by 2.5
        {"norm_topk_prob": False, "routed_scaling_factor": 1.0},
        {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gate_backward_equals_autograd(threads, changes, dtype):
    """The gate's backward from each token's k chosen scores (experts.cpp's gate_bwd) against
    autograd through Gate.route's torch ops: the same weights, experts and scores, bit for
    bit; the input's and the gate weight's gradients equal up to the order of fp32 sums."""
    from nanoseek.model import moe as M

    M.expert_kernel_builds()
    cfg = nanoseek.get_preset("small").replace(hidden_size=64, **changes)
    torch.manual_seed(0)
    gate = M.Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.1)
    gate.bias.normal_(0, 0.05)  # a bias that changes choices: the selection has no gradient
    x = torch.randn(517, 64).to(dtype)
    probe = torch.randn(517, cfg.num_experts_per_tok)

    def run(scores_grad):
        gate.weight.grad = None
        xi = x.clone().requires_grad_(True)
        weights, indices, scores = gate(xi, scores_grad=scores_grad)
        (weights * probe).sum().backward()
        return weights, indices, scores, xi.grad, gate.weight.grad

    sparse = _with_threads(threads, lambda: run(False))
    dense = run(True)  # the scores feed a loss: autograd's path
    assert sparse[2].grad_fn is None and dense[2].grad_fn is not None
    for got, want in zip(sparse[:3], dense[:3], strict=True):
        assert torch.equal(got, want)
    for got, want in zip(sparse[3:], dense[3:], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        tol = 1e-2 if got.dtype == torch.bfloat16 else 1e-5
        assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()
    assert sparse[4].abs().max() > 0


@pytest.mark.parametrize("pad", [1, 64])
def test_experts_dispatch_sorts_as_argsort_and_pads(pad):
    """The C++ counting sort puts the (token, expert) pairs where the stable argsort and
    `_padded_slots` do: the same rows read the same tokens, each expert's block rounded up
    to `pad` rows (padding rows read token 0), slot[p] the row of pair p; shared experts
    come after, a block of every token each."""
    from nanoseek.model import moe as M

    M.expert_kernel_builds()
    E, k, N = 8, 3, 200
    g = torch.Generator().manual_seed(pad)
    indices = torch.rand(N, E, generator=g).topk(k, dim=-1).indices
    indices[indices == 3] = 2  # expert 3 gets no rows; 2 gets some tokens twice
    src, slot, rows = torch.ops.nanoseek.experts_dispatch(indices, E, pad)
    counts = M.count_tokens(indices, E)
    assert torch.equal(rows, (counts + pad - 1) // pad * pad)
    order = indices.flatten().argsort(stable=True)
    want_slot = M._padded_slots(counts, rows, N * k)
    assert torch.equal(slot[order], want_slot)
    want_src = torch.zeros(int(rows.sum()), dtype=torch.long).index_copy_(0, want_slot, order // k)
    assert torch.equal(src, want_src)

    src2, slot2, rows2 = torch.ops.nanoseek.experts_dispatch(indices, E, pad, 2)
    block = (N + pad - 1) // pad * pad
    assert rows2.tolist() == rows.tolist() + [block, block]
    slot2 = slot2.view(N, k + 2)
    assert torch.equal(slot2[:, :k].flatten(), slot) and torch.equal(src2[: len(src)], src)
    for j in range(2):  # shared block j: token t in its row t
        start = len(src) + j * block
        assert torch.equal(slot2[:, k + j], torch.arange(N) + start)
        assert torch.equal(src2[start : start + N], torch.arange(N))
    with pytest.raises(RuntimeError, match="expert out of range"):
        torch.ops.nanoseek.experts_dispatch(indices + E, E, pad)


def test_fused_expert_loop_trains_as_the_python_loop(monkeypatch):
    """Ten fp32 training steps of `tiny` with each loop: the same losses, to ~1e-5 over the
    first steps; the loops differ by rounding only, which a flipped routing choice then
    amplifies (~4e-4 by step 10), as it would between two thread counts."""
    from nanoseek.model import moe as M
    from nanoseek.train.run import build_optimizer

    def losses():
        torch.manual_seed(0)
        model = nanoseek.Transformer(nanoseek.get_preset("tiny")).train()
        opt = build_optimizer(model, lr=3e-3, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, 256, (4, 64), generator=g)
        out = []
        for _ in range(10):
            loss = model(x[:, :-1], targets=x[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return torch.tensor(out)

    assert M._expert_loop(torch.zeros(1), torch.float32) is M._FusedExpertLoop
    fused = losses()
    monkeypatch.setattr(M, "EXPERT_KERNEL", False)
    loop = losses()
    assert fused[-1] < fused[0] - 0.5  # it learns
    assert (fused[:3] - loop[:3]).abs().max() < 2e-5
    assert (fused - loop).abs().max() < 5e-3


def test_expert_kernel_that_cannot_build_falls_back_with_a_warning(tmp_path, monkeypatch):
    """Without a compiler, training says why once and runs the experts in Python."""
    from nanoseek.kernels import experts_library
    from nanoseek.model import moe as M

    with _without_compiler(monkeypatch, tmp_path, experts_library, M.expert_kernel_builds):
        with pytest.warns(UserWarning, match="install a C\\+\\+ compiler.*Python loop"):
            assert M._expert_loop(torch.zeros(1), torch.float32) is M._ExpertLoop


@contextlib.contextmanager
def _without_compiler(monkeypatch, tmp_path, *cached):
    """No compiler and an empty kernel cache, with the `cached` lookups forgotten before and
    after (so the next test builds or loads the real kernels)."""
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    for fn in cached:
        fn.cache_clear()
    try:
        yield
    finally:
        for fn in cached:
            fn.cache_clear()


def test_fused_expert_loop_runs_in_inference_mode_on_two_threads():
    """The engine's prefill runs the model in inference mode: the threads the experts are
    shared out to must run in it too (in-place writes to inference tensors fail outside)."""
    from nanoseek.model import moe as M

    torch.manual_seed(3)
    layer = M.MoE(nanoseek.get_preset("tiny"))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(64, layer.gate.weight.shape[1])
    assert M._expert_loop(x, torch.float32) is M._FusedExpertLoop
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(layer(x))
    finally:
        torch.set_num_threads(before)
    assert (outs[0] - outs[1]).abs().max() <= 1e-6 * outs[0].abs().max()


@pytest.mark.parametrize("V", [300, 8197])  # 8197: a tail after the vectors
def test_softmax_xent_equals_torch(V):
    """loss.cpp on a chunk of logits: each row's loss is F.cross_entropy's and the row
    becomes softmax - one_hot, in fp32 (to ~1e-6) and bf16 (the same probabilities, rounded
    once: within one bf16 step); a target outside the vocabulary is refused."""
    from nanoseek.kernels import loss_library

    loss_library()
    torch.manual_seed(0)
    x, t = torch.randn(37, V) * 4, torch.randint(0, V, (37,))
    for dtype in (torch.float32, torch.bfloat16):
        logits = x.to(dtype)
        want_loss = F.cross_entropy(logits.float(), t, reduction="none")
        want = logits.float().softmax(-1)
        want[torch.arange(37), t] -= 1
        got = logits.clone()
        loss = torch.ops.nanoseek.softmax_xent_(got, t)
        assert loss.dtype == torch.float32 and (loss - want_loss).abs().max() < 2e-5
        if dtype == torch.float32:
            assert (got - want).abs().max() < 1e-6
        else:
            err = (got.float() - want.to(dtype).float()).abs()
            assert err.max() <= 2**-8 * want.abs().max()  # one bf16 step at the largest value
            assert (err > 0).float().mean() < 0.01  # nearly every value rounds the same
    with pytest.raises(RuntimeError, match="targets must lie"):
        torch.ops.nanoseek.softmax_xent_(x.clone(), torch.full((37,), V))


def test_loss_kernel_that_cannot_build_falls_back_with_a_warning(tmp_path, monkeypatch):
    """Without a compiler, the loss says why once and runs in torch ops: the same value."""
    from nanoseek.kernels import loss_library
    from nanoseek.model import loss as L

    h, w = torch.randn(20, 8), torch.randn(50, 8)
    t = torch.randint(0, 50, (20,))
    want = L.linear_cross_entropy(h, w, t)
    with _without_compiler(monkeypatch, tmp_path, loss_library, L.kernel_builds):
        with pytest.warns(UserWarning, match="install a C\\+\\+ compiler.*torch ops"):
            assert not L._use_kernel(h)
        assert abs(L.linear_cross_entropy(h, w, t) - want) < 1e-5
