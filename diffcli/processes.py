"""Noise processes mapped onto the one VE/EDM convention x = x0 + σ·ε (DESIGN.md "One idea").

Each process says three things about a noise level σ:
  * its own model time t(σ) and back σ(t) (what the network was conditioned on, what "uniform in time" means),
  * c_in(σ): the factor that turns the VE state x into the process's own state
      VP   x_vp = x / sqrt(1 + σ²)            (ᾱ = 1 / (1 + σ²); Ho et al. 2020, Nichol & Dhariwal 2021)
      flow x_t  = x / (1 + σ) = (1-t)·x0 + t·ε   (t = σ / (1 + σ); Liu et al. 2023, Lipman et al. 2023)
      VE   x itself                          (Song et al. 2021, NCSN++)
      EDM  x / sqrt(σ² + σ_data²)             (Karras et al. 2022, Table 1)
  * c_noise(σ): the scalar the network's noise embedding sees, and how σ is drawn for training.

All functions take and return tensors of the same shape; they work in the dtype they are given
(float64 for conversions and tests, float32 inside the network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

PROCESSES = ("vp_linear", "vp_cosine", "ve", "edm", "flow")


@dataclass(frozen=True)
class Process:
    """Base class; subclasses override the maps. `sigma_min`/`sigma_max` is the default sampling range."""

    name: str
    sigma_min: float
    sigma_max: float
    sigma_data: float = 0.5

    # --- time <-> sigma -------------------------------------------------------------------
    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def t(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def t_min(self) -> float:
        return float(self.t(torch.tensor(self.sigma_min, dtype=torch.float64)))

    @property
    def t_max(self) -> float:
        return float(self.t(torch.tensor(self.sigma_max, dtype=torch.float64)))

    # --- scalings -----------------------------------------------------------------------------
    def c_in(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def c_noise(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------------
    def sample_sigma(self, n: int, generator: torch.Generator | None = None, *, method: str = "default",
                     p_mean: float = -1.2, p_std: float = 1.2) -> Tensor:
        """Draw n training noise levels (float32, shape (n,)) as the method prescribes.

        `default` is the process's own rule (uniform discrete t for VP, log-uniform σ for VE, log-normal σ for
        EDM, uniform t for flow); `lognormal` is EDM's ln σ ~ N(p_mean, p_std²); `loguniform` spans
        [sigma_min, sigma_max]; `uniform_t` is uniform in the process's model time; `logit_normal` is
        SD3's logit-normal time (flow).
        """
        if method == "default":
            method = self.default_sampling
        if method == "lognormal":
            return (torch.randn(n, generator=generator, dtype=torch.float64) * p_std + p_mean).exp().float()
        if method == "loguniform":
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            return (lo + u * (hi - lo)).exp().float()
        if method == "uniform_t":
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            return self.sigma(self.t_min + u * (self.t_max - self.t_min)).float()
        if method == "logit_normal":
            z = torch.randn(n, generator=generator, dtype=torch.float64) * p_std + p_mean
            t = torch.sigmoid(z).clamp(self.t_min, self.t_max)
            return self.sigma(t).float()
        if method == "discrete":
            return self._sample_discrete(n, generator)
        raise ValueError(f"unknown sigma sampling {method!r}")

    default_sampling = "uniform_t"

    def _sample_discrete(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise ValueError(f"process {self.name!r} has no discrete time steps")


@dataclass(frozen=True)
class VPDiscrete(Process):
    """DDPM's variance-preserving process with T discrete steps (linear β: Ho et al. 2020; cosine ᾱ:
    Nichol & Dhariwal 2021). Model time t ∈ [0, T-1] is continuous between the discrete steps (log σ is
    interpolated linearly), so any σ in range has a time and samplers may use any grid."""

    schedule: str = "linear"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    default_sampling = "discrete"

    @property
    def log_sigmas(self) -> Tensor:
        """(T,) float64 log σ_i for i = 0..T-1, increasing."""
        return _vp_log_sigmas(self.schedule, self.timesteps, self.beta_start, self.beta_end)

    def sigma(self, t: Tensor) -> Tensor:
        ls = self.log_sigmas.to(t.device)
        t = t.to(torch.float64).clamp(0, self.timesteps - 1)
        lo = t.floor().long().clamp(max=self.timesteps - 2)
        w = t - lo
        return ((1 - w) * ls[lo] + w * ls[lo + 1]).exp().to(t.dtype if t.is_floating_point() else torch.float64)

    def t(self, sigma: Tensor) -> Tensor:
        ls = self.log_sigmas.to(sigma.device)
        lsig = sigma.to(torch.float64).clamp_min(1e-30).log()
        hi = torch.searchsorted(ls, lsig.contiguous()).clamp(1, self.timesteps - 1)
        lo = hi - 1
        w = ((lsig - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
        return lo + w

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + sigma**2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return self.t(sigma).to(sigma.dtype)

    def _sample_discrete(self, n: int, generator: torch.Generator | None) -> Tensor:
        i = torch.randint(0, self.timesteps, (n,), generator=generator)
        return self.log_sigmas[i].exp().float()


def _vp_log_sigmas(schedule: str, T: int, beta_start: float, beta_end: float) -> Tensor:
    if schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # Nichol & Dhariwal clip β at 0.999
    else:
        raise ValueError(f"unknown VP schedule {schedule!r}")
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return (((1 - alphas_cumprod) / alphas_cumprod).sqrt()).log()


@dataclass(frozen=True)
class VE(Process):
    """Variance-exploding process (Song et al. 2021): σ(t) = σ_min (σ_max/σ_min)^t, t ∈ [0, 1].
    Inputs are not rescaled (NCSN++ convention); c_noise = ln(σ/2) as in EDM's VE preconditioning."""

    default_sampling = "loguniform"

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t(self, sigma: Tensor) -> Tensor:
        return (sigma / self.sigma_min).log() / math.log(self.sigma_max / self.sigma_min)

    def c_in(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (0.5 * sigma).log()


@dataclass(frozen=True)
class EDM(Process):
    """Karras et al. 2022: t = σ, ln σ ~ N(P_mean, P_std²) for training, c_in = 1/sqrt(σ² + σ_data²),
    c_noise = ln(σ)/4."""

    default_sampling = "lognormal"

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def t(self, sigma: Tensor) -> Tensor:
        return sigma

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4


@dataclass(frozen=True)
class Flow(Process):
    """Rectified flow / flow matching x_t = (1-t)·x0 + t·ε (Liu et al. 2023; Lipman et al. 2023).
    σ = t/(1-t) and x_t = (1-t)·x; the network sees x_t and 1000·t (the DDPM time scale, so the same
    positional embedding fits)."""

    def sigma(self, t: Tensor) -> Tensor:
        return t / (1 - t)

    def t(self, sigma: Tensor) -> Tensor:
        return sigma / (1 + sigma)

    def c_in(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return 1000 * self.t(sigma)


def make_process(name: str, *, sigma_min: float | None = None, sigma_max: float | None = None,
                 sigma_data: float = 0.5, timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> Process:
    """Build a process by name; σ range defaults are each paper's (VP: the ends of the discrete grid)."""
    if name in ("vp_linear", "vp_cosine"):
        schedule = name.split("_")[1]
        ls = _vp_log_sigmas(schedule, timesteps, beta_start, beta_end)
        lo, hi = float(ls[0].exp()), float(ls[-1].exp())
        return VPDiscrete(name, sigma_min if sigma_min is not None else lo,
                          sigma_max if sigma_max is not None else hi, sigma_data,
                          schedule=schedule, timesteps=timesteps, beta_start=beta_start, beta_end=beta_end)
    if name == "ve":
        return VE(name, sigma_min or 0.01, sigma_max or 50.0, sigma_data)
    if name == "edm":
        return EDM(name, sigma_min or 0.002, sigma_max or 80.0, sigma_data)
    if name == "flow":
        # σ_max = 999 is t = 0.999: the start x = σ_max·ε differs from pure noise by 0.1% of x0.
        return Flow(name, sigma_min or 1e-3, sigma_max or 999.0, sigma_data)
    raise ValueError(f"unknown process {name!r}; choose one of {', '.join(PROCESSES)}")
