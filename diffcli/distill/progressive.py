"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion
Models", Algorithm 2), in the VE convention x = x0 + σ·ε.

The teacher samples with N deterministic DDIM steps on a grid σ_0 > … > σ_N = 0. The student gets every other
level and learns to do in one DDIM step what the teacher does in two: from x at σ = σ_{2i}, two teacher steps
give x'' at σ'' = σ_{2i+2}; the x0 that carries a single DDIM step x → x'' is

    x̃ = (x'' - (σ''/σ)·x) / (1 - σ''/σ)          (= x'' on the last step, σ'' = 0)

and the student regresses D_student(x, σ) on x̃ with the "truncated SNR" weight max(SNR, 1) = max(1/σ², 1)
(the paper's x-space weighting, Sec. 4). The student then becomes the teacher of the next round, halving N
until the recipe's target. ε-prediction is refused: at σ ≫ 1 (x ≈ σ·ε) predicting x0 = x - σ·ε̂ multiplies
the network's error by σ, which is why the paper switches to x0 / v (Sec. 4).

Stage two of guidance distillation (Meng et al. 2023, Sec. 3.2): when the teacher is a guidance-distilled
student (it takes the CFG scale w as an input), every batch draws w ~ U[w_min, w_max], teacher and student
both get it, and the few-step students keep the w input — `diffcli sample STUDENT --cfg w` then costs one
forward per step at any w in the range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..checkpoint import load_checkpoint
from ..errors import UserError
from ..generate import recorded_w_range
from ..samplers import get_sigmas
from .common import Method, bcast, ddim_step, student_recipe


def progressive_target(teacher, x: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor,
                       cond: Tensor | None = None) -> Tensor:
    """x̃ (B, C, H, W): the x0 that makes one DDIM step σ → σ'' land where two teacher DDIM steps σ → σ_mid → σ''
    land. σ, σ_mid, σ'' are (B,) with σ > σ_mid > σ'' ≥ 0."""
    with torch.no_grad():
        x_mid = ddim_step(teacher, x, sigma, sigma_mid, cond)
        x_next = ddim_step(teacher, x_mid, sigma_mid, sigma_next, cond)
    ratio = bcast(sigma_next / sigma, x)
    return (x_next - ratio * x) / (1 - ratio)


def progressive_loss(student, teacher, x0: Tensor, cond: Tensor | None, teacher_grid: Tensor,
                     generator: torch.Generator, guidance: Tensor | None = None) -> Tensor:
    """Mean weighted loss of one batch: x0 (B, C, H, W) data, `teacher_grid` (2K+1,) the teacher's DDIM grid
    (decreasing, ending with 0); the student's grid is teacher_grid[::2]. `guidance` (B,): the CFG scale w
    both networks take (guidance-distilled teacher), or None."""
    if guidance is not None:
        student = _with_guidance(student, guidance)
        teacher = _with_guidance(teacher, guidance)
    b, k = x0.shape[0], (len(teacher_grid) - 1) // 2
    i = torch.randint(0, k, (b,), generator=generator)
    grid = teacher_grid.to(torch.float32)
    sigma, sigma_mid, sigma_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x = x0 + bcast(sigma.to(x0.device), x0) * eps
    dev = x0.device
    target = progressive_target(teacher, x, sigma.to(dev), sigma_mid.to(dev), sigma_next.to(dev), cond)
    pred = student(x, sigma.to(dev), cond)
    w = (1 / sigma.to(dev) ** 2).clamp(min=1.0)  # truncated SNR, max(SNR, 1)
    return (w * (pred - target).square().flatten(1).mean(1)).mean()


def _with_guidance(denoiser, w: Tensor):
    """denoiser(x, σ, cond) with the CFG-scale input w (B,) bound."""
    return lambda x, sigma, cond=None: denoiser(x, sigma, cond, guidance=w)


def teacher_w_range(teacher) -> tuple[float, float]:
    """The w range a guidance-distilled teacher was trained for (generate.recorded_w_range), else Meng et al.'s
    [1, 4]."""
    return recorded_w_range(teacher.meta) or (1.0, 4.0)


class Progressive(Method):
    name = "progressive"
    budget_fixed_on_resume, budget_parts = True, "equal rounds"
    takes_guidance_teacher = True

    def __init__(self, recipe, teacher) -> None:
        super().__init__(recipe, teacher)
        c = self.cfg
        param = teacher.denoiser.parameterization if c.parameterization == "teacher" else c.parameterization
        if param == "eps":
            raise UserError("progressive.parameterization = 'teacher': the teacher predicts ε, which breaks at high "
                            "noise (x0 = x - σ·ε̂ amplifies errors by σ); set progressive.parameterization = 'x0' or 'v'")
        self.param = param
        self.guided = bool(teacher.denoiser.guidance_input)
        if not self.guided and (c.w_min is not None or c.w_max is not None):
            raise UserError(f"progressive.w_min/w_max: {teacher.path} takes no guidance scale (it is not a "
                            f"guidance-distilled student); remove them or distill with method = 'guidance' first")
        lo, hi = teacher_w_range(teacher)
        self.w_range = (c.w_min if c.w_min is not None else lo, c.w_max if c.w_max is not None else hi)
        if self.guided and self.w_range[0] > self.w_range[1]:
            raise UserError(f"progressive.w_min/w_max: the range {self.w_range} is empty")
        self.rounds = int(math.log2(c.teacher_steps // c.target_steps))
        self.per_round = math.ceil(recipe.train.max_steps / self.rounds)
        d = teacher.denoiser
        self.base = get_sigmas(c.schedule, c.teacher_steps, d.sigma_min, d.sigma_max, process=d.process)
        if len(self.base) != c.teacher_steps + 1:
            raise UserError(f"progressive.schedule = {c.schedule!r} repeats levels with {c.teacher_steps} steps on "
                            f"this teacher; choose another schedule or fewer teacher_steps")
        self.round, self.round_teacher = -1, None

    def steps_after(self, r: int) -> int:
        return self.cfg.teacher_steps >> (r + 1)

    def total_steps(self) -> int:
        return self.per_round * self.rounds

    def finished_students(self) -> dict[int, int]:
        return {(r + 1) * self.per_round: self.steps_after(r) for r in range(self.rounds)}

    def student_recipe(self, steps: int | None = None):
        steps = steps or self.steps_after(max(self.round, 0))
        return student_recipe(self.teacher.recipe, sampler="ddim", steps=steps, parameterization=self.param,
                              guidance_embedding=self.guided,
                              cfg=self.teacher.recipe.sample.cfg if self.guided else None)

    def student_sampling(self, steps: int | None = None):
        if steps is None:  # the student being trained now
            steps = self.steps_after(max(self.round, 0))
        stride = self.cfg.teacher_steps // steps
        return "ddim", steps, [float(s) for s in self.base[::stride]]

    def begin_step(self, eng, step: int) -> None:
        r = min(step // self.per_round, self.rounds - 1)
        if r == self.round:
            return
        self.round = r
        if r == 0:
            self.round_teacher = self.teacher.denoiser
        else:  # the previous round's student, as written to students/ (also what a resumed run reads)
            prev = eng.out / "students" / f"steps_{self.steps_after(r - 1):03d}.safetensors"
            self.round_teacher = load_checkpoint(prev, eng.dev, kinds=("student",)).denoiser.requires_grad_(False)
            if step == r * self.per_round:  # the new student starts as the new teacher (its EMA weights)
                eng.student.net.load_state_dict(eng.ema.net.state_dict())
        eng.log(f"round {r + 1}/{self.rounds}: teacher {self.cfg.teacher_steps >> r} DDIM steps → student "
                f"{self.steps_after(r)}")

    def prepare(self, eng) -> None:
        asked = self.recipe.train.max_steps
        if self.total_steps() != asked:  # every round trains the same number of steps
            eng.log(f"note: train.max_steps = {asked} split over {self.rounds} rounds: {self.per_round} steps a "
                    f"round, {self.total_steps()} in all")
        eng.load_data()

    def loss(self, eng, step, x0, y, g):
        t = self.recipe.train
        if y is not None and t.p_uncond > 0:  # keep the unconditional branch alive for CFG
            drop = torch.rand(y.shape[0], generator=g).to(y.device) < t.p_uncond
            y = torch.where(drop, torch.full_like(y, self.teacher.denoiser.num_classes), y)
        stride = 1 << self.round
        w = None
        if self.guided:
            lo, hi = self.w_range
            w = (lo + (hi - lo) * torch.rand(x0.shape[0], generator=g)).to(x0.device)
        return progressive_loss(eng.student, self.round_teacher, x0, y, self.base[::stride], g, guidance=w)

    def report(self, eng) -> dict:
        out = {"rounds": self.rounds, "steps_per_round": self.per_round,
               "student_steps": [self.steps_after(r) for r in range(self.rounds)]}
        if self.guided:
            out["w_range"] = list(self.w_range)
        return out
