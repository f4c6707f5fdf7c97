"""Consistency models (Song et al. 2023, "Consistency Models": Algorithm 2 = consistency distillation (CD),
Algorithm 3 = consistency training (CT); Song & Dhariwal 2024, "Improved Techniques for Training Consistency
Models" (iCT): pseudo-Huber metric, stop-gradient target, 1/Δσ weighting, doubling curriculum of N).

The student f_θ(x, σ) maps any point of a probability-flow trajectory to its end at σ_min. The boundary
condition f(x, σ_min) = x is built into the parameterization (diffcli.denoiser, `consistency`):
c_skip(σ) = σd²/((σ-σmin)² + σd²), c_out(σ) = σd·(σ-σmin)/sqrt(σ² + σd²).

On the Karras grid σ_1 = σ_min < … < σ_N = σ_max (ρ = 7), one step draws n ∈ {1, …, N-1}, x0 and z, sets
x_{n+1} = x0 + σ_{n+1}·z and the neighbour
    CD: x̂_n = one Heun step of the teacher's ODE from σ_{n+1} to σ_n
    CT: x̂_n = x0 + σ_n·z   (the same z: an unbiased one-sample estimate of the ODE step)
and minimises λ(σ_n)·d(f_θ(x_{n+1}, σ_{n+1}), f_θ⁻(x̂_n, σ_n)), with θ⁻ the target network: an EMA of θ with
decay μ (CD, μ = 0.95 by default) or θ itself under stop-gradient (iCT, μ = 0). Here the target network is the
run's EMA, so the student written to disk is θ⁻ (for CT the raw weights). d is the pseudo-Huber metric
sqrt(|a-b|² + c²) - c with c = 0.00054·sqrt(dim) or L2; LPIPS (the paper's choice for images) needs weights that
cannot be downloaded here: `metric=` takes any callable instead.

The grid interval n is drawn uniformly for CD (Song et al. 2023) and, for CT, from iCT's discretised
log-normal p(n) ∝ erf((log σ_{n+1} - P_mean)/(√2·P_std)) - erf((log σ_n - P_mean)/(√2·P_std)) with P_mean = -1.1,
P_std = 2 (Song & Dhariwal 2024, Sec. 3.5), which spends the steps where the data's structure is decided
instead of on the many tiny and huge levels of a fine grid; `consistency.level_sampling` overrides either.
Simplification, stated: the run's EMA doubles as the target network (the paper keeps a separate, slower EMA
for evaluation).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..errors import UserError
from ..samplers import consistency_sigmas
from .common import Method, bcast, heun_step, student_recipe


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """(n,) float64 increasing σ_1 = σ_min < … < σ_n = σ_max (Song et al. 2023, Sec. 5 / Karras et al. 2022)."""
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    return (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def ct_scales(step: int, total: int, s0: int, s1: int) -> int:
    """iCT's discretisation curriculum: N(k) = min(s0·2^⌊k/K'⌋, s1) + 1, K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋."""
    kp = max(1, total // (int(math.log2(max(s1 // s0, 1))) + 1))
    return min(s0 * 2 ** (step // kp), s1) + 1


def level_probabilities(levels: Tensor, kind: str, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """(N-1,) float64 probabilities of the intervals [σ_n, σ_{n+1}] of the increasing grid `levels` (N,): equal
    ("uniform") or the log-normal mass of log σ between the two ends ("lognormal", module docstring)."""
    if kind == "uniform":
        return torch.full((len(levels) - 1,), 1.0 / (len(levels) - 1), dtype=torch.float64)
    cdf = torch.erf((levels.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp(min=0)
    if float(p.sum()) <= 0:  # the whole grid sits in a tail with no mass in float64: fall back to equal odds
        return torch.full_like(p, 1.0 / len(p))
    return p / p.sum()


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """(B,) sqrt(|a-b|² + c²) - c over all but the batch dimension (Song & Dhariwal 2024, eq. 8)."""
    return ((a - b).square().flatten(1).sum(1) + c * c).sqrt() - c


def l2(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).square().flatten(1).mean(1)


def consistency_loss(f: Callable, f_target: Callable, x0: Tensor, z: Tensor, sigma: Tensor, sigma_next: Tensor,
                     *, teacher_step: Callable | None, metric: Callable, weight: Tensor | None = None,
                     cond: Tensor | None = None) -> Tensor:
    """Mean of λ·d(f(x_{n+1}, σ_{n+1}), f⁻(x̂_n, σ_n)) over the batch; σ = σ_n < σ_next = σ_{n+1}, both (B,).

    `teacher_step(x, σ_{n+1}, σ_n, cond)` is the ODE step of CD; None is CT (x̂_n = x0 + σ_n·z)."""
    x_next = x0 + bcast(sigma_next, x0) * z
    with torch.no_grad():
        x_hat = teacher_step(x_next, sigma_next, sigma, cond) if teacher_step else x0 + bcast(sigma, x0) * z
        target = f_target(x_hat, sigma, cond)
    d = metric(f(x_next, sigma_next, cond), target)
    return (d if weight is None else weight * d).mean()


class Consistency(Method):
    name = "consistency"

    def __init__(self, recipe, teacher) -> None:
        super().__init__(recipe, teacher)
        c, d = self.cfg, teacher.denoiser
        if not c.sigma_min < d.sigma_max:
            raise UserError(f"consistency.sigma_min = {c.sigma_min}: must be below the teacher's σ_max = {d.sigma_max}")
        if c.loss == "lpips":
            raise UserError("consistency.loss = 'lpips': LPIPS weights cannot be loaded here (no downloads); use "
                            "'pseudo_huber' or 'l2', or pass metric= to diffcli.distill.consistency.consistency_loss")
        self.mu = c.target_ema if c.target_ema is not None else (0.95 if c.mode == "cd" else 0.0)
        self.level_sampling = c.level_sampling or ("uniform" if c.mode == "cd" else "lognormal")
        dim = teacher.channels * teacher.resolution**2
        self.huber_c = c.huber_c if c.huber_c is not None else 0.00054 * math.sqrt(dim)

    def student_recipe(self, steps: int | None = None):
        return student_recipe(self.teacher.recipe, sampler="consistency", steps=steps or self.cfg.sample_steps,
                              parameterization="consistency", sigma_min=self.cfg.sigma_min)

    def student_sampling(self, steps: int | None = None):
        k = steps or self.cfg.sample_steps
        grid = consistency_sigmas(k, self.cfg.sigma_min, self.teacher.denoiser.sigma_max, self.cfg.rho)
        return "consistency", k, [float(s) for s in grid]

    def ema_decay(self, step: int) -> float:
        return self.mu  # the target network θ⁻ (module docstring)

    def prepare(self, eng) -> None:
        eng.load_data()

    def scales(self, step: int) -> int:
        c = self.cfg
        return c.num_scales if c.mode == "cd" else ct_scales(step, self.total_steps(), c.ct_initial_scales, c.num_scales)

    def loss(self, eng, step, x0, y, g):
        c, t = self.cfg, self.recipe.train
        if y is not None and t.p_uncond > 0:
            drop = torch.rand(y.shape[0], generator=g).to(y.device) < t.p_uncond
            y = torch.where(drop, torch.full_like(y, self.teacher.denoiser.num_classes), y)
        levels = karras_levels(self.scales(step), c.sigma_min, self.teacher.denoiser.sigma_max, c.rho)
        probs = level_probabilities(levels, self.level_sampling, c.p_mean, c.p_std)
        n = torch.multinomial(probs, x0.shape[0], replacement=True, generator=g)
        sigma, sigma_next = levels[n].float().to(x0.device), levels[n + 1].float().to(x0.device)
        z = torch.randn(x0.shape, generator=g).to(x0)
        metric = (lambda a, b: pseudo_huber(a, b, self.huber_c)) if c.loss == "pseudo_huber" else l2
        weight = None if c.mode == "cd" else 1 / (sigma_next - sigma)
        teacher = self.teacher.denoiser
        step_fn = (lambda x, s, s2, cond: heun_step(teacher, x, s, s2, cond)) if c.mode == "cd" else None
        target = eng.student if self.mu == 0 else eng.ema  # μ = 0: stop-gradient of θ itself
        return consistency_loss(eng.student, target, x0, z, sigma, sigma_next, teacher_step=step_fn, metric=metric,
                                weight=weight, cond=y)

    def report(self, eng) -> dict:
        return {"mode": self.cfg.mode, "target_ema": self.mu, "num_scales": self.cfg.num_scales,
                "level_sampling": self.level_sampling}
