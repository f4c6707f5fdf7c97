"""The engine behind `diffcli distill`: one loop for every method, built from the training engine's parts.

A method (diffcli.distill.<method>) says what the student is (its recipe: network, parameterization, how it
samples), what one step's loss is, and when a student is finished. Everything else is `diffcli train`'s: the
run-folder policy (`prepare_run_folder`), seeded data order (`Batches`), EMA (`ema_beta`), learning rate
(`lr_at`), pickle-free training state and bit-exact resume (`save_state`/`load_state`/`latest_state`),
signals, metrics.csv, checkpoint retention and per-step seeding (`mix_seed`).

Run folder: recipe.toml (the distillation recipe), checkpoints/, samples/, metrics.csv, students/steps_NNN.safetensors
(every student produced), last.safetensors (the newest student), distill.json (summary), and pairs/ (pairs_flow/) for reflow.

A student is an ordinary model checkpoint (`kind = "student"`): its embedded recipe is the teacher's with the
student's parameterization and sampling section, and its metadata carries `student_sampler`, `student_steps`
and the exact σ grid `student_sigmas` it was distilled for, so `diffcli sample STUDENT` needs no options.
"""

from __future__ import annotations

import copy
import json
import math
import re
import signal
import time
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import (LoadedCheckpoint, atomic_write_text, build_denoiser, file_hash, load_checkpoint,
                          read_header, save_denoiser)
from ..data import load_dataset
from ..denoiser import Denoiser
from ..errors import Interrupted, RunFailure, UserError
from ..generate import SampleSettings, generate
from ..images import save_grid
from ..recipes import DistillRecipe, Recipe, load_distill_recipe
from ..runtime import mix_seed, progress, run_device
from ..train import (RUN_FOLDER_NAMES, Batches, LossWindow, _MetricsWriter, _retain, _Signals, _truncate_metrics,
                     check_run_folder, ema_beta, latest_state, load_state, lr_at, make_optimizer, prepare_run_folder,
                     remove_run_entry, save_state)

EXTRA_RUN_FILES = ("students", "pairs", "pairs_flow", "distill.json", "teacher.json")
# teacher.json: {"path", "sha256"} of the run's teacher, written when the run starts, so that a run stopped
# before its first checkpoint resumes without --teacher


# --- students -----------------------------------------------------------------------------------------------
def student_recipe(teacher: Recipe, *, sampler: str, steps: int, schedule: str | None = None,
                   parameterization: str | None = None, sigma_min: float | None = None,
                   guidance_embedding: bool = False, cfg: float | None = None) -> Recipe:
    """The teacher's recipe with the student's network input, parameterization and sampling section."""
    d = teacher.model_dump(mode="json")
    d["task"] = "denoiser"
    d["sample"].update(sampler=sampler, steps=steps, schedule=schedule)
    if cfg is not None:
        d["sample"]["cfg"] = cfg
    if parameterization is not None:
        d["diffusion"]["parameterization"] = parameterization
    if sigma_min is not None:
        d["diffusion"]["sigma_min"] = sigma_min
    d["model"]["guidance_embedding"] = guidance_embedding
    return Recipe.model_validate(d)


