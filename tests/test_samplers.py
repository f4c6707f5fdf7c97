"""Samplers against exact answers: the Gaussian-mixture oracle's probability-flow ODE has a reference solution
that a tight adaptive solve reaches, and its mean, covariance and component weights are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.samplers import (SAMPLER_INFO, SAMPLERS, NFECounter, exact_denoiser_calls, get_sigmas,
                              sample_rk45)

ODE = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ddim"]
SDE = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "pc", "ald"]
# Empirical global order on the oracle. dpmpp_3m is a 3rd-order method whose first two (warm-up) steps are of
# order 1 and 2, which caps its global order at 2 in the asymptotic range measured here; UniPC's corrector
# lifts its warm-up steps too, so it reaches 3.
EXPECTED_ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2, "dpmpp_3m": 2, "unipc": 3, "ipndm": 3}


@pytest.fixture(scope="module")
def oracle():
    return GaussianMixtureDenoiser.random(k=4, shape=(1, 2, 2), std=0.3, seed=0)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(16, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(oracle, noise):
    with exact_denoiser_calls():
        return sample_rk45(oracle, noise * 80, get_sigmas("logsnr", 4, 0.002, 80.0, endpoint=True), rtol=1e-10,
                           atol=1e-10)


def _rms(a, b) -> float:
    return float((a - b).pow(2).mean().sqrt())


def test_every_sampler_is_registered_with_a_docstring_naming_its_paper():
    for name, info in SAMPLER_INFO.items():
        assert SAMPLERS[name] is info.fn
        doc = info.fn.__doc__ or ""
        assert any(ch.isdigit() for ch in doc), f"{name}: docstring should cite a paper (author, year)"


@pytest.mark.parametrize("name", ODE)
def test_ode_sampler_converges_with_its_order(name, oracle, noise, reference):
    errs = []
    with exact_denoiser_calls():
        for n in (32, 64, 128):
            # endpoint=True: every step is the solver's own (the default grid's final denoise from one log-SNR
            # step above σ_min is first order by design, see get_sigmas)
            x = SAMPLERS[name](oracle, noise * 80, get_sigmas("logsnr", n, 0.002, 80.0, endpoint=True))
            errs.append(_rms(x, reference))
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    want = EXPECTED_ORDER[name]
    assert errs[-1] < 2e-2
    assert min(slopes) > want - 0.35, (name, errs, slopes)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m"])
def test_dpmpp_heun_solver_type_is_second_order_and_another_method(name, oracle, noise, reference):
    """solver_type="heun" (the DPM-Solver code's Taylor form of the order-2 step): the same order as the midpoint
    form, different numbers; an unknown type is refused."""
    errs = []
    with exact_denoiser_calls():
        for n in (32, 64, 128):
            g = get_sigmas("logsnr", n, 0.002, 80.0, endpoint=True)
            x = SAMPLERS[name](oracle, noise * 80, g, solver_type="heun")
            errs.append(_rms(x, reference))
        mid = SAMPLERS[name](oracle, noise * 80, get_sigmas("logsnr", 8, 0.002, 80.0))
        heun = SAMPLERS[name](oracle, noise * 80, get_sigmas("logsnr", 8, 0.002, 80.0), solver_type="heun")
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert min(slopes) > 2 - 0.35, (errs, slopes)
    assert 1e-8 < _rms(mid, heun) < 0.1
    with pytest.raises(ValueError, match="solver_type"):
        SAMPLERS[name](oracle, noise * 80, get_sigmas("logsnr", 4, 0.002, 80.0), solver_type="taylor")


def test_rk45_reaches_its_tolerance(oracle, noise, reference):
    c = NFECounter(oracle)
    with exact_denoiser_calls():
        x = sample_rk45(c, noise * 80, get_sigmas("karras", 3, 0.002, 80.0), rtol=1e-7, atol=1e-7)
    assert _rms(x, reference) < 1e-4
    assert c.nfe > 20


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "rk45"])
def test_deterministic_samplers_integrate_increasing_grids(name, oracle):
    """ODE inversion (diffcli.encode): from data at σ = 0.05 up to σ = 20, against a tight forward solve."""
    x0 = oracle.sample(8, torch.Generator().manual_seed(1))
    with exact_denoiser_calls():
        ref = sample_rk45(oracle, x0, torch.tensor([0.05, 20.0]), rtol=1e-10, atol=1e-10)
        up = get_sigmas("logsnr", 64, 0.05, 20.0, endpoint=True)[:-1].flip(0)
        x = SAMPLERS[name](oracle, x0, up)
    assert SAMPLER_INFO[name].invertible or name == "ipndm"  # fine on 64 levels; unstable on few (its docstring)
    assert _rms(x, ref) < (0.5 if name in ("ddim", "euler") else 0.05), name
    assert _rms(x, ref) < 0.1 * float(ref.pow(2).mean().sqrt())


@pytest.mark.parametrize("name", SDE)
def test_stochastic_samplers_refuse_increasing_grids(name, oracle):
    with pytest.raises(ValueError):
        SAMPLERS[name](oracle, torch.zeros(2, 1, 2, 2), torch.tensor([0.1, 1.0, 2.0]))


@pytest.mark.parametrize("name", list(SAMPLER_INFO))
def test_nfe_accounting_is_exact(name, oracle, noise):
    info = SAMPLER_INFO[name]
    if info.adaptive:
        with pytest.raises(ValueError):
            info.steps_for_nfe(10)
        return
    for budget in (3, 7, 12):
        steps = info.steps_for_nfe(budget)
        if steps == 0:
            assert info.nfe(1) > budget
            continue
        c = NFECounter(oracle)
        SAMPLERS[name](c, noise[:2] * 80, get_sigmas("karras", steps, 0.002, 80.0),
                       generator=torch.Generator().manual_seed(0))
        assert c.nfe == info.nfe(steps) <= budget
        assert info.nfe(steps + 1) > budget


def test_heun_nfe_counts_two_per_step_but_none_extra_on_the_last():
    info = SAMPLER_INFO["heun"]
    assert [info.nfe(n) for n in (1, 2, 18)] == [1, 3, 35]
    assert info.steps_for_nfe(35) == 18 and info.steps_for_nfe(36) == 18
    assert SAMPLER_INFO["pc"].nfe(10, corrector_steps=2) == 28
    assert SAMPLER_INFO["ald"].nfe(10, n_steps_each=3) == 31


def _component_share(oracle, x):
    """Fraction of samples nearest each component mean (components are well separated at std 0.1)."""
    k = torch.cdist(x.reshape(len(x), -1), oracle.means).argmin(1)
    return torch.bincount(k, minlength=oracle.num_classes).double() / len(x)


@pytest.mark.parametrize("name,steps,opts", [
    ("ddpm", 100, {}), ("euler_ancestral", 100, {}), ("dpmpp_2m_sde", 50, {}),
    ("pc", 60, {"snr": 0.05}), ("ald", 60, {}), ("ddim", 50, {"eta": 0.5}),
])
def test_stochastic_samplers_reproduce_the_mixture(name, steps, opts):
    gm = GaussianMixtureDenoiser.random(k=3, shape=(1, 1, 2), std=0.1, seed=3, spread=1.0, sigma_max=20.0)
    n = 2000
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 1, 1, 2, generator=g, dtype=torch.float64) * 20.0
    schedule = "logsnr" if name == "ald" else "karras"  # ALD anneals geometrically (Song & Ermon 2019)
    out = SAMPLERS[name](gm, x, get_sigmas(schedule, steps, 0.002, 20.0), generator=g, **opts)
    mean, cov = gm.mean_cov()
    flat = out.reshape(n, -1)
    assert (flat.mean(0) - mean).abs().max() < 0.05, name
    assert (torch.cov(flat.T) - cov).abs().max() < 0.06, name
    assert (_component_share(gm, out) - gm.weights).abs().max() < 0.04, name


def test_per_row_generators_make_rows_independent_of_the_batch(oracle):
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]  # noqa: E731
    x = torch.stack([torch.randn(1, 2, 2, generator=g, dtype=torch.float64) for g in gens()]) * 80
    sig = get_sigmas("karras", 10, 0.002, 80.0)
    for name in ("dpmpp_2m_sde", "pc", "euler_ancestral"):
        full = SAMPLERS[name](oracle, x, sig, generator=gens())
        part = SAMPLERS[name](oracle, x[2:], sig, generator=gens()[2:])
        assert torch.allclose(full[2:], part), name


# dpmpp_3m 0.74831484 → 0.58307495 on purpose: lower_order_final and the 2M update on its order-2 steps.
# Golden numbers: the RMS of each full loop's output for a fixed oracle, noise and seed. A change here is a
# change in what users get; update only on purpose.
GOLDEN = {
    "ddpm": 0.20684101, "ddim": 0.23466548, "euler": 0.23466548, "euler_ancestral": 0.20684101,
    "heun": 0.75843982, "dpmpp_2m": 0.41342675, "dpmpp_3m": 0.58307495, "dpmpp_2m_sde": 0.37724438,
    "unipc": 0.43383690, "ipndm": 0.25047143, "pc": 0.72389388, "ald": 19.35009532, "rk45": 0.41634212,
}


def _golden_value(name, oracle, noise) -> float:
    gens = [torch.Generator().manual_seed(i) for i in range(len(noise))]
    out = SAMPLERS[name](oracle, noise * 80, get_sigmas("karras", 6, 0.002, 80.0), generator=gens)
    return float(out.pow(2).mean().sqrt())


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_numbers(name, oracle, noise):
    assert _golden_value(name, oracle, noise) == pytest.approx(GOLDEN[name], rel=1e-5)


def test_tuned_grid_beats_its_start_and_is_stored_beside_the_checkpoint(tmp_path):
    from diffcli.samplers import tuned_schedule_path
    from diffcli.tuning import load_tuned_solver, save_tuned_solver, tune_grid

    gm = GaussianMixtureDenoiser.random(k=8, shape=(1, 2, 2), std=0.05, seed=2)
    sig, rec = tune_grid(gm, "dpmpp_2m", 6, 0.002, 80.0, (1, 2, 2), draws=128, evals=150, schedule="karras",
                         exact=True)
    assert rec["kept"] == "tuned" and rec["rms_after"] < 0.7 * rec["rms_before"], rec
    assert len(sig) == 7 and float(sig[0]) == 80.0 and float(sig[-1]) == 0.0 and bool((sig[1:] < sig[:-1]).all())
    # other noise than it was fitted on: the tuned grid still beats its start
    x = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(99), dtype=torch.float64) * 80
    with exact_denoiser_calls():
        ref = sample_rk45(gm, x, get_sigmas("karras", 2, 0.002, 80.0), rtol=1e-9, atol=1e-9)
        base = _rms(SAMPLERS["dpmpp_2m"](gm, x, get_sigmas("karras", 6, 0.002, 80.0)), ref)
        assert _rms(SAMPLERS["dpmpp_2m"](gm, x, sig), ref) < base
    ck = tmp_path / "model.safetensors"
    ck.write_bytes(b"not touched")
    side = tuned_schedule_path(ck)
    assert side.name == "model.schedules.safetensors"
    save_tuned_solver(side, "dpmpp_2m", 6, sig, {"rms_after": rec["rms_after"]})
    grid, solver = load_tuned_solver(side, "dpmpp_2m", 6)
    assert torch.equal(grid, sig) and solver is None
    assert load_tuned_solver(side, "dpmpp_2m", 5) is None
    assert ck.read_bytes() == b"not touched"


def test_tuned_grid_of_one_call_is_its_start():
    """One call level (at the fixed start σ_0) leaves nothing to move."""
    from diffcli.tuning import tune_grid

    gm = GaussianMixtureDenoiser.random(k=4, shape=(1, 2, 2), std=0.05, seed=1)
    sig, rec = tune_grid(gm, "unipc", 1, 0.002, 80.0, (1, 2, 2), draws=32, evals=50, exact=True)
    assert rec["kept"] == "start" and rec["evals"] == 0
    assert torch.equal(sig, get_sigmas("logsnr_leading_ms", 1, 0.002, 80.0))


def test_sample_cli_sampler_errors_exit_2_with_one_line(tiny_ckpt, tmp_path, capsys):
    from diffcli.cli import main

    cases = [
        (["--sampler", "nope"], "--sampler"), (["--schedule", "foo"], "--schedule"),
        (["--sampler", "heun", "--eta", "0.5"], "--eta"), (["--sampler", "ddim", "--eta", "1.5"], "--eta"),
        (["--sampler", "pc", "--snr", "2"], "--snr"), (["--sampler", "heun", "--s-churn", "-1"], "--s-churn"),
        (["--sampler", "ald", "--nfe", "3"], "--nfe"), (["--sampler", "rk45", "--nfe", "10"], "--nfe"),
        (["--sampler", "dpmpp_2m", "--nfe", "5", "--schedule", "tuned"], "--schedule tuned"),
        (["--sampler", "pc", "--schedule", "tuned", "--steps", "4"], "--schedule tuned"),
        (["--sampler", "euler", "--snr", "0.1"], "--snr"),
    ]
    for args, needle in cases:
        rc = main(["sample", str(tiny_ckpt), *args, "--n", "2", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)


def test_sample_cli_nfe_is_exact_in_sample_json(tiny_ckpt, tmp_path, capsys):
    import json

    from diffcli.cli import main

    for sampler, budget, want in (("heun", 6, 5), ("pc", 7, 7), ("unipc", 4, 4)):
        out = tmp_path / sampler
        assert main(["sample", str(tiny_ckpt), "--sampler", sampler, "--nfe", str(budget), "--n", "2",
                     "--out", str(out), "--device", "cpu"]) == 0
        assert json.loads((out / "sample.json").read_text())["nfe"] == want
    assert main(["sample", "--list"]) == 0
    assert "2N-1" in capsys.readouterr().out


def test_unipc_order_follows_the_step_size():
    from diffcli.samplers import unipc_order_for_step

    assert [unipc_order_for_step(h, 5) for h in (3.0, 2.6, 1.2, 0.6, 0.2)] == [1, 2, 3, 4, 5]
    assert unipc_order_for_step(0.2, 3) == 3 and unipc_order_for_step(1.2, 3) == 3
    orders = [unipc_order_for_step(h / 100, 5) for h in range(1, 400)]
    assert orders == sorted(orders, reverse=True)  # smaller steps never get a lower order


def test_default_logsnr_grid_and_b1_pay_off_at_few_steps():
    """The sampling default of `logsnr` (last denoise from one log-SNR step above σ_min, no call at σ_min) and
    UniPC's B1(h) = h: both more accurate at NFE 5 on a hard oracle, and no worse at NFE 10."""
    gm = GaussianMixtureDenoiser.random(k=16, shape=(1, 4, 4), std=0.02, seed=0)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    with exact_denoiser_calls():
        ref = sample_rk45(gm, x, get_sigmas("karras", 2, 0.002, 80.0), rtol=1e-9, atol=1e-9)
        for n in (5, 10):
            grid, old = get_sigmas("logsnr", n, 0.002, 80.0), get_sigmas("logsnr", n, 0.002, 80.0, endpoint=True)
            assert float(grid[-2]) > 0.002 and float(old[-2]) == pytest.approx(0.002)
            default = _rms(SAMPLERS["unipc"](gm, x, grid), ref)
            on_old_grid = _rms(SAMPLERS["unipc"](gm, x, old), ref)
            b2 = _rms(SAMPLERS["unipc"](gm, x, grid, variant="bh2"), ref)
            assert default < (0.7 if n == 5 else 1.05) * on_old_grid, (n, default, on_old_grid)
            assert default < (0.85 if n == 5 else 1.05) * b2, (n, default, b2)


def test_unipc_step_size_order_beats_fixed_order_on_a_hard_oracle():
    """Narrow components (std 0.02) make D change sharply in λ: fixed order 3 is then less accurate at 20 and 50
    steps than orders raised as the steps shrink, which in turn beats DPM-Solver++(2M); at 10 steps (h ≈ 1.2)
    the rule keeps order 3, so nothing changes there."""
    gm = GaussianMixtureDenoiser.random(k=16, shape=(1, 4, 4), std=0.02, seed=0)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    with exact_denoiser_calls():
        ref = sample_rk45(gm, x, get_sigmas("karras", 2, 0.002, 80.0), rtol=1e-9, atol=1e-9)
    for n in (10, 20, 50):
        g = get_sigmas("logsnr", n, 0.002, 80.0)
        new = _rms(SAMPLERS["unipc"](gm, x, g), ref)
        fixed = _rms(SAMPLERS["unipc"](gm, x, g, order=3, adaptive_order=False), ref)
        if n == 10:
            assert new == pytest.approx(fixed, rel=1e-9)
        else:
            assert new < 0.8 * fixed, (n, new, fixed)
            assert new < 0.7 * _rms(SAMPLERS["dpmpp_2m"](gm, x, g), ref), n


def test_dpmpp_3m_lower_order_final_pays_off_at_few_steps():
    """Below 15 steps the step before the final denoise runs at order 2 (DPM-Solver++'s trick): on a hard oracle
    at 5 steps it is clearly more accurate than third order there; from 15 steps on nothing changes."""
    gm = GaussianMixtureDenoiser.random(k=16, shape=(1, 4, 4), std=0.02, seed=0)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    with exact_denoiser_calls():
        ref = sample_rk45(gm, x, get_sigmas("karras", 2, 0.002, 80.0), rtol=1e-9, atol=1e-9)
        g5, g15 = get_sigmas("logsnr", 5, 0.002, 80.0), get_sigmas("logsnr", 15, 0.002, 80.0)
        lof = _rms(SAMPLERS["dpmpp_3m"](gm, x, g5), ref)
        assert lof < 0.8 * _rms(SAMPLERS["dpmpp_3m"](gm, x, g5, lower_order_final=False), ref)
        assert torch.equal(SAMPLERS["dpmpp_3m"](gm, x, g15), SAMPLERS["dpmpp_3m"](gm, x, g15, lower_order_final=False))


def test_logsnr_family_spacings():
    """logsnr ("trailing"), logsnr_leading and logsnr_linspace are one log-uniform family with different ends."""
    lo, hi = 0.002, 80.0
    trailing, leading, leading_ms, linspace = (get_sigmas(s, 10, lo, hi) for s in (
        "logsnr", "logsnr_leading", "logsnr_leading_ms", "logsnr_linspace"))
    assert torch.equal(linspace, get_sigmas("logsnr", 10, lo, hi, endpoint=True))
    step = math.log(hi / lo) / 11  # leading_ms: 11 log-SNR steps, calls on the 10 interior levels
    assert float(leading_ms[0]) == pytest.approx(hi * math.exp(-step)) and float(leading_ms[-2]) == pytest.approx(lo * math.exp(step))
    for g in (trailing, leading, leading_ms, linspace):
        assert len(g) == 11 and g[-1] == 0
        gaps = g[:-1].log().diff()
        assert torch.allclose(gaps, gaps[0].expand_as(gaps))
    assert float(trailing[0]) == pytest.approx(hi) and float(linspace[0]) == pytest.approx(hi)
    assert float(leading[0]) < hi and float(leading[-2]) == pytest.approx(lo) == float(linspace[-2])
    assert float(trailing[-2]) > lo


def test_unipc_list_description_names_its_default_variant():
    """`diffcli sample --list` said "bh2" while sample_unipc defaults to B1 (B2 only under guidance)."""
    import inspect

    from diffcli.samplers import SAMPLER_INFO, sample_unipc

    assert inspect.signature(sample_unipc).parameters["variant"].default == "bh1"
    desc = SAMPLER_INFO["unipc"].description
    assert "B1" in desc and "bh2," not in desc


# --- the Sampler contract from the outside: a plain function as the denoiser (DESIGN.md "Sampler") -------------
_MU, _S2 = 0.3, 0.25  # data N(μ, s²I): E[x0 | x] = μ + s²/(s²+σ²)·(x - μ)


def _gaussian_fn(seen: list):
    def denoise(x, sigma, cond=None):
        seen.append((x.dtype, x.ndim, sigma.dtype, tuple(sigma.shape) == (x.shape[0],), torch.is_grad_enabled()))
        return _MU + _S2 / (_S2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - _MU)
    return denoise


@pytest.mark.parametrize("name", list(SAMPLER_INFO))
def test_a_plain_function_denoiser_gets_the_contract_and_one_callback_per_step(name):
    seen, infos = [], []
    x = torch.randn(1, 2, 3, 5, generator=torch.Generator().manual_seed(0)) * 80  # float32, batch 1, not square
    sigmas = get_sigmas("karras", 4, 0.002, 80.0).tolist()  # a plain list of floats is a 1-D grid too
    out = SAMPLERS[name](_gaussian_fn(seen), x, sigmas, generator=torch.Generator().manual_seed(1),
                         callback=infos.append)
    assert out.shape == x.shape and not out.requires_grad and torch.isfinite(out).all()
    assert set(seen) == {(torch.float32, 4, torch.float32, True, False)}
    # the last callback's nfe is every denoiser call (rk45 left out its final denoise); one callback per step
    # of the grid (ald called it only once, at its final denoise) except for the adaptive solver
    assert infos[-1]["nfe"] == len(seen)
    if not SAMPLER_INFO[name].adaptive:
        assert [d["i"] for d in infos] == [0, 1, 2, 3] and len(seen) == SAMPLER_INFO[name].nfe(4)


@pytest.mark.parametrize("name", list(SAMPLER_INFO))
def test_non_finite_sigmas_are_a_value_error(name):
    """σ0 = ∞ passed the order checks: NaN samples from most samplers, an endless solve from rk45."""
    for bad in ([math.inf, 1.0, 0.0], [10.0, math.nan, 0.0]):
        with pytest.raises(ValueError, match="finite"):
            SAMPLERS[name](_gaussian_fn([]), torch.zeros(1, 1, 2, 2), torch.tensor(bad))


@pytest.mark.parametrize("name,opts", [
    ("ipndm", {"max_order": 0}),  # kept every earlier slope ([-0:] is the whole list), silently
    ("unipc", {"order": 0}), ("unipc", {"order": 6}),  # linalg / KeyError deep inside
    ("ddim", {"eta": 1.5}), ("euler_ancestral", {"eta": -0.1}), ("dpmpp_2m_sde", {"s_noise": -1.0}),
    ("heun", {"s_churn": -1.0}), ("pc", {"snr": 0.0}), ("ald", {"n_steps_each": 0}), ("rk45", {"rtol": 0.0}),
])
def test_out_of_range_options_are_a_value_error_in_python_too(name, opts):
    with pytest.raises(ValueError, match=next(iter(opts))):
        SAMPLERS[name](_gaussian_fn([]), torch.zeros(1, 1, 2, 2), get_sigmas("karras", 3, 0.002, 80.0), **opts)


@pytest.mark.parametrize("args,kw,match", [
    (("karras", 5, 0.002, math.inf), {}, "sigma_max"),  # was a grid of NaNs
    (("logsnr", 5, 0.002, math.inf), {}, "sigma_max"),
    (("karras", 5, 0.002, 80.0), {"rho": 0.0}, "rho"),  # was ZeroDivisionError
    (("karras", 5, 0.002, 80.0), {"rho": -1.0}, "rho"),
    (("karras", 2.5, 0.002, 80.0), {}, "integer"),  # was linspace's TypeError
    (("karras", True, 0.002, 80.0), {}, "integer"),
    (("karras", 0, 0.002, 80.0), {}, "n ≥ 1"),
    (("nope", 5, 0.002, 80.0), {}, "unknown schedule"),
])
def test_get_sigmas_refuses_bad_arguments_with_a_value_error(args, kw, match):
    with pytest.raises(ValueError, match=match):
        get_sigmas(*args, **kw)


def test_get_sigmas_takes_any_integer_n():
    import numpy as np

    for n in (np.int64(5), torch.tensor(5)):
        g = get_sigmas("karras", n, 0.002, 80.0)
        assert len(g) == 6 and float(g[0]) == pytest.approx(80.0) and g[-1] == 0
