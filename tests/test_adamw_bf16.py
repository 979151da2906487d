"""`--optim-states bf16`: AdamW with bf16 moments (DeepSeek-V3's low-precision optimizer
states). The C++ step against the torch-ops reference, the optimizer against torch's fp32
AdamW, the clipping folded into it, and a training run that learns and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.kernels import cpu_supported
from nanoseek.model import Transformer
from nanoseek.train import TrainError, make_config
from nanoseek.train.adamw import BF16AdamW, kernel_builds, reference_step
from nanoseek.train.run import build_optimizer

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.mark.skipif(not cpu_supported(), reason="the C++ kernels need an x86 CPU with AVX2")
def test_kernel_step_equals_the_reference():
    """Five steps on tensors whose sizes leave vector and block tails, with a grad_scale: the
    kernel fuses multiply-adds the reference rounds apart, so a moment may land one bf16 ulp
    away where the fp32 value sits on a rounding boundary; the parameters agree to a small
    fraction of the distance they moved."""
    assert kernel_builds()
    torch.manual_seed(0)
    shapes = [(3, 5), (1000,), (40, 1031), (7,)]
    ps = [torch.randn(s) for s in shapes]
    p0 = [p.clone() for p in ps]
    ref = [p.clone() for p in ps]
    ms = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    vs, mr, vr = ([m.clone() for m in ms] for _ in range(3))
    scale = torch.tensor(1.7)
    for t in range(1, 6):
        gs = [torch.randn(s) for s in shapes]
        torch.ops.nanoseek.adamw_bf16_(ps, gs, ms, vs, [t] * 4, *HYPER.values(), scale)
        for p, g, m, v in zip(ref, gs, mr, vr, strict=True):
            reference_step(p, g, m, v, t, *HYPER.values(), scale)
    for p, r, start, m, m_ref, v, v_ref in zip(ps, ref, p0, ms, mr, vs, vr, strict=True):
        moved = (r - start).abs().mean().item()
        assert moved > 1e-3
        torch.testing.assert_close(p, r, rtol=0, atol=0.02 * moved)
        for a, b in ((m, m_ref), (v, v_ref)):
            assert a.dtype == torch.bfloat16
            # one bf16 ulp of the moments' scale (~1: unit-variance gradients)
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=2**-8)
            assert (a != b).float().mean() < 0.01  # nearly all moments bit-equal


def test_tracks_torchs_fp32_adamw():
    """Fifty steps on one matrix: the bf16 moments' rounding moves the weights by well under a
    percent of the distance torch's AdamW (fp32 moments, fused) moved them."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(64, 96))
    w2, w0 = torch.nn.Parameter(w.detach().clone()), w.detach().clone()
    ours = BF16AdamW([w], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([w2], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    drift = torch.randn(64, 96)  # a direction to move in, and noise around it
    for _ in range(50):
        g = drift + 0.5 * torch.randn(64, 96)
        w.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    state = ours.state[w]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    moved = (w2 - w0).abs().mean().item()
    assert moved > 0.02
    assert (w - w2).abs().max().item() < 0.01 * moved


def test_grad_scale_divides_the_gradients():
    """The runtime folds clipping into the step: a grad_scale of s equals gradients / s."""
    torch.manual_seed(2)
    a, b = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300))
    b.data.copy_(a.data)
    oa, ob = (BF16AdamW([p], lr=1e-2, weight_decay=0.1) for p in (a, b))
    g = torch.randn(300)
    a.grad, b.grad = g * 3, g.clone()
    oa.grad_scale = torch.tensor(3.0)
    oa.step()
    ob.step()
    torch.testing.assert_close(a, b)


def test_load_state_dict_keeps_bf16_moments():
    """torch's load_state_dict casts states to the parameter's dtype; the next step casts them
    back (exactly: bf16 -> fp32 -> bf16) and goes on as an uninterrupted optimizer would."""
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(32, 32))
    w2 = torch.nn.Parameter(w.detach().clone())
    o1, o2 = BF16AdamW([w], lr=1e-2), BF16AdamW([w2], lr=1e-2)
    grads = [torch.randn(32, 32) for _ in range(4)]
    for g in grads[:2]:
        w.grad, w2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    o3 = BF16AdamW([w2], lr=1e-2)
    o3.load_state_dict(o2.state_dict())
    assert o3.state[w2]["exp_avg"].dtype == torch.float32  # torch's cast on load
    for g in grads[2:]:
        w.grad, w2.grad = g.clone(), g.clone()
        o1.step()
        o3.step()
    assert o3.state[w2]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(w, w2)


def test_bad_settings_are_refused():
    model = Transformer(get_preset("tiny"))
    with pytest.raises(ValueError, match="beta2 <= 0.99"):
        build_optimizer(model, 1e-3, 0.1, betas=(0.9, 0.999), states="bf16")
    with pytest.raises(ValueError, match="for adamw, not muon"):
        build_optimizer(model, 1e-3, 0.1, kind="muon", states="bf16")
    with pytest.raises(ValueError, match="unknown optimizer state dtype"):
        build_optimizer(model, 1e-3, 0.1, states="fp8")
    with pytest.raises(TrainError, match="beta2 <= 0.99"):
        make_config(data="x", steps=1, optim_states="bf16", beta2=0.999)
    with pytest.raises(TrainError, match="optim_states must be fp32 or bf16"):
        make_config(data="x", steps=1, optim_states="int8")


def test_training_with_bf16_states_learns_and_resumes_exactly(tmp_path, monkeypatch):
    from test_train import learns_and_resumes_exactly  # noqa: PLC0415

    saved = learns_and_resumes_exactly(tmp_path, monkeypatch, optim_states="bf16")
    assert saved["optim_states"] == "bf16"  # and the bf16 moments came back exactly
