"""Samplers and σ schedules, written once against the Denoiser (DESIGN.md "Sampler" contract).

    SAMPLERS[name](denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x0

`sigmas` is 1-D, decreasing and ends with 0; `x` is noise·sigmas[0]. The integration state is float64; the
denoiser is called in float32 (EDM's `edm_sampler` does the same). `generator` is None, one torch.Generator,
or a list with one generator per batch row — the last makes every image depend only on its own seed,
whatever the batch size. `callback(info)` receives a dict with i, sigma, sigma_next, x, denoised, nfe, once
per step of the grid (rk45: once per denoiser call); the last one's nfe is the run's NFE. Out-of-range
options (SAMPLER_INFO[name].options) and non-finite σ raise ValueError.

In the VE convention x = x0 + σ·ε the probability-flow ODE is dx/dσ = (x - D(x, σ))/σ (Karras et al. 2022,
eq. 3 with s = 1), and a DDIM step from σ to σ' is x' = D + σ'·(x - D)/σ: DDIM (η = 0) *is* Euler in σ,
for every process (Karras et al. 2022, Sec. 3). With η > 0 the step splits σ' into a deterministic part
σ_down and fresh noise σ_up, σ_up = η·σ'·sqrt(σ² - σ'²)/σ, which is Song et al.'s σ_t(η) written in VE
units; η = 1 is DDPM's posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020).
"""

from __future__ import annotations

import math
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from .processes import Process, VPDiscrete

Generator = "torch.Generator | Sequence[torch.Generator] | None"


# --- plumbing ---------------------------------------------------------------------------------------------
def randn_like(x: Tensor, generator=None) -> Tensor:
    """Standard normal noise shaped like x (dtype of x). Drawn on the CPU from `generator` so that results do
    not depend on the device; a list of generators draws row i from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        z = torch.empty(x.shape)  # row j filled in place from generator j: the same numbers as randn
        for row, g in zip(z, generator):  # without a tensor per row and a stack (~15% of this loop)
            row.normal_(generator=g)
    else:
        z = torch.randn(x.shape, generator=generator)
    return z.to(device=x.device, dtype=x.dtype)


_NET_DTYPE = [torch.float32]


@contextmanager
def exact_denoiser_calls():
    """Within this block samplers call the denoiser in float64 instead of float32: only for analytic
    oracles (diffcli.oracle), so that reference solves in tests and benchmarks are not limited by float32."""
    _NET_DTYPE.append(torch.float64)
    try:
        yield
    finally:
        _NET_DTYPE.pop()


def _denoise(denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    """Call the denoiser in float32 with a (B,) σ and return float64 (the integration dtype), contiguous: a
    channels_last network's output would otherwise meet the contiguous state in every update (strided loops)."""
    dt = _NET_DTYPE[-1]
    s = sigma.to(dt).expand(x.shape[0]).contiguous()
    return denoiser(x.to(dt), s).to(torch.float64, memory_format=torch.contiguous_format)


class NFECounter:
    """Wraps a denoiser and counts its calls (one call = one network evaluation per sample)."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x: Tensor, sigma: Tensor, *args, **kw) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, *args, **kw)


def _callback(callback, i, sigmas, x, denoised, nfe) -> None:
    if callback is not None:
        callback({"i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x, "denoised": denoised,
                  "nfe": nfe})


def _check_sigmas(sigmas, device: torch.device | None = None) -> Tensor:
    """Sampling grids decrease and end with 0. Deterministic samplers also integrate the ODE forwards for
    inversion (diffcli.encode): an increasing grid that starts above 0. Any 1-D sequence of numbers is taken
    (a list as well as a tensor of any float dtype); the result is float64 on `device`."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=device)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be 1-D with at least 2 entries")
    if not bool(torch.isfinite(sigmas).all()):
        # σ = ∞ passes the order checks but gives NaN steps (or an endless rk45 solve from log ∞)
        bad = (~torch.isfinite(sigmas)).nonzero().flatten().tolist()
        raise ValueError(f"sigmas must be finite; entries {bad} are {sigmas[bad].tolist()}")
    if bool((sigmas[1:] < sigmas[:-1]).all()):
        if float(sigmas[-1]) != 0.0:
            raise ValueError("a decreasing sigma grid must end with 0")
    elif bool((sigmas[1:] > sigmas[:-1]).all()):
        if float(sigmas[0]) <= 0.0:
            raise ValueError("an increasing (inversion) sigma grid must start above 0")
    else:
        raise ValueError("sigmas must be strictly monotone")
    return sigmas


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of a step σ → σ' that adds fresh noise σ_up (module docstring)."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma)
    return math.sqrt(sigma_next**2 - up**2), up


def _decreasing(sigmas, name: str, device: torch.device | None = None) -> Tensor:
    sigmas = _check_sigmas(sigmas, device)
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"{name} is stochastic and samples only on a decreasing grid ending with 0")
    return sigmas


