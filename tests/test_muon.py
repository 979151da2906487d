"""`--optimizer muon`: Newton-Schulz orthogonalisation, the step against torch.optim.Muon and
AdamW, and a training run that learns and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from nanoseek.config import get_preset
from nanoseek.model import Transformer
from nanoseek.train.muon import MuonAdamW, muon_parameters, orthogonalize
from nanoseek.train.run import build_optimizer


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (32, 32)])
def test_orthogonalize_flattens_the_spectrum(shape):
    torch.manual_seed(0)
    # singular values spread over 2 decades: 5 quintic steps lift those above ~1e-3 of the
    # largest (a random square matrix has some below; they stay small)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n)))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n)))
    g = u @ torch.diag(torch.logspace(-2, 0, min(m, n))) @ v.T
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.5  # quintic NS: about [0.7, 1.2], not exactly 1


def test_orthogonalize_treats_each_expert_matrix_apart():
    torch.manual_seed(0)
    g = torch.randn(4, 24, 8)
    g[2] *= 100  # one expert's scale does not leak into the others
    torch.testing.assert_close(orthogonalize(g), torch.stack([orthogonalize(m) for m in g]))


def test_muon_and_adamw_steps_equal_torchs():
    """Two steps of our optimizer on a matrix (Muon) and a vector (AdamW) equal torch.optim.Muon
    (nesterov, Moonshot's match_rms_adamw scaling) and torch.optim.AdamW. torch iterates in
    bf16, we in fp32 (the same iteration run in fp32 agrees to 6e-7): the updates agree to a
    few percent of their mean size."""
    torch.manual_seed(0)
    w, v = torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16))
    w2, v2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, v))
    w0 = w.detach().clone()
    ours = MuonAdamW(
        [{"params": [w], "muon": True, "weight_decay": 0.1}, {"params": [v], "weight_decay": 0.0}],
        lr=0.02,
        betas=(0.9, 0.95),
    )
    ref_muon = torch.optim.Muon([w2], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adamw = torch.optim.AdamW([v2], lr=0.02, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    for _ in range(2):
        g_w, g_v = torch.randn(24, 16), torch.randn(16)
        w.grad, w2.grad, v.grad, v2.grad = g_w, g_w.clone(), g_v, g_v.clone()
        ours.step()
        ref_muon.step()
        ref_adamw.step()
    moved = (w - w0).abs().mean()
    assert moved > 1e-3
    torch.testing.assert_close(w - w0, w2 - w0, rtol=0, atol=0.06 * moved.item())
    torch.testing.assert_close(v, v2)


def test_muon_takes_the_block_matrices_and_leaves_the_rest_to_adamw():
    model = Transformer(get_preset("tiny"))
    muon, rest = muon_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(p.dim() == 3 for p in muon)  # the stacked routed experts
    assert all(p.dim() >= 2 for p in muon)
    rest_names = {names[id(p)] for p in rest}
    assert {"embed.weight", "head.weight", "layers.1.ffn.gate.weight"} <= rest_names
    opt = build_optimizer(model, 1e-3, 0.1, kind="muon")
    assert sum(len(g["params"]) for g in opt.param_groups if g["muon"]) == len(muon)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, 1e-3, 0.1, kind="sgd")


def test_training_with_muon_learns_and_resumes_exactly(tmp_path, monkeypatch):
    from test_train import learns_and_resumes_exactly  # noqa: PLC0415

    saved = learns_and_resumes_exactly(tmp_path, monkeypatch, optimizer="muon")
    assert saved["optimizer"] == "muon"  # and the Muon momenta came back exactly
