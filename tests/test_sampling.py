"""The foundation's samplers on the Gaussian-mixture oracle, and per-sample seeding through the engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffcli.checkpoint import load_checkpoint
from diffcli.generate import SampleSettings, generate
from diffcli.processes import make_process
from diffcli.samplers import SAMPLERS, get_sigmas


def _moments_match(gm, x, tol_mean=0.06, tol_cov=0.08):
    m, c = gm.mean_cov()
    xf = x.reshape(len(x), -1).double()
    em, ec = xf.mean(0), torch.cov(xf.T)
    assert (em - m).abs().max() < tol_mean, (em, m)
    assert (ec - c).abs().max() < tol_cov, (ec, c)


@pytest.fixture
def vp():
    return make_process("vp_linear")


def test_ddpm_1000_steps_matches_mixture(gm, vp):
    sig = get_sigmas("uniform", 1000, vp.sigma_min, vp.sigma_max, process=vp)
    assert len(sig) == 1001 and torch.allclose(sig[:-1].flip(0), vp.log_sigmas.exp())  # exactly DDPM's grid
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, *gm.shape, generator=g, dtype=torch.float64) * sig[0]
    out = SAMPLERS["ddpm"](gm, x, sig, generator=g)
    _moments_match(gm, out)


def test_ddim_200_steps_matches_mixture(gm, vp):
    sig = get_sigmas("uniform", 200, vp.sigma_min, vp.sigma_max, process=vp)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, *gm.shape, generator=g, dtype=torch.float64) * sig[0]
    out = SAMPLERS["ddim"](gm, x, sig, eta=0.0)
    _moments_match(gm, out)
    # component weights: nearest-mean assignment reproduces the mixture weights
    k = torch.cdist(out.reshape(len(out), -1), gm.means).argmin(1)
    share = torch.bincount(k, minlength=gm.num_classes).double() / len(k)
    assert (share - gm.weights).abs().max() < 0.04


def test_ddim_eta1_equals_ddpm_posterior(gm, vp):
    sig = get_sigmas("uniform", 50, vp.sigma_min, vp.sigma_max, process=vp)
    x = torch.randn(8, *gm.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sig[0]
    a = SAMPLERS["ddim"](gm, x, sig, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = SAMPLERS["ddpm"](gm, x, sig, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_ddim_is_euler_and_deterministic(gm):
    sig = get_sigmas("karras", 20, 0.002, 80.0)
    x = torch.randn(16, *gm.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    a = SAMPLERS["ddim"](gm, x, sig)
    assert torch.equal(a, SAMPLERS["euler"](gm, x, sig))
    assert torch.equal(a, SAMPLERS["ddim"](gm, x, sig))


def test_schedules_shape_and_order():
    for name in ("karras", "logsnr", "linear"):
        s = get_sigmas(name, 10, 0.002, 80.0, endpoint=True)
        assert len(s) == 11 and s[-1] == 0 and abs(float(s[0]) - 80) < 1e-9 and abs(float(s[-2]) - 0.002) < 1e-12
        assert (s[1:] < s[:-1]).all()
    # the sampling default of logsnr: 11 levels uniform in log σ from 80 to 0.002, the last one replaced by 0
    s = get_sigmas("logsnr", 10, 0.002, 80.0)
    assert len(s) == 11 and s[-1] == 0 and float(s[0]) == pytest.approx(80)
    assert float(s[-2]) == pytest.approx(0.002 * (80 / 0.002) ** 0.1)
    assert torch.allclose(s[:-1].log().diff(), torch.full((9,), -math.log(80 / 0.002) / 10, dtype=torch.float64))
    with pytest.raises(ValueError):
        get_sigmas("nope", 10, 0.002, 80.0)


def test_image_depends_only_on_seed_and_index(tiny_ckpt):
    """Image i is the same whether sampled with batch size 1 or 16, alone or among others (stochastic sampler)."""
    ck = load_checkpoint(tiny_ckpt)
    s16 = SampleSettings(sampler="ddpm", steps=6, n=16, batch_size=16, seed=7, cfg=1.5)
    s1 = SampleSettings(sampler="ddpm", steps=6, n=16, batch_size=1, seed=7, cfg=1.5)
    a, _ = generate(ck.denoiser, 1, 8, s16, device=torch.device("cpu"), show_progress=False)
    b, _ = generate(ck.denoiser, 1, 8, s1, device=torch.device("cpu"), show_progress=False)
    assert torch.allclose(a, b, atol=1e-5)
    part, _ = generate(ck.denoiser, 1, 8, s16, device=torch.device("cpu"), indices=range(5, 9), show_progress=False)
    assert torch.allclose(part, a[5:9], atol=1e-5)
    c, _ = generate(ck.denoiser, 1, 8, SampleSettings(sampler="ddpm", steps=6, n=16, seed=8, cfg=1.5),
                    device=torch.device("cpu"), show_progress=False)
    assert not torch.allclose(a, c)
    au8 = ((a.clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    bu8 = ((b.clamp(-1, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    assert (au8 != bu8).mean() < 0.01


def test_cfg_scale_one_is_conditional(tiny_ckpt):
    from diffcli.guidance import Conditioned

    d = load_checkpoint(tiny_ckpt).denoiser
    x = torch.randn(4, 1, 8, 8)
    s = torch.full((4,), 2.0)
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.allclose(Conditioned(d, y, 1.0)(x, s), d(x, s, y))
        g0 = Conditioned(d, y, 0.0)(x, s)
        assert torch.allclose(g0, d(x, s, None), atol=1e-5)  # s = 0 is the unconditional model


def test_adaptive_sampler_reports_its_grid_ends_not_steps(tiny_ckpt, tmp_path):
    """rk45 uses only the grid's ends: sample.json marks it adaptive, the summary names the σ range, and the
    NFE is the count of its own calls."""
    from conftest import run_cli

    out = tmp_path / "rk"
    r = run_cli("sample", tiny_ckpt, "--sampler", "rk45", "--n", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "sample.json").read_text())
    assert rec["adaptive"] is True and rec["steps"] is None and rec["nfe"] > 3
    assert len(rec["sigmas"]) == 3 and rec["sigmas"][-1] == 0  # σ_max, σ_min, then the final denoise
    assert "rk45 (adaptive" in r.stdout + r.stderr


def test_rk45_solves_each_image_alone_and_counts_every_batch(tiny_ckpt):
    """An adaptive solver's steps follow the error of what it integrates: each image's ODE is solved alone, so
    the batch size changes nothing, and `nfe` is the most calls any image took (not the last batch's)."""
    ck = load_checkpoint(tiny_ckpt)
    cpu = torch.device("cpu")
    kw = dict(sampler="rk45", steps=2, n=4, seed=3, options={"rtol": 1e-3, "atol": 1e-3})
    a, ra = generate(ck.denoiser, 1, 8, SampleSettings(batch_size=4, **kw), device=cpu, show_progress=False)
    b, rb = generate(ck.denoiser, 1, 8, SampleSettings(batch_size=3, **kw), device=cpu, show_progress=False)
    assert torch.equal(a, b)
    assert ra["nfe"] == rb["nfe"] and ra["nfe_mean"] == rb["nfe_mean"] and ra["nfe_mean"] <= ra["nfe"]
    one = [generate(ck.denoiser, 1, 8, SampleSettings(batch_size=1, **kw), device=cpu, indices=range(i, i + 1),
                    show_progress=False)[1]["nfe"] for i in range(4)]
    assert ra["nfe"] == max(one) and ra["nfe_total"] == sum(one)