def init_student(recipe: Recipe, teacher: LoadedCheckpoint, device: torch.device) -> Denoiser:
    """The student network initialised from the teacher's weights (new inputs, e.g. w, start at zero)."""
    student = build_denoiser(recipe, teacher.channels, teacher.resolution, teacher.denoiser.num_classes)
    missing, unexpected = student.net.load_state_dict(teacher.denoiser.net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("map_guidance.") for k in missing):
        raise UserError(f"{teacher.path}: the teacher's weights do not fit the student network "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return student.to(device)


def load_teacher(path: str | Path, device: torch.device) -> LoadedCheckpoint:
    """A denoiser checkpoint, or a distilled student (stage two of guidance distillation, a second reflow…);
    a classifier, train state or foreign file is bad input (exit 2)."""
    ck = load_checkpoint(path, device, kinds=("denoiser", "student"))
    ck.denoiser.requires_grad_(False).eval()
    return ck


# --- the method interface -----------------------------------------------------------------------------------
class Method:
    """One distillation method. Subclasses set `name` and implement `loss`; the rest has sensible defaults."""

    name = ""

    # Whether a guidance-distilled student (a network with the scale w as an input) may be the teacher: only
    # progressive continues one (stage two of Meng et al. 2023); the others build a student without the w input.
    takes_guidance_teacher = False

    def __init__(self, recipe: DistillRecipe, teacher: LoadedCheckpoint) -> None:
        self.recipe, self.cfg, self.teacher = recipe, recipe.config, teacher
        if teacher.denoiser.guidance_input and not self.takes_guidance_teacher:
            raise UserError(f"--teacher {str(teacher.path)!r} is a guidance-distilled student (it takes the scale w "
                            f"as an input); method = {recipe.method!r} cannot distill it — continue it with "
                            f"method = 'progressive' (stage two), or distill its own teacher")

    # what the student is
    def student_recipe(self, steps: int | None = None) -> Recipe:
        raise NotImplementedError

    def student_sampling(self, steps: int | None = None) -> tuple[str, int, list[float]]:
        """(sampler, steps, σ grid ending with 0) the student samples with."""
        raise NotImplementedError

    # True where train.max_steps is cut into rounds or phases (named by budget_parts): a resume keeps the budget
    budget_fixed_on_resume = False
    budget_parts = ""

    def total_steps(self) -> int:
        return self.recipe.train.max_steps

    def finished_students(self) -> dict[int, int]:
        """{optimizer step: student steps} at which a finished student is written to students/."""
        sampler, steps, _ = self.student_sampling()
        return {self.total_steps(): steps}

    # the loop's hooks
    def prepare(self, eng: "Distiller") -> None:
        pass

    def begin_step(self, eng: "Distiller", step: int) -> None:
        pass

    def batch(self, eng: "Distiller", step: int) -> tuple[Tensor, Tensor | None]:
        return eng.batches.get(step)

    def loss(self, eng: "Distiller", step: int, x0: Tensor, y: Tensor | None, g: torch.Generator) -> Tensor:
        raise NotImplementedError

    def ema_decay(self, step: int) -> float:
        return ema_beta(self.recipe, step)

    def report(self, eng: "Distiller") -> dict:
        return {}


def get_method(recipe: DistillRecipe, teacher: LoadedCheckpoint) -> Method:
    from . import consistency, guidance, progressive, reflow

    cls = {"progressive": progressive.Progressive, "consistency": consistency.Consistency,
           "guidance": guidance.GuidanceDistillation, "reflow": reflow.Reflow}[recipe.method]
    return cls(recipe, teacher)


# --- the loop -------------------------------------------------------------------------------------------------
class Distiller:
    """State of one distillation run (the loop in `distill` drives it)."""

    def __init__(self, recipe: DistillRecipe, teacher: LoadedCheckpoint, method: Method, out: Path,
                 device: torch.device, log) -> None:
        self.recipe, self.teacher, self.method, self.out, self.dev, self.log = recipe, teacher, method, out, device, log
        self.channels, self.resolution = teacher.channels, teacher.resolution
        self.data = None
        self.batches = None

    def load_data(self) -> None:
        data = load_dataset(self.teacher.recipe.data)
        if len(data) == 0:
            raise UserError(f"teacher's data.name = {self.teacher.recipe.data.name!r}: the dataset is empty")
        self.data = data
        self.batches = Batches(data, self.recipe.train.batch_size, self.recipe.train.seed, self.dev,
                               self.teacher.recipe.data.num_workers)

    def save_student(self, path: Path, step: int, steps: int | None = None) -> None:
        sampler, n, sigmas = self.method.student_sampling(steps)
        extra = {"distill_method": self.method.name, "student_sampler": sampler, "student_steps": str(n),
                 "student_sigmas": json.dumps([float(s) for s in sigmas]), "teacher": str(self.teacher.path.resolve()),
                 "teacher_sha256": self.teacher_hash, "distill_recipe": self.recipe.to_json()}
        if self.ema.guidance_input:  # the w range it was trained on, carried through stage two (progressive)
            w = getattr(self.method, "w_range", None)
            w = json.dumps(list(w)) if w is not None else self.teacher.meta.get("guidance_w_range")
            if w is not None:
                extra["guidance_w_range"] = w
        save_denoiser(path, self.ema, self.method.student_recipe(steps), step=step, channels=self.channels,
                      resolution=self.resolution, kind="student", extra=extra)

    def sample_grid(self, path: Path, n: int) -> None:
        sampler, steps, sigmas = self.method.student_sampling()
        s = SampleSettings(sampler=sampler, steps=steps, sigmas=sigmas, n=n, seed=1234, batch_size=min(n, 256))
        imgs, _ = generate(self.ema, self.channels, self.resolution, s, device=self.dev, show_progress=False)
        save_grid(path, imgs)


def _newest_student(out: Path) -> Path | None:
    """The run's newest student file — the periodic checkpoint beside its newest training state (what an
    interrupted run leaves), else last.safetensors — or None when the run wrote none yet."""
    found = latest_state(out)
    if found is not None:
        ck = out / "checkpoints" / f"step_{found[0]:07d}.safetensors"
        if ck.is_file():
            return ck
    last = out / "last.safetensors"
    return last if last.is_file() else None


def _recorded(path: Path, key: str) -> str | None:
    """teacher.json's `key`, or None when the file is missing or unreadable."""
    try:
        v = json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return v if isinstance(v, str) else None


def recorded_teacher(out: Path) -> Path | None:
    """The teacher a distill run folder records (an absolute path) in its newest student's metadata, else in its
    first reflow pair chunk (a reflow stopped while making pairs), else in teacher.json (a run stopped before
    its first checkpoint); for --resume without --teacher. None when the run recorded none."""
    from .reflow import pair_chunk

    student = _newest_student(out)
    chunk = pair_chunk(out / "pairs", 0)
    if student is not None:
        path = read_header(student)[1].get("teacher")
    else:
        path = read_header(chunk)[1].get("teacher") if chunk.is_file() else _recorded(out / "teacher.json", "path")
        if not path:  # nothing started here, or pairs of a diffcli that did not record their teacher
            return None
    if not path or not Path(path).is_file():
        raise UserError(f"--resume {str(out)!r}: the run's teacher {path!r} is not there; give --teacher CKPT")
    return Path(path)


def distill(recipe: DistillRecipe, teacher_path: str | Path, out: Path, *, resume: bool = False,
            force: bool = False, device: str | None = None, log=print, show_progress: bool = True,
            teacher_given: bool = True) -> dict:
    """Distill the teacher checkpoint into students in the run folder `out`; returns the distill.json summary.
    `teacher_given`: False when the teacher is the one the run recorded (--resume without --teacher)."""
    t = recipe.train
    check_run_folder(out, resume=resume, force=force)
    dev = run_device(device, t.device)
    teacher = load_teacher(teacher_path, dev)
    method = get_method(recipe, teacher)  # validates the method against the teacher before anything is written
    if force and not resume and Path(teacher.path).resolve().is_relative_to(Path(out).resolve()):
        raise UserError(f"--teacher {str(teacher.path)!r} lies inside --out {str(out)!r}, which --force empties; "
                        f"copy the teacher elsewhere or choose another --out")
    if resume and method.budget_fixed_on_resume and latest_state(out) is not None:
        ran = load_distill_recipe(out / "recipe.toml").train.max_steps
        if ran != recipe.train.max_steps:
            # its rounds (or phases) are cut from the budget: another budget would re-cut a run half done
            raise UserError(f"--resume {str(out)!r}: {method.name} splits train.max_steps = {ran} into its "
                            f"{method.budget_parts}; a resumed run keeps it (given {recipe.train.max_steps})")
    if force and not resume:
        for f in EXTRA_RUN_FILES:
            remove_run_entry(out / f)
    teacher_hash = file_hash(teacher.path)
    ran_with = out / "teacher.json"
    if resume:  # the teacher the run recorded: in its newest student, else (stopped before one) teacher.json
        student = _newest_student(out)
        was = read_header(student)[1].get("teacher_sha256") if student is not None else _recorded(ran_with, "sha256")
        if was is not None and was != teacher_hash:
            if not teacher_given:
                raise UserError(f"--resume {str(out)!r}: the run's teacher {str(teacher.path)!r} has changed since "
                                f"(sha256 {was} then, {teacher_hash} now); restore it or give --teacher CKPT")
            raise UserError(f"--resume {str(out)!r}: the run was distilled from a teacher with sha256 {was}, but "
                            f"--teacher {str(teacher.path)!r} has {teacher_hash}; resume with the run's own teacher")
    recipe = prepare_run_folder(out, recipe, resume=resume, force=force, loader=load_distill_recipe)
    method.recipe, t = recipe, recipe.train
    from ..checkpoint import atomic_write_bytes

    atomic_write_bytes(out / "recipe.toml", recipe.to_toml().encode())
    atomic_write_text(ran_with, json.dumps({"path": str(Path(teacher.path).resolve()), "sha256": teacher_hash}))
    eng = Distiller(recipe, teacher, method, out, dev, log)
    eng.teacher_hash = teacher_hash
    torch.manual_seed(mix_seed(t.seed, 0, 3))
    eng.student = init_student(method.student_recipe(), teacher, dev)
    eng.ema = copy.deepcopy(eng.student).eval().requires_grad_(False)
    eng.opt = make_optimizer(eng.student.net.parameters(), lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    total = method.total_steps()
    start, resumed_window = 0, LossWindow()
    if resume:
        found = latest_state(out)
        if found is not None:
            start = load_state(found[1], eng.student.net, eng.ema.net, eng.opt, expect_step=found[0],
                               window=resumed_window)
            log(f"resumed {out} at step {start}")
    done = out / "distill.json"
    if resume and start >= total and (out / "last.safetensors").is_file() and done.is_file():
        # a finished run: its summary (time, last loss, students) stays the run's own, not a no-op's
        log(f"{out}: the run is complete at step {start} of {total}; nothing to do")
        try:
            return json.loads(done.read_text())
        except (OSError, ValueError):
            pass  # an unreadable summary is rewritten below from what the run holds
    _truncate_metrics(out / "metrics.csv", start, resumed_window)
    # reflow makes its pairs here, chunk by chunk, before any training step: SIGINT/SIGTERM end it between two
    # chunks (a second one at once), with the resume command, as in the training loop
    sigs = _Signals()
    eng.stop_requested = lambda: sigs.received is not None
    try:
        with sigs:
            method.prepare(eng)
            if sigs.received:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at step {start}, while preparing the {method.name} run (what it made is "
                          f"kept). Resume with: diffcli distill {out / 'recipe.toml'} --teacher {teacher.path} "
                          f"--out {out} --resume", 128 + (sigs.received or signal.SIGINT)) from None
    params = list(eng.student.net.parameters())
    ema_params = list(eng.ema.net.parameters())
    finished = method.finished_students()

    def checkpoint(step: int, window: LossWindow | None = None) -> Path:
        for p in params:
            if not torch.isfinite(p).all():
                raise RunFailure(f"step {step}: weights became non-finite; no checkpoint written")
        ck = out / "checkpoints" / f"step_{step:07d}.safetensors"
        save_state(out / "checkpoints" / f"step_{step:07d}.state.safetensors", step, recipe, eng.student.net,
                   eng.ema.net, eng.opt, window)
        eng.save_student(ck, step)
        _retain(out / "checkpoints", t.keep_last)
        return ck

    metrics = _MetricsWriter(out / "metrics.csv", resumed_window)
    t0 = time.perf_counter()
    step, window_imgs, window_t, last_ck, loss_v = start, 0, time.perf_counter(), None, float("nan")
    # the loss sum and count since the last row; a stop between rows left its window in the state
    win_sum, win_n = resumed_window.loss_sum, resumed_window.steps
    eng.student.train()
    with sigs, progress() as bar:
        task = bar.add_task(f"distill ({method.name})", total=total, completed=start, info="",
                            visible=show_progress)
        while step < total:
            method.begin_step(eng, step)
            g = torch.Generator().manual_seed(mix_seed(t.seed, step, 1))
            torch.manual_seed(mix_seed(t.seed, step, 4))
            x0, y = method.batch(eng, step)
            lr = lr_at(recipe, step) if t.lr_schedule == "constant" else _cosine_lr(recipe, step, total)
            for group in eng.opt.param_groups:
                group["lr"] = lr
            loss = method.loss(eng, step, x0, y, g)
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise RunFailure(f"step {step}: distillation loss is {loss_v}; stopping. The last good checkpoint "
                                 f"is {last_ck or 'not written yet'}; lower train.lr")
            eng.opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            eng.opt.step()
            torch._foreach_lerp_(ema_params, params, 1 - method.ema_decay(step))
            for b_ema, b in zip(eng.ema.net.buffers(), eng.student.net.buffers()):
                b_ema.copy_(b)
            win_sum, win_n = win_sum + loss_v, win_n + 1
            window_imgs += x0.shape[0]
            step += 1
            bar.update(task, completed=step, info=f"loss {loss_v:.4f}")
            budget = t.max_minutes is not None and (time.perf_counter() - t0) > 60 * t.max_minutes
            signalled = sigs.received  # read once: a later signal waits for the next step's checkpoint
            if step in finished:
                eng.save_student(out / "students" / f"steps_{finished[step]:03d}.safetensors", step, finished[step])
                log(f"step {step}: student with {finished[step]} step(s) → students/steps_{finished[step]:03d}.safetensors")
            log_row = step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == total or step in finished
            stop_window = None
            if log_row or budget or signalled:
                now = time.perf_counter()
                seconds = metrics.seconds_before + now - t0
                metrics.write([step, f"{win_sum / win_n:.8g}", f"{lr:.6g}",
                               f"{window_imgs / max(now - window_t, 1e-9):.1f}", f"{seconds:.2f}"])
                if not log_row:  # a stop between log rows: the state keeps its window for a resume
                    stop_window = LossWindow(win_sum, win_n, seconds)
                win_sum, win_n, window_imgs, window_t = 0.0, 0, 0, now
            if step % t.checkpoint_every == 0 or step == total or budget or signalled or step in finished:
                with sigs.saving(step):
                    last_ck = checkpoint(step, stop_window)
            if step % t.sample_every == 0 or step == total:
                eng.sample_grid(out / "samples" / f"step_{step:07d}.png", t.sample_grid)
            if signalled:
                raise Interrupted(f"interrupted at step {step}; checkpoint {last_ck} written. Resume with: diffcli "
                                  f"distill {out / 'recipe.toml'} --teacher {teacher.path} --out {out} --resume",
                                  128 + signalled)
            if budget:
                log(f"train.max_minutes = {t.max_minutes} spent at step {step} of {total}")
                break
    if last_ck is None:
        last_ck = checkpoint(step)
    final = out / "last.safetensors"
    eng.save_student(final, step)
    eng.ema.eval()
    summary = {"method": method.name, "teacher": str(Path(teacher.path).resolve()), "teacher_sha256": eng.teacher_hash,
               "steps": step, "total_steps": total,
               "seconds": round(metrics.seconds_before + time.perf_counter() - t0, 2),
               # None: no step taken (JSON has no NaN)
               "last_loss": loss_v if math.isfinite(loss_v) else None,
               "students": run_students(out), **method.report(eng)}
    atomic_write_text(out / "distill.json", json.dumps(summary, indent=2))
    return summary


def run_students(out: Path) -> list[str]:
    """The students a run wrote, relative to `out` (students/steps_NNN.safetensors, a reflow's flow.safetensors);
    other files a user put in students/ are kept there but are not the run's."""
    pattern = RUN_FOLDER_NAMES["students"]
    folder = out / "students"
    return sorted(str(p.relative_to(out)) for p in folder.iterdir() if re.fullmatch(pattern, p.name)
                  and p.is_file()) if folder.is_dir() else []


def _cosine_lr(recipe: DistillRecipe, step: int, total: int) -> float:
    t = recipe.train
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    return lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


# --- small shared numerics --------------------------------------------------------------------------------
def bcast(sigma: Tensor, x: Tensor) -> Tensor:
    """σ (B,) shaped to broadcast against x (B, C, H, W)."""
    return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def ddim_step(denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Tensor | None) -> Tensor:
    """One deterministic DDIM step σ → σ' (= Euler on the probability-flow ODE): x' = D + σ'/σ·(x - D)."""
    d = denoiser(x, sigma, cond)
    return d + bcast(sigma_next / sigma, x) * (x - d)


def heun_step(denoiser, x: Tensor, sigma: Tensor, sigma_next: Tensor, cond: Tensor | None) -> Tensor:
    """One Heun step of dx/dσ = (x - D(x, σ))/σ from σ to σ' > 0 (Karras et al. 2022, Alg. 1)."""
    s, s2 = bcast(sigma, x), bcast(sigma_next, x)
    d1 = (x - denoiser(x, sigma, cond)) / s
    x_e = x + (s2 - s) * d1
    d2 = (x_e - denoiser(x_e, sigma_next, cond)) / s2
    return x + (s2 - s) * (d1 + d2) / 2
