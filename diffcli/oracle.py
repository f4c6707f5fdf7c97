"""An analytic Gaussian-mixture denoiser: the exact E[x0 | x] at every σ, for tests and benchmarks.

Data: x0 ~ Σ_k w_k N(μ_k, s_k² I) in D = C·H·W dimensions. Noised at σ, x = x0 + σ·ε has the density
p_σ(x) = Σ_k w_k N(x; μ_k, (s_k² + σ²) I), and Tweedie's formula gives the posterior mean

    E[x0 | x] = Σ_k r_k(x) · (μ_k + s_k²/(s_k² + σ²) · (x - μ_k)),   r_k ∝ w_k N(x; μ_k, (s_k² + σ²) I).

With `cond` the mixture is restricted to component `cond` (a class-conditional oracle whose classes are the
components); `cond = num_classes` (the null class) is the whole mixture, as in a CFG-trained model.
Everything is computed in float64; the call returns the dtype of x.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixtureDenoiser(torch.nn.Module):
    """Denoiser-contract object: `gm(x, sigma, cond=None) -> x0_hat` with x (B, C, H, W), sigma (B,)."""

    def __init__(self, means: Tensor, stds: Tensor, weights: Tensor | None = None, *,
                 shape: tuple[int, int, int] | None = None, sigma_min: float = 0.002,
                 sigma_max: float = 80.0) -> None:
        super().__init__()
        means = means.to(torch.float64)
        k, d = means.shape
        self.register_buffer("means", means)
        self.register_buffer("stds", stds.to(torch.float64).reshape(k))
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else weights.to(torch.float64)
        self.register_buffer("weights", w / w.sum())
        self.shape = shape or (1, 1, d)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} dimensions")
        self.sigma_min, self.sigma_max, self.num_classes = sigma_min, sigma_max, k

    @classmethod
    def random(cls, k: int = 8, shape: tuple[int, int, int] = (1, 4, 4), std: float = 0.1, seed: int = 0,
               spread: float = 0.6, **kw) -> "GaussianMixtureDenoiser":
        """k components with means uniform in [-spread, spread]^D, equal stds, random (Dirichlet-ish) weights."""
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        means = (torch.rand(k, d, generator=g, dtype=torch.float64) * 2 - 1) * spread
        weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
        return cls(means, torch.full((k,), std, dtype=torch.float64), weights, shape=shape, **kw)

    # --- the exact quantities ---------------------------------------------------------------------------
    def _log_joint(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        """(B, K) log w_k + log N(x; μ_k, (s_k²+σ²) I), with -inf outside the conditioning component."""
        d = x.shape[1]
        var = self.stds[None] ** 2 + sigma[:, None] ** 2  # (B, K)
        sq = torch.cdist(x, self.means).square()  # (B, K)
        lj = self.weights.log()[None] - 0.5 * sq / var - 0.5 * d * (2 * math.pi * var).log()
        if cond is not None:
            cond = cond.to(x.device).long()
            keep = (torch.arange(self.num_classes, device=x.device)[None] == cond[:, None]) | \
                (cond[:, None] == self.num_classes)
            lj = lj.masked_fill(~keep, float("-inf"))
        return lj

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        s = sigma.to(torch.float64).reshape(-1).expand(b)
        r = self._log_joint(xf, s, cond).softmax(dim=1)  # (B, K)
        var = self.stds[None] ** 2 + s[:, None] ** 2
        shrink = self.stds[None] ** 2 / var  # (B, K)
        # Σ_k r_k (μ_k + shrink_k (x - μ_k)) = Σ r_k (1 - shrink_k) μ_k + (Σ r_k shrink_k) x
        x0 = (r * (1 - shrink)) @ self.means + (r * shrink).sum(1, keepdim=True) * xf
        return x0.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0, cond: Tensor | None = None) -> Tensor:
        """Exact log p_σ(x) (B,) in nats (σ = 0 is the data density)."""
        b = x.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(b)
        return self._log_joint(x.reshape(b, -1).to(torch.float64), s, cond).logsumexp(dim=1)

    def score(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
        return (self.forward(x.to(torch.float64), sigma, cond) - x.to(torch.float64)) / s**2

    def sample(self, n: int, generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
        """n data draws x0 (n, C, H, W) float64; with `cond`, draw i from component cond[i]."""
        if cond is None:
            k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            k = cond.long()
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).reshape(n, *self.shape)

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """The mixture's exact mean (D,) and covariance (D, D)."""
        m = self.weights @ self.means
        centred = self.means - m
        cov = (self.weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
        cov = cov + torch.diag(torch.full((self.means.shape[1],), float(self.weights @ self.stds**2),
                                          dtype=torch.float64))
        return m, cov