def _check_options(name: str, **values: float) -> None:
    """Numeric options inside SAMPLER_INFO[name].options' ranges — what `diffcli sample` checks for the CLI, so
    that the Python API does not take them silently either: out of range an option breaks the method (ipndm's
    max_order = 0 kept *every* earlier slope; unipc's order 0 or 6 has no coefficients) or leaves its paper
    (η > 1 asks for more noise than the posterior holds; a negative s_noise or snr)."""
    for key, value in values.items():
        lo, hi = SAMPLER_INFO[name].options[key]
        if not lo <= value <= hi:  # NaN fails too
            raise ValueError(f"{name}: {key} = {value!r} is out of range; must be in [{lo:g}, {hi:g}]")


# --- samplers ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) with stochasticity η ∈ [0, 1]: η = 0 is the deterministic
    probability-flow sampler, η = 1 DDPM's ancestral sampler. One denoiser call per step."""
    _check_options("ddim", eta=eta)
    sigmas = _check_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        down, up = ancestral_step(s, s_next, eta)
        x = d + (down / s) * (x - d)
        if up > 0:
            x = x + up * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                variance: str = "posterior") -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) on any σ grid.

    `variance = "posterior"` uses β̃_t (the true posterior variance; DDIM with η = 1); `"beta"` uses β_t, the
    other choice of Ho et al. (Sec. 3.2), which in VE units is σ_up² = (1+σ'²)(σ²-σ'²)/(1+σ²). No noise is
    added on the last step (z = 0 at t = 1)."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', not {variance!r}")
    sigmas = _decreasing(sigmas, "ddpm", x.device)
    x = x.to(torch.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        if variance == "posterior":
            down, up = ancestral_step(s, s_next, 1.0)
        else:
            up = 0.0 if s_next == 0 else min(s_next, math.sqrt((1 + s_next**2) * (s**2 - s_next**2) / (1 + s**2)))
            down = math.sqrt(s_next**2 - up**2)
        x = d + (down / s) * (x - d)
        if up > 0:
            x = x + up * randn_like(x, generator)
    return x


@torch.no_grad()
def sample_euler(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - D)/σ (Karras et al. 2022, Alg. 1 with
    Euler steps). Identical to DDIM with η = 0; kept as its own name for users of k-diffusion."""
    return sample_ddim(denoiser, x, sigmas, generator=generator, callback=callback, eta=0.0)


@torch.no_grad()
def sample_heun(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Heun's 2nd-order method with optional churn (Karras et al. 2022, Algorithm 2). Two denoiser calls per
    step except the last (σ' = 0), which is an Euler step."""
    _check_options("heun", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    sigmas = _check_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    n = len(sigmas) - 1
    nfe = 0
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(s_hat**2 - s**2) * s_noise * randn_like(x, generator)
        d = _denoise(denoiser, x, torch.tensor(s_hat, dtype=torch.float64, device=x.device))
        nfe += 1
        _callback(callback, i, sigmas, x, d, nfe)
        slope = (x - d) / s_hat
        x_next = x + (s_next - s_hat) * slope
        if s_next > 0:
            d2 = _denoise(denoiser, x_next, sigmas[i + 1])
            nfe += 1
            x_next = x + (s_next - s_hat) * 0.5 * (slope + (x_next - d2) / s_next)
        x = x_next
    return x


# --- more samplers ----------------------------------------------------------------------------------------
# Exponential-integrator solvers (DPM-Solver++, UniPC) work in λ = -log σ, the half log-SNR of the VE
# process, where the ODE's linear part is solved exactly: from σ to σ' with h = λ' - λ = log(σ/σ'),
#     x' = (σ'/σ)·x - expm1(-h)·D̂,
# and D̂ is a polynomial extrapolation of earlier denoised estimates (DDIM is the constant one). A grid that
# ends on σ = 0 has h = ∞ on its last step, which is then the plain denoise x' = D(x, σ).
@torch.no_grad()
def sample_euler_ancestral(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                           eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral Euler (k-diffusion's `sample_euler_ancestral`): each step σ → σ' is an Euler step of the
    probability-flow ODE to σ_down followed by fresh noise σ_up, σ_down² + σ_up² = σ'² (Song et al. 2021's
    reverse SDE split into its drift and noise; η = 1 is DDPM's posterior variance, Ho et al. 2020).
    One denoiser call per step."""
    _check_options("euler_ancestral", eta=eta, s_noise=s_noise)
    sigmas = _decreasing(sigmas, "euler_ancestral", x.device)
    x = x.to(torch.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        down, up = ancestral_step(s, s_next, eta)
        x = x + (down - s) * (x - d) / s
        if up > 0:
            x = x + up * s_noise * randn_like(x, generator)
    return x


def _dpmpp_2m_update(x: Tensor, d: Tensor, d_prev: Tensor, s: float, s_next: float, h: float, r: float,
                     solver_type: str) -> Tensor:
    """One DPM-Solver++(2M) step from σ = s to s_next (h = log(s/s_next), r = h_{i-1}/h) with the first
    difference D1 = (D_i - D_{i-1})/r: "midpoint" (Lu et al. 2022, Alg. 2) x' = (σ'/σ)x - φ1·(D_i + D1/2), or
    "heun" (the Taylor form of the DPM-Solver code, diffusers' solver_type="heun") x' = (σ'/σ)x - φ1·D_i +
    (φ1/h + 1)·D1, with φ1 = expm1(-h). Both are second order; they differ in the O(h³) term."""
    phi1 = math.expm1(-h)
    d1 = (d - d_prev) / r
    if solver_type == "heun":
        return (s_next / s) * x - phi1 * d + (phi1 / h + 1) * d1
    return (s_next / s) * x - phi1 * (d + 0.5 * d1)


def _check_solver_type(solver_type: str) -> None:
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', not {solver_type!r}")


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                    solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): second-order multistep exponential
    integrator in data prediction. D̂ = (1 + 1/(2r))·D_i - 1/(2r)·D_{i-1} with r = h_{i-1}/h_i; the first step
    is DDIM. `solver_type` "heun" takes the other second-order form (`_dpmpp_2m_update`). One denoiser call
    per step; deterministic, and runs on increasing grids (ODE inversion)."""
    _check_solver_type(solver_type)
    sigmas = _check_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        if s_next == 0:
            x = d
            continue
        h = math.log(s / s_next)
        if old is None:
            x = (s_next / s) * x - math.expm1(-h) * d
        else:
            x = _dpmpp_2m_update(x, d, old, s, s_next, h, h_last / h, solver_type)
        old, h_last = d, h
    return x


@torch.no_grad()
def sample_dpmpp_3m(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                    lower_order_final: bool = True, solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022; the third-order multistep update of the DPM-Solver reference code):
    with r0 = h_{i-1}/h, r1 = h_{i-2}/h, D1_0 = (D_i - D_{i-1})/r0, D1_1 = (D_{i-1} - D_{i-2})/r1,
        D1 = D1_0 + r0/(r0+r1)·(D1_0 - D1_1),   D2 = (D1_0 - D1_1)/(r0+r1),
        x' = (σ'/σ)x - φ1·D_i + φ2·D1 - φ3·D2,   φ1 = expm1(-h), φ2 = φ1/h + 1, φ3 = φ2/h - 1/2.
    Orders 1 and 2 (the 2M update of sample_dpmpp_2m) on the first two steps. `lower_order_final` (the
    DPM-Solver++ paper's trick for < 15 steps): on a grid ending at σ = 0 with fewer than 15 steps, the step before the final denoise runs at order 2 —
    the log-SNR steps there are the longest, where the third-order extrapolation of D is least stable.
    `solver_type` is that of the order-2 steps (sample_dpmpp_2m). One denoiser call per step; deterministic;
    runs on increasing grids (where `lower_order_final` has no effect)."""
    _check_solver_type(solver_type)
    sigmas = _check_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    ds: list[Tensor] = []
    hs: list[float] = []
    n_steps = len(sigmas) - 1
    second_last = n_steps - 2 if lower_order_final and n_steps < 15 and float(sigmas[-1]) == 0 else -1
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        if s_next == 0:
            x = d
            continue
        h = math.log(s / s_next)
        phi1 = math.expm1(-h)
        phi2 = phi1 / h + 1
        x_new = (s_next / s) * x - phi1 * d
        if len(ds) == 1 or (ds and i == second_last):  # the order-2 steps are DPM-Solver++(2M)'s own update
            x_new = _dpmpp_2m_update(x, d, ds[-1], s, s_next, h, hs[-1] / h, solver_type)
        elif ds:
            phi3 = phi2 / h - 0.5
            r0, r1 = hs[-1] / h, hs[-2] / h
            d1_0, d1_1 = (d - ds[-1]) / r0, (ds[-1] - ds[-2]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x_new = x_new + phi2 * d1 - phi3 * d2
        x = x_new
        ds, hs = (ds + [d])[-2:], (hs + [h])[-2:]
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                        eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, Sec. 5's SDE variant; k-diffusion's `sample_dpmpp_2m_sde`, midpoint
    form): the exact linear part of the reverse SDE with noise fraction η,
        x' = (σ'/σ)·e^{-ηh}·x - expm1(-(1+η)h)·D̂ + σ'·sqrt(-expm1(-2ηh))·z,
    with the second-order multistep correction of D̂. η = 0 is DPM-Solver++(2M). One call per step."""
    _check_options("dpmpp_2m_sde", eta=eta, s_noise=s_noise)
    sigmas = _decreasing(sigmas, "dpmpp_2m_sde", x.device)
    x = x.to(torch.float64)
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        if s_next == 0:
            x = d
            continue
        h = math.log(s / s_next)
        eh = eta * h
        coef = -math.expm1(-h - eh)
        x = (s_next / s) * math.exp(-eh) * x + coef * d
        if old is not None:
            r = h_last / h
            x = x + 0.5 * coef * (1 / r) * (d - old)
        if eta > 0:
            x = x + s_next * math.sqrt(-math.expm1(-2 * eh)) * s_noise * randn_like(x, generator)
        old, h_last = d, h
    return x


def _unipc_rb(rks: list[float], h: float, order: int, variant: str) -> tuple[Tensor, Tensor, float, float]:
    """UniPC's linear system (Zhao et al. 2023, Algorithm 3/4 with B(h)): R[i, k] = r_k^i, b_i = i!·φ_{i+1}(h)/B(h)."""
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    fact = 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), h_phi_1, b_h


# Real stability intervals (-I_p, 0) of the p-step Adams–Bashforth methods (Hairer & Wanner, "Solving ODEs II",
# Sec. V.1): each order up costs about half the stable step size. UniPC's predictor is an Adams–Bashforth-type
# extrapolation of D in λ, so its usable order at a given step h shrinks in the same proportion.
_AB_STABILITY = {1: 2.0, 2: 1.0, 3: 6 / 11, 4: 0.3, 5: 0.163}
# h_p = _UNIPC_H_SCALE · I_p is the largest log-SNR step run at order p: p = 3 up to h ≈ 1.45, 4 up to 0.80, 5 up to
# 0.43. The scale is calibrated on the Gaussian-mixture oracle (bench/samplers_accuracy.py); the ratios are I_p's.
_UNIPC_H_SCALE = 2.67


def unipc_order_for_step(h: float, max_order: int) -> int:
    """The highest order ≤ max_order whose stability-scaled step limit h_p admits a step of h = log(σ/σ')."""
    p = max_order
    while p > 1 and h > _UNIPC_H_SCALE * _AB_STABILITY[p]:
        p -= 1
    return p


@torch.no_grad()
def sample_unipc(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, order: int = 4,
                 variant: str = "bh1", final_correction: bool = True, adaptive_order: bool = True) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework", Algorithms 2–3): the
    multistep predictor UniP-p and the corrector UniC, which reuses the denoiser call made at the new point
    anyway, so the order rises by one at no extra cost. Data prediction, B(h) = expm1(-h) ("bh2") or -h
    ("bh1"); orders warm up from 1. One denoiser call per step; deterministic; runs on increasing grids.
    The default is B1, which Zhao et al. (Sec. 3.3 and App.) find better for unconditional sampling in few
    steps, and which measured on the Gaussian-mixture oracle is better at NFE 5 and equal from NFE 10 on (the
    higher orders do not depend on B); `diffcli sample` switches to B2 under guidance, as the paper advises.

    `order` is the highest order of the predictor (the corrector adds one); the default 4, not 5, because order 5
    loses accuracy on the likelihood ODE (diffcli.encode), whose augmented log-det component is stiffer. With `adaptive_order` each step runs
    at the highest order its size allows, `unipc_order_for_step(h, order)`: a multistep extrapolation of high
    order is accurate only on steps inside its stability region, which shrinks by about half per order (the
    Adams–Bashforth intervals). So few large steps run at order 2–3 (stable), many small ones at 4–5 (accurate);
    on a uniform log-SNR grid this makes the order a function of the NFE, as DPM-Solver's fast mode picks its
    orders from the NFE (Lu et al. 2022, Sec. 3.4).

    The final step to σ = 0 returns D at the *predicted* last point (the corrected one has no denoiser call);
    `final_correction` carries the corrector's last update through it, D(x_c) ≈ D(x_p) + (x_c - x_p), which
    holds where ∂D/∂x ≈ I, i.e. when the last σ is small against the data's scale."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', not {variant!r}")
    _check_options("unipc", order=order)
    sigmas = _check_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    ms: list[Tensor] = []
    lams: list[float] = []
    pending = None  # (x_base, D1s, rks, h, p, x_pred) of the last predictor step, for the corrector
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        if pending is not None:  # UniC: correct x with the call just made at it
            x_base, d1s, rks, h, p = pending
            R, b, _, b_h = _unipc_rb(rks, h, p, variant)
            rhos_c = torch.tensor([0.5], dtype=torch.float64) if p == 1 else torch.linalg.solve(R, b)
            corr = rhos_c[-1] * (d - ms[-1])
            for rho, d1 in zip(rhos_c[:-1].tolist(), d1s):
                corr = corr + rho * d1
            x_c = x_base - b_h * corr
            if s_next == 0 and final_correction:
                d = d + (x_c - x)
            x = x_c
        if s_next == 0:
            x = d
            continue
        ms.append(d)
        lams.append(-math.log(s))
        ms, lams = ms[-order:], lams[-order:]
        h = math.log(s / s_next)
        p = min(len(ms), unipc_order_for_step(abs(h), order) if adaptive_order else order)
        rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, p)] + [1.0]
        d1s = [(ms[-1 - k] - ms[-1]) / rks[k - 1] for k in range(1, p)]
        R, b, h_phi_1, b_h = _unipc_rb(rks, h, p, variant)
        x_base = (s_next / s) * x - h_phi_1 * ms[-1]
        x_pred = x_base
        if p >= 2:
            rhos_p = torch.tensor([0.5], dtype=torch.float64) if p == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            for rho, d1 in zip(rhos_p.tolist(), d1s):
                x_pred = x_pred - b_h * rho * d1
        pending = (x_base, d1s, rks, h, p)
        x = x_pred
    return x


def _adams_bashforth(nodes: list[float], a: float, b: float) -> list[float]:
    """Weights w_j with ∫_a^b p(σ) dσ = Σ_j w_j f_j for the polynomial p through (nodes_j, f_j): variable-step
    Adams–Bashforth, computed in the unit variable u = (σ - a)/(b - a) for conditioning."""
    import numpy as np
    from numpy.polynomial import polynomial as P

    u = [(t - a) / (b - a) for t in nodes]
    w = []
    for j, uj in enumerate(u):
        c = np.array([1.0])
        for k, uk in enumerate(u):
            if k != j:
                c = P.polymul(c, np.array([-uk, 1.0]) / (uj - uk))
        ci = P.polyint(c)
        w.append(float((P.polyval(1.0, ci) - P.polyval(0.0, ci)) * (b - a)))
    return w


@torch.no_grad()
def sample_ipndm(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None,
                 max_order: int = 4) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023, "DEIS", Sec. 4's iPNDM): Adams–Bashforth on dx/dσ = (x - D)/σ that
    reuses up to `max_order` - 1 earlier slopes, warming up with lower orders instead of PNDM's Runge–Kutta
    start. The weights are exact for the actual (non-uniform) σ grid — the variable-step form, where
    k-diffusion's `sample_ipndm` uses the uniform-step constants. One call per step; deterministic. It runs on
    increasing grids but is not offered for inversion (`invertible` False): there the steps grow and the
    extrapolated slopes overshoot — on the digits model, 10 levels, round-trip PSNR 3–16 dB at orders 2–4
    against 19 dB for Euler (order 1) and 41 dB for dpmpp_2m."""
    _check_options("ipndm", max_order=max_order)
    sigmas = _check_sigmas(sigmas, x.device)
    x = x.to(torch.float64)
    slopes: list[Tensor] = []
    nodes: list[float] = []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
        slopes, nodes = (slopes + [(x - d) / s])[-max_order:], (nodes + [s])[-max_order:]
        w = _adams_bashforth(nodes, s, s_next)
        for wj, f in zip(w, slopes):
            x = x + wj * f
    return x


@torch.no_grad()
def sample_pc(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, snr: float = 0.16,
              corrector_steps: int = 1) -> Tensor:
    """Predictor–corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
    Algorithms 2 and 4): an ancestral predictor step σ → σ' (the reverse SDE's exact Gaussian posterior step),
    then `corrector_steps` Langevin steps at σ', x ← x + ε·∇log p + sqrt(2ε)·z, with the step chosen per sample
    by the signal-to-noise rule ε = 2·(snr·‖z‖/‖∇log p‖)². The score is (D - x)/σ². The last step to σ = 0 is
    a denoise. NFE = steps + corrector_steps·(steps - 1)."""
    _check_options("pc", snr=snr, corrector_steps=corrector_steps)
    sigmas = _decreasing(sigmas, "pc", x.device)
    x = x.to(torch.float64)
    nfe = 0
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoise(denoiser, x, sigmas[i])
        nfe += 1
        _callback(callback, i, sigmas, x, d, nfe)
        if s_next == 0:
            x = d
            continue
        down, up = ancestral_step(s, s_next, 1.0)
        x = d + (down / s) * (x - d) + up * randn_like(x, generator)
        for _ in range(corrector_steps):
            score = (_denoise(denoiser, x, sigmas[i + 1]) - x) / s_next**2
            nfe += 1
            z = randn_like(x, generator)
            g = score.flatten(1).norm(dim=1).clamp_min(1e-30)
            eps = 2 * (snr * z.flatten(1).norm(dim=1) / g) ** 2
            eps = eps.reshape(-1, *([1] * (x.ndim - 1)))
            x = x + eps * score + (2 * eps).sqrt() * z
    return x


@torch.no_grad()
def sample_ald(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, step_size: float = 0.2,
               n_steps_each: int = 5) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): at each noise level σ_i of the grid,
    `n_steps_each` Langevin steps x ← x + (α_i/2)·∇log p_σi(x) + sqrt(α_i)·z with α_i = ε·σ_i²/σ_L²; here
    `step_size` = ε/σ_L², so α_i = step_size·σ_i² whatever the grid. Ends with the denoising step
    x = D(x, σ_L) (Jolicoeur-Martineau et al. 2021). NFE = steps·n_steps_each + 1."""
    _check_options("ald", step_size=step_size, n_steps_each=n_steps_each)
    sigmas = _decreasing(sigmas, "ald", x.device)
    x = x.to(torch.float64)
    nfe = 0
    n = len(sigmas) - 1
    for i in range(n):
        s = float(sigmas[i])
        alpha = step_size * s**2
        for _ in range(n_steps_each):
            d = _denoise(denoiser, x, sigmas[i])
            nfe += 1
            x = x + 0.5 * alpha * (d - x) / s**2 + math.sqrt(alpha) * randn_like(x, generator)
        if i == n - 1:
            d = _denoise(denoiser, x, sigmas[i])
            nfe += 1
            _callback(callback, i, sigmas, x, d, nfe)
            x = d
        else:  # once per noise level, like every other sampler (not only at the final denoise)
            _callback(callback, i, sigmas, x, d, nfe)
    return x


