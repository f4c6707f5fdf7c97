"""Samplers and σ schedules, written once against the Denoiser (DESIGN.md "Sampler" contract).

    SAMPLERS[name](denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x0

`sigmas` is 1-D, decreasing and ends with 0; `x` is noise·sigmas[0]. The integration state is float64; the
denoiser is called in float32 (EDM's `edm_sampler` does the same). `generator` is None, one torch.Generator,
or a list with one generator per batch row — the last makes every image depend only on its own seed,
whatever the batch size. `callback(info)` receives a dict with i, sigma, sigma_next, x, denoised, nfe.

In the VE convention x = x0 + σ·ε the probability-flow ODE is dx/dσ = (x - D(x, σ))/σ (Karras et al. 2022,
eq. 3 with s = 1), and a DDIM step from σ to σ' is x' = D + σ'·(x - D)/σ: DDIM (η = 0) *is* Euler in σ,
for every process (Karras et al. 2022, Sec. 3). With η > 0 the step splits σ' into a deterministic part
σ_down and fresh noise σ_up, σ_up = η·σ'·sqrt(σ² - σ'²)/σ, which is Song et al.'s σ_t(η) written in VE
units; η = 1 is DDPM's posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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
        z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
    else:
        z = torch.randn(x.shape, generator=generator)
    return z.to(device=x.device, dtype=x.dtype)


def _denoise(denoiser, x: Tensor, sigma: Tensor) -> Tensor:
    """Call the denoiser in float32 with a (B,) σ and return float64 (the integration dtype)."""
    s = sigma.to(torch.float32).expand(x.shape[0]).contiguous()
    return denoiser(x.to(torch.float32), s).to(torch.float64)


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


def _check_sigmas(sigmas: Tensor) -> Tensor:
    """Sampling grids decrease and end with 0. Deterministic samplers also integrate the ODE forwards for
    inversion (diffcli.encode): an increasing grid that starts above 0."""
    sigmas = sigmas.to(torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be 1-D with at least 2 entries")
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


# --- samplers ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None, eta: float = 0.0) -> Tensor:
    """DDIM (Song, Meng & Ermon 2021, eq. 12) with stochasticity η ∈ [0, 1]: η = 0 is the deterministic
    probability-flow sampler, η = 1 DDPM's ancestral sampler. One denoiser call per step."""
    sigmas = _check_sigmas(sigmas.to(x.device))
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
    sigmas = _check_sigmas(sigmas.to(x.device))
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
    sigmas = _check_sigmas(sigmas.to(x.device))
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


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    fn: Callable[..., Tensor]
    order: int
    stochastic: bool
    default_schedule: str
    description: str
    min_steps: int = 1

    def nfe(self, steps: int) -> int:
        """Denoiser calls for `steps` steps (the last step lands on σ = 0)."""
        if self.name == "heun":
            return 2 * steps - 1
        return steps

    def steps_for_nfe(self, nfe: int) -> int:
        """The most steps whose NFE is at most `nfe`."""
        if self.name == "heun":
            return (nfe + 1) // 2
        return nfe


SAMPLER_INFO: dict[str, SamplerInfo] = {
    info.name: info
    for info in [
        SamplerInfo("ddpm", sample_ddpm, 1, True, "uniform", "ancestral sampling (Ho et al. 2020, Alg. 2)"),
        SamplerInfo("ddim", sample_ddim, 1, False, "uniform", "DDIM with η (Song et al. 2021); η=0 is the ODE"),
        SamplerInfo("euler", sample_euler, 1, False, "karras", "Euler on the probability-flow ODE"),
        SamplerInfo("heun", sample_heun, 2, False, "karras", "Heun 2nd order, optional churn (Karras et al. 2022)"),
    ]
}
SAMPLERS: dict[str, Callable[..., Tensor]] = {k: v.fn for k, v in SAMPLER_INFO.items()}


# --- schedules --------------------------------------------------------------------------------------------
SCHEDULES = ("karras", "logsnr", "uniform", "linear")


def get_sigmas(schedule: str, n: int, sigma_min: float, sigma_max: float, *, rho: float = 7.0,
               process: Process | None = None) -> Tensor:
    """n noise levels from sigma_max down to sigma_min, then a final 0: (n+1,) float64.

    karras   σ_i = (σmax^(1/ρ) + i/(n-1)·(σmin^(1/ρ) - σmax^(1/ρ)))^ρ  (Karras et al. 2022, eq. 5)
    logsnr   uniform in log σ, i.e. in log-SNR (Lu et al. 2022's "logSNR" spacing)
    linear   uniform in σ
    uniform  uniform in the process's own time, "trailing": the grid starts at the last time step
             (Lin et al. 2024); with n = T on a VP process it is exactly DDPM's T discrete steps
    """
    if n < 1:
        raise ValueError("a schedule needs n ≥ 1 steps")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if schedule == "karras":
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        s = (hi + ramp * (lo - hi)) ** rho
    elif schedule == "logsnr":
        s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
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
