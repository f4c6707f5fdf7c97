"""Guidance as denoiser wrappers, so every sampler gets it for free.

Classifier-free guidance (Ho & Salimans 2022): D_s = D(x, σ, ∅) + s·(D(x, σ, y) - D(x, σ, ∅)), with both
halves in one batched forward. s = 1 is the conditional model, s = 0 the unconditional one. An optional σ
interval [lo, hi] applies guidance only there (Kynkäänniemi et al. 2024) and is the conditional model
elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Conditioned:
    """A denoiser bound to class labels `cond` (B,) (or None) and a CFG scale: called as D(x, σ)."""

    def __init__(self, denoiser, cond: Tensor | None, cfg_scale: float = 1.0,
                 interval: tuple[float, float] | None = None) -> None:
        self.denoiser, self.cond, self.scale, self.interval = denoiser, cond, cfg_scale, interval
        self.network_evaluations = 0  # forward passes per sample, counting both CFG halves

    def _guided_here(self, sigma: Tensor) -> bool:
        if self.cond is None or self.scale == 1.0:
            return False
        if self.interval is None:
            return True
        s = float(sigma.reshape(-1)[0])
        return self.interval[0] <= s <= self.interval[1]

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        cond = None if self.cond is None else self.cond.to(x.device)
        if not self._guided_here(sigma):
            self.network_evaluations += 1
            return self.denoiser(x, sigma, cond)
        self.network_evaluations += 2
        null = torch.full_like(cond, self.denoiser.num_classes)
        d = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, null]))
        d_cond, d_uncond = d.chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)


class ClassifierGuided:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 1, in the denoiser form of Karras et al.'s
    notation): D_s(x, σ) = D(x, σ) + s·σ²·∇_x log p(y | x, σ), the posterior mean of the tilted density
    p(x) p(y|x)^s. `inner` is a denoiser already bound to its labels (e.g. `Conditioned`), `classifier(x, σ)`
    returns logits (B, K) and `labels` (B,) are the requested classes. s = 0 is `inner` unchanged (and makes
    no classifier call)."""

    def __init__(self, inner, classifier, labels: Tensor, scale: float) -> None:
        self.inner, self.classifier, self.labels, self.scale = inner, classifier, labels, scale

    @property
    def network_evaluations(self) -> int:
        return getattr(self.inner, "network_evaluations", 0)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        d = self.inner(x, sigma)
        if self.scale == 0:
            return d
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, sigma.float()), dim=1)
            picked = logp.gather(1, self.labels.to(x.device).long()[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, xg)
        s2 = sigma.to(d.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
        return d + self.scale * s2 * grad.to(d.dtype)


class GuidanceInput:
    """A guidance-distilled student (Meng et al. 2023) bound to labels and a scale w: the student takes w as an
    input, so guided sampling costs one forward per step instead of CFG's two."""

    def __init__(self, denoiser, cond: Tensor | None, cfg_scale: float = 1.0) -> None:
        self.denoiser, self.cond, self.scale = denoiser, cond, cfg_scale
        self.network_evaluations = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.network_evaluations += 1
        cond = None if self.cond is None else self.cond.to(x.device)
        w = torch.full((x.shape[0],), float(self.scale), device=x.device)
        return self.denoiser(x, sigma, cond, guidance=w)