@torch.no_grad()
def sample_rk45(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, rtol: float = 1e-5,
                atol: float = 1e-5, method: str = "RK45") -> Tensor:
    """Adaptive solve of the probability-flow ODE to a tolerance: Dormand–Prince RK5(4) (Dormand & Prince 1980)
    by scipy's `solve_ivp`, in t = log σ where dx/dt = x - D(x, e^t) (Karras et al. 2022, eq. 4, rewritten).
    Only the grid's ends matter: from σ_0 to the last σ > 0, then a final denoise if the grid ends on 0. The
    whole batch is one ODE system, so the step sizes (and results, within the tolerance) depend on the batch —
    which is why `diffcli sample` (diffcli.generate) calls it one image at a time.
    The reference solver for tests and benchmarks, and the inversion solver (increasing grids, no denoise)."""
    import numpy as np
    from scipy.integrate import solve_ivp

    _check_options("rk45", rtol=rtol, atol=atol)
    sigmas = _check_sigmas(sigmas, x.device)
    decreasing = float(sigmas[-1]) == 0.0
    s0 = float(sigmas[0])
    s1 = float(sigmas[-2]) if decreasing else float(sigmas[-1])
    shape, device = x.shape, x.device
    count = [0]

    def f(t: float, y: "np.ndarray") -> "np.ndarray":
        xs = torch.from_numpy(y).reshape(shape).to(device)
        d = _denoise(denoiser, xs, torch.tensor(math.exp(t), dtype=torch.float64, device=device))
        count[0] += 1
        if callback is not None:
            callback({"i": count[0] - 1, "sigma": math.exp(t), "sigma_next": None, "x": xs, "denoised": d,
                      "nfe": count[0]})
        return (xs - d).cpu().numpy().ravel()

    y0 = x.to(torch.float64).cpu().numpy().ravel()
    if s0 != s1:
        sol = solve_ivp(f, (math.log(s0), math.log(s1)), y0, method=method, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"rk45: the ODE solve failed: {sol.message}")
        y0 = sol.y[:, -1]
    x = torch.from_numpy(np.ascontiguousarray(y0)).reshape(shape).to(device)
    if decreasing:
        d = _denoise(denoiser, x, sigmas[-2])
        count[0] += 1
        if callback is not None:  # the final denoise is a call too: the last callback's nfe is the true NFE
            callback({"i": count[0] - 1, "sigma": float(sigmas[-2]), "sigma_next": 0.0, "x": x, "denoised": d,
                      "nfe": count[0]})
        x = d
    return x


