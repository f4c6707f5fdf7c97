"""The Denoiser: a network plus a parameterization, seen by everything else as D(x, σ, cond) ≈ E[x0 | x].

Preconditioning follows Karras et al. 2022 (EDM, Table 1): D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)).
Each parameterization is a choice of (c_skip, c_out) — the network target F is then (x0 - c_skip·x) / c_out:

    eps   c_skip = 1              c_out = -σ                      F ≈ ε                (Ho et al. 2020)
    x0    c_skip = 0              c_out = 1                       F ≈ x0
    v     c_skip = 1/(1+σ²)       c_out = -σ/sqrt(1+σ²)           F ≈ α·ε - σ_vp·x0    (Salimans & Ho 2022)
    flow  c_skip = 1/(1+σ)        c_out = -σ/(1+σ)                F ≈ ε - x0           (Liu et al. 2023)
    edm   c_skip = σd²/(σ²+σd²)   c_out = σ·σd/sqrt(σ²+σd²)        (Karras et al. 2022)
    consistency  c_skip = σd²/((σ-σmin)²+σd²)   c_out = σd·(σ-σmin)/sqrt(σ²+σd²)
          (Song et al. 2023, App. C): D(x, σmin) = x exactly — the consistency model's boundary condition

c_in and c_noise come from the noise process (diffcli.processes), except `edm`, which also fixes
c_in = 1/sqrt(σ²+σd²) so that the network input has unit variance whatever the process.

Loss weightings are written in x0 space, λ(σ)·|D - x0|², and evaluated in F space as λ·c_out²·|F - F*|²:
    natural  λ = 1/c_out²          (the parameterization's own MSE)
    min_snr  λ = min(SNR, γ)       SNR = 1/σ²   (Hang et al. 2023)
    edm      λ = (σ²+σd²)/(σ·σd)²   (Karras et al. 2022)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .processes import Process

PARAMETERIZATIONS = ("eps", "x0", "v", "flow", "edm", "consistency")
WEIGHTINGS = ("natural", "min_snr", "edm")


def skip_out(param: str, sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.0) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of a parameterization at σ; same shape and dtype as `sigma` (σmin: `consistency` only)."""
    one = torch.ones_like(sigma)
    if param == "consistency":
        sd2, s = sigma_data**2, sigma - sigma_min  # exactly 0 at σ = σmin, so c_skip = 1 and c_out = 0 there
        return sd2 / (s**2 + sd2), sigma_data * s / (sigma**2 + sd2).sqrt()
    if param == "eps":
        return one, -sigma
    if param == "x0":
        return torch.zeros_like(sigma), one
    if param == "v":
        return 1 / (1 + sigma**2), -sigma / (1 + sigma**2).sqrt()
    if param == "flow":
        return 1 / (1 + sigma), -sigma / (1 + sigma)
    if param == "edm":
        sd2 = sigma_data**2
        return sd2 / (sigma**2 + sd2), sigma * sigma_data / (sigma**2 + sd2).sqrt()
    raise ValueError(f"unknown parameterization {param!r}")


