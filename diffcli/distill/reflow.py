"""Reflow (Liu et al. 2023, "Flow Straight and Fast", Algorithm 1): rectified flow on the teacher's couplings.

1. Pairs: for i = 0, 1, …: noise z_i (image i's seeded draw, diffcli.runtime.sample_generator) and the teacher's
   deterministic ODE sample x_i = ODE(σ_max·z_i). Stored in pairs/chunk_NNNNNN.safetensors, chunk by chunk, so an
   interrupted run resumes generating where it stopped; pair i depends only on (seed, i) and the settings.
2. Rectified flow: the straight interpolation between z and x is, in the VE convention, x_σ = x + σ·z (in flow
   time t = σ/(1+σ): x_t = (1-t)·x + t·z). The student is trained with the teacher's own denoising loss, but on
   the coupled noise z of each pair instead of fresh noise — so D(x_σ, σ) learns E[x | x_σ] along straight paths.
3. Optional k-step distillation (Liu et al. 2023, Sec. 2.3; `reflow.distill_steps = k`): once the flow is
   straight, new pairs (z, x') come from the *reflowed* flow's own ODE sampler, and the student is trained only
   at the k levels of its Euler grid (uniform in flow time) to send x' + σ_j·z to x'. A straight path makes
   one Euler step exact, so this removes what curvature is left at those k levels. The reflowed flow is kept
   as students/flow.safetensors, the k-step student as students/steps_00k.safetensors and last.safetensors.
4. Straightness (Liu et al. 2023, eq. 7) of a sampler's trajectories: S = ∫ E|(z - x) - v(x_t, t)|² dt / ∫ dt in
   flow time, with v = ε̂ - x̂0 = (x_σ - D)/σ - D, measured on a fine DDIM grid uniform in t; 0 means straight, and a
   straight flow is exact in one Euler step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import read_safetensors, save_safetensors
from ..errors import UserError
from ..generate import SampleSettings, generate
from ..runtime import sample_generator
from ..samplers import SAMPLER_INFO, SAMPLERS
from .common import Method, student_recipe


def flow_time_grid(n: int, sigma_max: float) -> Tensor:
    """n steps uniform in flow time t = σ/(1+σ), from σ_max down to 0: (n+1,) float64 σ grid."""
    t_max = sigma_max / (1 + sigma_max)
    t = torch.linspace(t_max, 0.0, n + 1, dtype=torch.float64)
    return t / (1 - t)


def straightness(denoiser, z: Tensor, sigma_max: float, steps: int = 64, cond: Tensor | None = None) -> float:
    """S (module docstring) of the deterministic (DDIM) trajectories from noise z (B, C, H, W), per dimension."""
    sigmas = flow_time_grid(steps, sigma_max)
    x = z.to(torch.float64) * sigma_max
    velocities, dts = [], []

    def cb(info):
        s = float(info["sigma"])
        v = (info["x"] - info["denoised"]) / s - info["denoised"]
        velocities.append(v)
        dts.append(s / (1 + s) - float(info["sigma_next"]) / (1 + float(info["sigma_next"])))

    fn = denoiser if cond is None else (lambda x_, s_: denoiser(x_, s_, cond.to(x_.device)))
    x1 = SAMPLERS["ddim"](fn, x, sigmas.to(x.device), callback=cb)
    straight = z.to(torch.float64) - x1
    total = sum(dt * (straight - v).square().flatten(1).mean(1) for v, dt in zip(velocities, dts))
    return float((total / sum(dts)).mean())


def pair_chunk(folder: Path, start: int) -> Path:
    """The file of the pairs from index `start` on."""
    return folder / f"chunk_{start:06d}.safetensors"


def make_pairs(teacher, channels: int, resolution: int, *, folder: Path, n: int, chunk: int, seed: int,
               sampler: str, steps: int, cfg: float, device: torch.device, log=print,
               source: dict[str, str] | None = None, stop=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Generate (or load, resuming) n pairs into `folder`: returns noise z (n, C, H, W), samples x (n, C, H, W)
    float32 and labels (n,) or None. `source` (the teacher's path and sha256) goes into every chunk: a resume
    interrupted before the first student finds its teacher there, and a chunk of another teacher is refused.
    `stop()`, asked before each new chunk, ends the generation (KeyboardInterrupt) between two whole chunks."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = SampleSettings(sampler=sampler, steps=steps, n=n, seed=seed, cfg=cfg, batch_size=chunk)
    key = {"sampler": sampler, "steps": str(steps), "seed": str(seed), "cfg": repr(cfg), "n": str(n)}
    zs, xs, ys = [], [], []
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        path = pair_chunk(folder, a)
        if path.exists():
            tensors, meta = read_safetensors(path)
            if any(meta.get(k) != v for k, v in key.items()) or meta.get("end") != str(b):
                raise UserError(f"{path}: pairs were made with other settings ({ {k: meta.get(k) for k in key} }); "
                                f"remove {folder} or use --force")
            was = meta.get("teacher_sha256")
            if source and was is not None and was != source["teacher_sha256"]:
                raise UserError(f"{path}: pairs were made by a teacher with sha256 {was}, not --teacher "
                                f"{source['teacher']!r} ({source['teacher_sha256']}); resume with the run's own teacher")
        else:
            if stop is not None and stop():
                raise KeyboardInterrupt
            x, rec = generate(teacher, channels, resolution, settings, device=device, indices=range(a, b),
                              show_progress=False)
            z = torch.stack([torch.randn(channels, resolution, resolution, generator=sample_generator(seed, i))
                             for i in range(a, b)])  # the very draw generate() started image i from
            tensors = {"noise": z, "sample": x}
            if rec["labels"] is not None:
                tensors["labels"] = torch.tensor(rec["labels"], dtype=torch.long)
            save_safetensors(path, tensors, {**key, **(source or {}), "start": str(a), "end": str(b)})
            log(f"pairs {b}/{n}")
        zs.append(tensors["noise"])
        xs.append(tensors["sample"])
        if "labels" in tensors:
            ys.append(tensors["labels"])
    return torch.cat(zs), torch.cat(xs), (torch.cat(ys) if ys else None)


class Reflow(Method):
    name = "reflow"

    def __init__(self, recipe, teacher) -> None:
        super().__init__(recipe, teacher)
        c = self.cfg
        if c.cfg != 1.0 and teacher.denoiser.num_classes == 0:
            raise UserError(f"reflow.cfg = {c.cfg}: the teacher {teacher.path} is unconditional")
        if SAMPLER_INFO[c.pair_sampler].stochastic:
            raise UserError(f"reflow.pair_sampler = {c.pair_sampler!r} is stochastic; reflow needs a deterministic one")
        steps = recipe.train.max_steps
        # optimizer steps of the reflow phase; the rest (if any) is the k-step distillation phase
        self.flow_steps = steps
        if c.distill_steps:
            self.flow_steps = max(1, min(steps - 1, round(steps * (1 - c.distill_fraction))))
        self.before = self.after = None
        self.phase = 1
        # with a distillation phase the budget is cut in two (distill_fraction): a resume keeps it
        self.budget_fixed_on_resume, self.budget_parts = bool(c.distill_steps), "reflow and distillation phases"

    def final_steps(self) -> int:
        return self.cfg.distill_steps or self.cfg.student_steps

    def _steps(self, steps: int | None) -> int:
        return steps or (self.final_steps() if self.phase == 2 else self.cfg.student_steps)

    def student_recipe(self, steps: int | None = None):
        return student_recipe(self.teacher.recipe, sampler="euler", steps=self._steps(steps))

    def student_sampling(self, steps: int | None = None):
        k = self._steps(steps)
        return "euler", k, [float(s) for s in flow_time_grid(k, self.teacher.denoiser.sigma_max)]

    def finished_students(self) -> dict[int, int]:
        return {self.total_steps(): self.final_steps()}

    def _pairs(self, eng, denoiser, folder: str, cfg: float):
        c, t = self.cfg, self.recipe.train
        source = ({"teacher": str(eng.teacher.path.resolve()), "teacher_sha256": eng.teacher_hash}
                  if folder == "pairs" else None)  # the second reflow's pairs come from the run's own student
        return make_pairs(denoiser, eng.channels, eng.resolution, folder=eng.out / folder, n=c.num_pairs,
                          chunk=c.chunk_size, seed=t.seed, sampler=c.pair_sampler, steps=c.pair_steps, cfg=cfg,
                          device=eng.dev, log=eng.log, source=source,
                          stop=getattr(eng, "stop_requested", None) if folder == "pairs" else None)

    def prepare(self, eng) -> None:
        c, t = self.cfg, self.recipe.train
        d = self.teacher.denoiser
        self.z, self.x, self.y = self._pairs(eng, d, "pairs", c.cfg)
        from ..train import BatchOrder

        self.order = BatchOrder(c.num_pairs, t.batch_size, t.seed)
        self.eval_z = self.z[: c.straightness_samples].to(eng.dev)
        self.eval_y = self.y[: c.straightness_samples].to(eng.dev) if self.y is not None else None
        if self.before is None:
            self.before = straightness(d, self.eval_z, d.sigma_max, c.straightness_steps, cond=self.eval_y)
            eng.log(f"straightness of the teacher's trajectories: {self.before:.5f}")

    def begin_step(self, eng, step: int) -> None:
        if self.phase == 2 or not self.cfg.distill_steps or step < self.flow_steps:
            return
        # the reflow phase is over (or was, before a resume): keep the flow, pair it with itself, distill
        c = self.cfg
        flow_path = eng.out / "students" / "flow.safetensors"
        if step == self.flow_steps or not flow_path.exists():
            eng.save_student(flow_path, step, c.student_steps)
            eng.log(f"step {step}: reflowed flow → students/flow.safetensors; pairing it for {c.distill_steps}-step "
                    f"distillation")
        from ..checkpoint import load_checkpoint

        flow = load_checkpoint(flow_path, eng.dev, kinds=("student",)).denoiser.requires_grad_(False).eval()
        self.after = straightness(flow, self.eval_z, flow.sigma_max, c.straightness_steps, cond=self.eval_y)
        eng.log(f"straightness: teacher {self.before:.5f} → reflowed flow {self.after:.5f}")
        # cfg 1: a flow reflowed on guided pairs already samples the guided distribution
        self.z, self.x, self.y = self._pairs(eng, flow, "pairs_flow", 1.0)
        if step == self.flow_steps:  # the distilled student starts from the flow (its EMA weights)
            eng.student.net.load_state_dict(eng.ema.net.state_dict())
        self.levels = flow_time_grid(c.distill_steps, flow.sigma_max)[:-1].float()
        self.phase = 2

    def batch(self, eng, step: int):
        idx = self.order.indices(step)
        self._z = self.z[idx].to(eng.dev)
        return self.x[idx].to(eng.dev), (self.y[idx].to(eng.dev) if self.y is not None else None)

    def loss(self, eng, step, x0, y, g):
        t = self.recipe.train
        if y is not None and t.p_uncond > 0:
            drop = torch.rand(y.shape[0], generator=g).to(y.device) < t.p_uncond
            y = torch.where(drop, torch.full_like(y, self.teacher.denoiser.num_classes), y)
        sigma = None
        if self.phase == 2:  # only the k levels the student will be sampled at
            sigma = self.levels[torch.randint(0, len(self.levels), (x0.shape[0],), generator=g)]
        return eng.student.loss(x0, y, generator=g, noise=self._z, sigma=sigma).mean()

    def report(self, eng) -> dict:
        c = self.cfg
        if self.after is None:  # no distillation phase: the final student is the reflowed flow
            d = eng.ema
            self.after = straightness(d, self.eval_z, d.sigma_max, c.straightness_steps, cond=self.eval_y)
            eng.log(f"straightness: teacher {self.before:.5f} → reflowed student {self.after:.5f}")
        out = {"straightness_teacher": self.before, "straightness_flow": self.after, "pairs": c.num_pairs}
        if not c.distill_steps:  # the student is the reflowed flow; a distilled one is not measured
            out["straightness_student"] = self.after
        if c.distill_steps:
            out.update(distill_steps=c.distill_steps, reflow_optimizer_steps=self.flow_steps)
        return out