@torch.no_grad()
def sample_consistency(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) for a consistency model f = D: jump to
    x0 = f(x, σ_0), then for each later level τ of the grid re-noise x = x0 + τ·z and jump again. One denoiser
    call per step; one step is the single-jump sampler. Only for consistency models (other denoisers return
    E[x0|x], which this sampler would treat as a sample)."""
    sigmas = _decreasing(sigmas, "consistency", x.device)
    x = x.to(torch.float64)
    d = x
    for i in range(len(sigmas) - 1):
        if i > 0:
            x = d + sigmas[i] * randn_like(x, generator)
        d = _denoise(denoiser, x, sigmas[i])
        _callback(callback, i, sigmas, x, d, i + 1)
    return d


def consistency_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The n jump levels of a multistep consistency sampler, then 0: the Karras grid of n + 1 levels without its
    last (σmin, where a jump changes nothing); n = 1 is [σmax, 0]."""
    g = get_sigmas("karras", n + 1, sigma_min, sigma_max, rho=rho)
    return torch.cat([g[:-2], g[-1:]])


# --- registry -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerInfo:
    """What `--list`, `--nfe` and option validation need to know about a sampler.

    `cost(steps, options)` is the exact number of denoiser calls for a grid of `steps` steps ending on σ = 0;
    None for an adaptive solver. `options` maps each numeric option to its (lo, hi) allowed range, inclusive."""

    name: str
    fn: Callable[..., Tensor]
    order: int
    stochastic: bool
    default_schedule: str
    description: str
    cost: Callable[[int, dict], int] | None = None
    cost_text: str = "N"
    options: dict = field(default_factory=dict)
    invertible: bool = False
    min_steps: int = 1

    @property
    def adaptive(self) -> bool:
        return self.cost is None

    def nfe(self, steps: int, **options) -> int:
        """Denoiser calls for `steps` steps (the last step lands on σ = 0)."""
        if self.cost is None:
            raise ValueError(f"{self.name} is adaptive: its NFE is known only after the solve")
        return self.cost(steps, options)

    def steps_for_nfe(self, nfe: int, **options) -> int:
        """The most steps whose NFE is at most `nfe` (0 if even one step costs more)."""
        if self.cost is None:
            raise ValueError(f"{self.name} is adaptive: choose a tolerance, not an NFE budget")
        steps = 0
        while self.cost(steps + 1, options) <= nfe:
            steps += 1
        return steps