def x0_from(param: str, pred: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """x0 from a network target `pred` of parameterization `param` at the VE state x; σ broadcastable."""
    c_skip, c_out = skip_out(param, sigma, sigma_data)
    return c_skip * x + c_out * pred


def target_from(param: str, x0: Tensor, x: Tensor, sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """The network target of parameterization `param` given the clean x0 and the VE state x."""
    c_skip, c_out = skip_out(param, sigma, sigma_data)
    return (x0 - c_skip * x) / c_out


def score_from_x0(x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """∇ log p_σ(x) = (E[x0|x] - x) / σ² (Tweedie's formula)."""
    return (x0 - x) / sigma**2


def x0_from_score(score: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    return x + sigma**2 * score


def loss_weight(weighting: str, param: str, sigma: Tensor, sigma_data: float = 0.5,
                min_snr_gamma: float = 5.0) -> Tensor:
    """The F-space weight λ(σ)·c_out(σ)² of a weighting (see module docstring)."""
    if param == "consistency":
        raise ValueError("consistency students are trained by diffcli distill, not with a denoising weighting")
    _, c_out = skip_out(param, sigma, sigma_data)
    if weighting == "natural":
        return torch.ones_like(sigma)
    if weighting == "min_snr":
        return (1 / sigma**2).clamp(max=min_snr_gamma) * c_out**2
    if weighting == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2 * c_out**2
    raise ValueError(f"unknown weighting {weighting!r}")


class Denoiser(nn.Module):
    """D(x, σ, cond) -> x0_hat, the one object samplers, guidance, distillation and inversion use.

    x (B, C, H, W) float32 in the VE convention, sigma (B,) float32, cond (B,) int64 class ids or None
    (None means unconditional: the null class of a class-conditional model). Returns (B, C, H, W) float32.
    """

    def __init__(self, net: nn.Module, process: Process, parameterization: str, *, num_classes: int = 0,
                 weighting: str = "natural", min_snr_gamma: float = 5.0, sigma_sampling: str = "default",
                 p_mean: float = -1.2, p_std: float = 1.2) -> None:
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}")
        self.net = net
        self.process = process
        self.parameterization = parameterization
        self.num_classes = num_classes
        self.weighting = weighting
        self.min_snr_gamma = min_snr_gamma
        self.sigma_sampling = sigma_sampling
        self.p_mean, self.p_std = p_mean, p_std

    # Contract attributes (DESIGN.md): the σ range the model was trained for.
    @property
    def sigma_min(self) -> float:
        return self.process.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.process.sigma_max

    @property
    def sigma_data(self) -> float:
        return self.process.sigma_data

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_in, c_skip, c_out, c_noise) at σ (B,); the first three shaped (B, 1, 1, 1) for broadcasting."""
        s = sigma.reshape(-1, 1, 1, 1)
        c_skip, c_out = skip_out(self.parameterization, s, self.sigma_data, self.sigma_min)
        if self.parameterization == "edm":
            c_in = 1 / (s**2 + self.sigma_data**2).sqrt()
        else:
            c_in = self.process.c_in(s)
        return c_in, c_skip, c_out, self.process.c_noise(sigma)

    def _labels(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if self.num_classes == 0:
            return None
        if cond is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return cond.to(device=device, dtype=torch.long)

    @property
    def guidance_input(self) -> bool:
        """True for a guidance-distilled student: the network takes the CFG scale w (Meng et al. 2023)."""
        return getattr(self.net, "map_guidance", None) is not None

    def raw(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, *,
            net: nn.Module | None = None, guidance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(F, c_skip, c_out): the network's own output and the scalings, for losses in F space.
        `net` runs instead of `self.net` — e.g. its DistributedDataParallel wrapper during training."""
        c_in, c_skip, c_out, c_noise = self.scalings(sigma)
        labels = self._labels(cond, x.shape[0], x.device)
        if guidance is None:
            pred = (net or self.net)(c_in * x, c_noise, labels)
        else:  # the CFG scale w of a guidance-distilled student
            pred = (net or self.net)(c_in * x, c_noise, labels, guidance=guidance)
        return pred.float(), c_skip, c_out

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        sigma = sigma.to(device=x.device, dtype=torch.float32).expand(x.shape[0])
        pred, c_skip, c_out = self.raw(x.float(), sigma, cond, guidance=guidance)
        return c_skip * x.float() + c_out * pred

    def loss(self, x0: Tensor, cond: Tensor | None = None, *, generator: torch.Generator | None = None,
             sigma: Tensor | None = None, noise: Tensor | None = None, net: nn.Module | None = None) -> Tensor:
        """Per-sample weighted denoising loss (B,). σ and ε are drawn from `generator` (CPU) unless given."""
        b = x0.shape[0]
        if sigma is None:
            sigma = self.process.sample_sigma(b, generator, method=self.sigma_sampling,
                                              p_mean=self.p_mean, p_std=self.p_std)
        sigma = sigma.to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        s = sigma.reshape(-1, 1, 1, 1)
        x = x0 + s * noise
        pred, c_skip, c_out = self.raw(x, sigma, cond, net=net)
        target = (x0 - c_skip * x) / c_out
        w = loss_weight(self.weighting, self.parameterization, sigma, self.sigma_data, self.min_snr_gamma)
        # a mean over the non-batch dims, not flatten(1): no copy of a channels_last batch
        return w * (pred - target).square().mean(dim=tuple(range(1, pred.dim())))


DenoiserFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
