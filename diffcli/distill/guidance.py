"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one).

A class-conditional teacher trained with label dropout gives the classifier-free-guided denoiser
    D_w(x, σ, y) = D(x, σ, ∅) + w·(D(x, σ, y) - D(x, σ, ∅))          (Ho & Salimans 2022)
at the cost of two forwards. The student takes w as an input (a zero-initialised embedding added to the noise
embedding, diffcli.nets.unet `guidance_embedding`) and regresses D_student(x, σ, y, w) on D_w over
w ~ U[w_min, w_max], with x = x0 + σ·ε on data and σ drawn as the teacher was trained, weighted as the teacher's
loss. `diffcli sample STUDENT --cfg w` then costs one forward per step. Stage two of the paper — progressive
distillation of the guided student to a few steps — is `method = "progressive"` with this student as the teacher
(diffcli.distill.progressive keeps the w input).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..denoiser import loss_weight, skip_out
from ..errors import UserError
from ..generate import default_schedule
from ..samplers import SAMPLER_INFO, get_sigmas
from .common import Method, bcast, student_recipe


def guidance_target(teacher, x: Tensor, sigma: Tensor, cond: Tensor, w: Tensor) -> Tensor:
    """D_w(x, σ, y) (B, C, H, W) of a class-conditional teacher; w (B,). At w = 1 it is D(x, σ, y) exactly: the
    unconditional half is then not evaluated."""
    with torch.no_grad():
        d_cond = teacher(x, sigma, cond)
        if bool((w == 1).all()):
            return d_cond
        d_uncond = teacher(x, sigma, torch.full_like(cond, teacher.num_classes))
        return d_uncond + bcast(w, x) * (d_cond - d_uncond)


class GuidanceDistillation(Method):
    name = "guidance"

    def __init__(self, recipe, teacher) -> None:
        super().__init__(recipe, teacher)
        if teacher.denoiser.num_classes == 0:
            raise UserError(f"method = 'guidance' needs a class-conditional teacher; {teacher.path} is "
                            f"unconditional (num_classes = 0)")
        if teacher.recipe.train.p_uncond <= 0:
            raise UserError(f"method = 'guidance': {teacher.path} was trained without label dropout "
                            f"(train.p_uncond = 0), so it has no unconditional model to guide with")
        c = self.cfg
        if c.sampler not in SAMPLER_INFO or SAMPLER_INFO[c.sampler].adaptive:
            raise UserError(f"guidance.sampler = {c.sampler!r}: choose one of "
                            f"{', '.join(k for k, v in SAMPLER_INFO.items() if not v.adaptive)}")

    def student_recipe(self, steps: int | None = None):
        return student_recipe(self.teacher.recipe, sampler=self.cfg.sampler, steps=self.cfg.steps,
                              guidance_embedding=True, cfg=(self.cfg.w_min + self.cfg.w_max) / 2)

    def student_sampling(self, steps: int | None = None):
        d, c = self.teacher.denoiser, self.cfg
        grid = get_sigmas(default_schedule(c.sampler, d.process), c.steps, d.sigma_min, d.sigma_max,
                          process=d.process)
        return c.sampler, c.steps, [float(s) for s in grid]

    def prepare(self, eng) -> None:
        eng.load_data()

    def loss(self, eng, step, x0, y, g):
        d, c = self.teacher.denoiser, self.cfg
        b = x0.shape[0]
        w = (c.w_min + (c.w_max - c.w_min) * torch.rand(b, generator=g)).to(x0.device)
        sigma = d.process.sample_sigma(b, g, method=d.sigma_sampling, p_mean=d.p_mean, p_std=d.p_std).to(x0.device)
        x = x0 + bcast(sigma, x0) * torch.randn(x0.shape, generator=g).to(x0)
        target = guidance_target(d, x, sigma, y, w)
        pred = eng.student(x, sigma, y, guidance=w)
        # the teacher's own weighting, in x0 space: λ = (F-space weight) / c_out²
        _, c_out = skip_out(d.parameterization, sigma, d.sigma_data)
        lam = loss_weight(d.weighting, d.parameterization, sigma, d.sigma_data, d.min_snr_gamma) / c_out**2
        return (lam * (pred - target).square().flatten(1).mean(1)).mean()

    @property
    def w_range(self) -> tuple[float, float]:
        """The guidance scales the student is trained on (recorded in every student: metadata guidance_w_range)."""
        return self.cfg.w_min, self.cfg.w_max

    def report(self, eng) -> dict:
        return {"w_range": list(self.w_range)}