def _per_step(steps: int, options: dict) -> int:
    return steps


_INF = float("inf")
SAMPLER_INFO: dict[str, SamplerInfo] = {
    info.name: info
    for info in [
        SamplerInfo("ddpm", sample_ddpm, 1, True, "uniform", "ancestral sampling (Ho et al. 2020, Alg. 2)",
                    _per_step),
        SamplerInfo("ddim", sample_ddim, 1, False, "uniform", "DDIM with η (Song et al. 2021); η=0 is the ODE",
                    _per_step, options={"eta": (0.0, 1.0)}, invertible=True),
        SamplerInfo("euler", sample_euler, 1, False, "karras", "Euler on the probability-flow ODE", _per_step,
                    invertible=True),
        SamplerInfo("euler_ancestral", sample_euler_ancestral, 1, True, "karras",
                    "Euler + fresh noise per step (k-diffusion)", _per_step,
                    options={"eta": (0.0, 1.0), "s_noise": (0.0, 2.0)}),
        SamplerInfo("heun", sample_heun, 2, False, "karras", "Heun 2nd order, optional churn (Karras et al. 2022)",
                    lambda n, o: 2 * n - 1, "2N-1",
                    options={"s_churn": (0.0, _INF), "s_tmin": (0.0, _INF), "s_tmax": (0.0, _INF),
                             "s_noise": (0.0, 2.0)}, invertible=True),
        SamplerInfo("dpmpp_2m", sample_dpmpp_2m, 2, False, "karras", "DPM-Solver++(2M) (Lu et al. 2022)",
                    _per_step, invertible=True),
        SamplerInfo("dpmpp_3m", sample_dpmpp_3m, 3, False, "logsnr", "DPM-Solver++(3M) (Lu et al. 2022)",
                    _per_step, invertible=True),
        SamplerInfo("dpmpp_2m_sde", sample_dpmpp_2m_sde, 2, True, "karras",
                    "DPM-Solver++(2M) SDE, noise fraction η (Lu et al. 2022)", _per_step,
                    options={"eta": (0.0, 1.0), "s_noise": (0.0, 2.0)}),
        SamplerInfo("unipc", sample_unipc, 3, False, "logsnr", "UniPC predictor-corrector, B1 (B2 under guidance), "
                    "order 1-4 by step size (Zhao et al. 2023)", _per_step, options={"order": (1, 5)}, invertible=True),
        SamplerInfo("ipndm", sample_ipndm, 4, False, "karras", "improved PNDM, variable-step Adams-Bashforth "
                    "(Zhang & Chen 2023)", _per_step, options={"max_order": (1, 4)}),
        SamplerInfo("pc", sample_pc, 1, True, "karras", "predictor-corrector, Langevin corrector with SNR rule "
                    "(Song et al. 2021)", lambda n, o: n + o.get("corrector_steps", 1) * max(n - 1, 0),
                    "N+C(N-1)", options={"snr": (1e-6, 1.0), "corrector_steps": (0, 100)}),
        SamplerInfo("ald", sample_ald, 1, True, "logsnr", "annealed Langevin dynamics (Song & Ermon 2019)",
                    lambda n, o: n * o.get("n_steps_each", 5) + 1, "N·T+1",
                    options={"step_size": (1e-8, 1.0), "n_steps_each": (1, 1000)}),
        SamplerInfo("consistency", sample_consistency, 1, True, "karras", "multistep consistency sampling for "
                    "consistency-distilled students (Song et al. 2023, Alg. 1)", _per_step),
        SamplerInfo("rk45", sample_rk45, 5, False, "karras", "adaptive Dormand-Prince RK45 to a tolerance "
                    "(scipy); reference solver", None, "adaptive",
                    options={"rtol": (1e-12, 1.0), "atol": (1e-12, 1.0)}, invertible=True),
    ]
}
SAMPLERS: dict[str, Callable[..., Tensor]] = {k: v.fn for k, v in SAMPLER_INFO.items()}


