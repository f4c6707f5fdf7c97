"""Processes and parameterizations: float64 round trips, σ(t) ↔ t(σ), and the loss's minimiser."""

from __future__ import annotations

import pytest
import torch

from diffcli.denoiser import (PARAMETERIZATIONS, Denoiser, score_from_x0, target_from, x0_from, x0_from_score)
from diffcli.processes import PROCESSES, VPDiscrete, make_process

torch.manual_seed(0)


@pytest.mark.parametrize("name", PROCESSES)
def test_sigma_t_inverse(name):
    p = make_process(name)
    sig = torch.logspace(-2.5, 1.8, 200, dtype=torch.float64).clamp(p.sigma_min, p.sigma_max)
    back = p.sigma(p.t(sig))
    assert torch.allclose(back, sig, rtol=1e-9, atol=0)
    t = torch.linspace(p.t_min, p.t_max, 50, dtype=torch.float64)
    assert torch.allclose(p.t(p.sigma(t)), t, rtol=1e-9, atol=1e-9)


def test_vp_discrete_matches_ddpm_alphas():
    p = make_process("vp_linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    assert isinstance(p, VPDiscrete)
    sig = p.sigma(torch.arange(1000, dtype=torch.float64))
    assert torch.allclose(1 / (1 + sig**2), abar, rtol=1e-12)
    # the process state of VP is x / sqrt(1 + σ²) = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    s = sig[500]
    x = x0 + s * eps
    assert torch.allclose(p.c_in(s) * x, abar[500].sqrt() * x0 + (1 - abar[500]).sqrt() * eps)


def test_flow_state_is_interpolation():
    p = make_process("flow")
    t = torch.tensor(0.3, dtype=torch.float64)
    s = p.sigma(t)
    x0, eps = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    assert torch.allclose(p.c_in(s) * (x0 + s * eps), (1 - t) * x0 + t * eps)


@pytest.mark.parametrize("process", PROCESSES)
def test_parameterization_round_trips(process):
    """eps ↔ x0 ↔ v ↔ flow ↔ edm ↔ score are exact inverses in float64 at every σ of the process."""
    p = make_process(process)
    sig = torch.logspace(-2, 1.5, 9, dtype=torch.float64).clamp(p.sigma_min, p.sigma_max).reshape(-1, 1)
    x0 = torch.randn(9, 16, dtype=torch.float64)
    eps = torch.randn(9, 16, dtype=torch.float64)
    x = x0 + sig * eps
    alpha, sig_vp = 1 / (1 + sig**2).sqrt(), sig / (1 + sig**2).sqrt()
    known = {"eps": eps, "x0": x0, "v": alpha * eps - sig_vp * x0, "flow": eps - x0}
    for param in PARAMETERIZATIONS:
        tgt = target_from(param, x0, x, sig)
        if param in known:
            assert torch.allclose(tgt, known[param], atol=1e-9, rtol=1e-9), param
        assert torch.allclose(x0_from(param, tgt, x, sig), x0, atol=1e-9, rtol=1e-9), param
        for other in PARAMETERIZATIONS:  # convert through x0 to every other target and back
            o = target_from(other, x0_from(param, tgt, x, sig), x, sig)
            assert torch.allclose(x0_from(other, o, x, sig), x0, atol=1e-8, rtol=1e-8), (param, other)
    assert torch.allclose(x0_from_score(score_from_x0(x0, x, sig), x, sig), x0, atol=1e-9)
    assert torch.allclose(score_from_x0(x0, x, sig), -eps / sig, atol=1e-9)


class _OracleNet(torch.nn.Module):
    """A 'network' whose denoiser is the analytic mixture denoiser plus an optional perturbation δ·u."""

    def __init__(self, gm, denoiser_ref, sigma, delta=0.0, direction=None):
        super().__init__()
        self.gm, self.ref, self.sigma, self.delta, self.u = gm, denoiser_ref, sigma, delta, direction

    def forward(self, x_in, c_noise, labels=None):
        c_in, c_skip, c_out, _ = self.ref.scalings(self.sigma)
        x = x_in / c_in
        d = self.gm(x.double(), self.sigma.double())
        if self.delta:
            d = d + self.delta * self.u
        return ((d - c_skip * x) / c_out).float()


@pytest.mark.parametrize("process,param,weighting", [
    ("vp_linear", "eps", "natural"), ("vp_cosine", "v", "min_snr"), ("edm", "edm", "edm"),
    ("ve", "x0", "natural"), ("flow", "flow", "natural"), ("edm", "eps", "min_snr"),
])
def test_analytic_denoiser_minimises_loss(gm, process, param, weighting):
    """E[x0|x] minimises every weighted loss: any perturbation of it gives a higher loss on the same draws."""
    proc = make_process(process)
    g = torch.Generator().manual_seed(1)
    n = 4000
    x0 = gm.sample(n, g).float()
    sigma = proc.sample_sigma(n, g).clamp(0.05, 20.0)
    noise = torch.randn(x0.shape, generator=g)
    ref = Denoiser(torch.nn.Identity(), proc, param, weighting=weighting)
    losses = {}
    u = torch.randn(x0.shape, generator=g)
    for delta in (0.0, 0.05, -0.05):
        net = _OracleNet(gm, ref, sigma, delta, u)
        d = Denoiser(net, proc, param, weighting=weighting)
        losses[delta] = float(d.loss(x0, sigma=sigma, noise=noise).mean())
    assert losses[0.0] < losses[0.05] and losses[0.0] < losses[-0.05], losses
    # shifting the prediction by a constant also raises the loss
    net = _OracleNet(gm, ref, sigma, 0.05, torch.ones_like(u))
    assert losses[0.0] < float(Denoiser(net, proc, param, weighting=weighting).loss(x0, sigma=sigma, noise=noise).mean())


@pytest.mark.parametrize("name", PROCESSES)
def test_training_sigma_sampling_in_range(name):
    p = make_process(name)
    s = p.sample_sigma(1000, torch.Generator().manual_seed(0))
    assert s.shape == (1000,) and torch.isfinite(s).all() and (s > 0).all()
    if name.startswith("vp_"):
        assert len(torch.unique(s)) <= 1000 and float(s.max()) <= p.sigma_max * (1 + 1e-6)