# --- schedules --------------------------------------------------------------------------------------------
SCHEDULES = ("karras", "logsnr", "logsnr_leading", "logsnr_leading_ms", "logsnr_linspace", "uniform", "linear")


def get_sigmas(schedule: str, n: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0,
               process: Process | None = None, endpoint: bool = False) -> Tensor:
    """n noise levels from sigma_max down to sigma_min, then a final 0: (n+1,) float64.

    karras   σ_i = (σmax^(1/ρ) + i/(n-1)·(σmin^(1/ρ) - σmax^(1/ρ)))^ρ  (Karras et al. 2022, eq. 5)
    logsnr   uniform in log σ, i.e. in log-SNR (Lu et al. 2022's "logSNR" spacing): n+1 levels from σmax to
             σmin with σmin itself replaced by the final 0, so the last denoise spans a whole log-SNR step
             instead of spending a network call at σmin, where D(x, σmin) ≈ x adds almost nothing (the end
             of DPM-Solver's and diffusers' "linspace" grids). `endpoint=True` keeps σmin as the last level
             (n levels from σmax to σmin): what inversion (diffcli.encode) and schedule tuning need.
    logsnr_leading  uniform in log σ with diffusers' "leading" spacing: the n levels sit at fractions (n-1)/n … 0
             of the log-σ range, so the first call is one log-SNR step *below* σmax (x = ε·σ_0 starts there) and
             the last at σmin. (`logsnr` is the "trailing" one of the same family.)
    logsnr_leading_ms  the "leading" spacing of diffusers' multistep schedulers (DPM-Solver++, UniPC, DEIS: step
             ratio T//(n+1), the level at σmin dropped) in log σ: n+2 levels from σmax to σmin, calls on the n
             between them — one log-SNR step below σmax down to one step above σmin — and, as in `logsnr`, no
             call at σmin: the last denoise spans the last step.
    logsnr_linspace  `logsnr` with endpoint=True: n levels uniform in log σ from σmax to σmin, both included —
             diffusers' "linspace" spacing on a log-SNR-uniform table (DDIM with set_alpha_to_one).
    linear   uniform in σ
    uniform  uniform in the process's own time, "trailing": the grid starts at the last time step
             (Lin et al. 2024); with n = T on a VP process it is exactly DDPM's T discrete steps
    """
    if isinstance(n, bool) or not hasattr(type(n), "__index__"):  # linspace's TypeError on n = 2.5 says less
        raise ValueError(f"n must be an integer number of steps, got {n!r}")
    n = operator.index(n)  # int, numpy integer or integer 0-d tensor
    if n < 1:
        raise ValueError("a schedule needs n ≥ 1 steps")
    if not 0 < sigma_min < sigma_max < math.inf:  # σmax = ∞ made a grid of NaNs
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
    if not rho > 0:  # ρ = 0 divides by zero; ρ < 0 is no longer Karras et al.'s ramp
        raise ValueError(f"rho must be > 0, got {rho}")
    if schedule == "karras":
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        s = (hi + ramp * (lo - hi)) ** rho
    elif schedule == "logsnr":
        s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n + (not endpoint), dtype=torch.float64).exp()
        s = s[:n]
    elif schedule == "logsnr_linspace":
        s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    elif schedule == "logsnr_leading_ms":
        s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 2, dtype=torch.float64).exp()[1:n + 1]
    elif schedule == "logsnr_leading":
        s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1, dtype=torch.float64).exp()[1:]
    elif schedule == "linear":
        s = torch.linspace(sigma_max, sigma_min, n, dtype=torch.float64)
    elif schedule == "uniform":
        if process is None:
            raise ValueError("the 'uniform' schedule needs the model's process")
        if isinstance(process, VPDiscrete):
            t_max = float(process.t(torch.tensor(sigma_max, dtype=torch.float64)))
            t = (t_max - torch.arange(n, dtype=torch.float64) * (t_max + 1) / n).round().clamp_min(0)
        else:
            t_lo = float(process.t(torch.tensor(sigma_min, dtype=torch.float64)))
            t_hi = float(process.t(torch.tensor(sigma_max, dtype=torch.float64)))
            t = torch.linspace(t_hi, t_lo, n, dtype=torch.float64)
        s = process.sigma(t).to(torch.float64)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if n == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    s = torch.unique_consecutive(s)  # rounding on a short VP grid may repeat a step
    return torch.cat([s, s.new_zeros(1)])


# --- tuned schedules --------------------------------------------------------------------------------------
def tuned_schedule_path(checkpoint) -> "Path":
    """The sidecar file that holds a checkpoint's tuned σ grids: CKPT_STEM.schedules.safetensors beside it
    (the checkpoint itself is never rewritten)."""
    from pathlib import Path

    p = Path(checkpoint)
    return p.with_name(p.stem + ".schedules.safetensors")


def tuned_keys(path) -> list[str]:
    from pathlib import Path

    from .checkpoint import read_header

    return sorted(read_header(path)[0]) if Path(path).exists() else []
