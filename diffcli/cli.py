"""The `diffcli` command line (typer): parse, load, call an engine, map errors to exit codes. Thin by design.

Exit codes: 0 ok · 1 runtime failure · 2 bad input (one line `error: …`) · 130 SIGINT · 143 SIGTERM.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .errors import DiffcliError, Interrupted, UserError

app = typer.Typer(
    name="diffcli", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="One toolkit for diffusion models: [bold]train[/] → [bold]sample[/] → [bold]distill[/] → "
         "[bold]eval-fid[/] → [bold]encode[/], on one safetensors checkpoint format.\n\nQuick start:  [cyan]diffcli train recipes/digits.toml --out runs/digits[/] then "
         "[cyan]diffcli sample runs/digits/last.safetensors --out samples/digits[/]",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"diffcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """diffcli: train, sample, distill, evaluate and invert diffusion models."""


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _escape(text: str) -> str:
    """Text shown through rich as it is: a path or formula with [brackets] is not markup."""
    from rich.markup import escape

    return escape(text)


def _lines(con):
    """The progress log of a long command: one message per line at any terminal width — rich wraps at 80 columns
    when stderr is a pipe (CI logs, `2> log`), which would split a line that scripts grep."""
    return lambda msg: con.print(msg, soft_wrap=True, markup=False)  # paths and formulas may hold [brackets]


def _table(title: str, rows: list[tuple[str, str]]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, Text(v))  # values as they are: a path with [brackets] is not markup
    return table


def _max_steps_override(max_steps: int | None) -> list[str]:
    """`--max-steps N` of train and distill as the recipe override it stands for (checked here, so the error
    names the option)."""
    if max_steps is None:
        return []
    if max_steps < 1:
        raise UserError(f"--max-steps {max_steps}: must be ≥ 1")
    return [f"train.max_steps={max_steps}"]


@app.command()
def train(
    recipe: Optional[Path] = typer.Argument(None, help="TOML recipe (optional with --resume: the run's own)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/RECIPE_NAME)."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set train.lr=1e-3."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Override train.max_steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an --out that already holds a run."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: recipe)."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (devices) to train on: launches torchrun."),
) -> None:
    """Train a denoiser from a recipe; writes checkpoints, grids and metrics.csv into the run folder.

    Examples:

      diffcli train recipes/digits.toml --out runs/digits

      diffcli train recipes/digits.toml --set train.lr=2e-3 --max-steps 500 --out runs/try

      diffcli train --out runs/digits --resume

      diffcli train recipes/cifar10.toml --nproc 4      (or: torchrun --nproc-per-node 4 -m diffcli train …)
    """
    from .recipes import load_recipe

    overrides = list(set_) + _max_steps_override(max_steps)
    if out is not None:  # the folder's own refusals (--resume with --force, no run to resume) come first
        from .train import check_run_folder

        check_run_folder(out, resume=resume, force=force)
    if recipe is None:
        if not (resume and out is not None):
            raise UserError("train needs a RECIPE (or --out RUN --resume to continue a run with its own recipe)")
        recipe = out / "recipe.toml"
    rec = load_recipe(recipe, overrides)
    if out is None:  # the default run folder comes from the recipe: it must stay inside runs/
        name = rec.name or recipe.stem
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise UserError(f"{recipe}: name = {name!r} is not a plain folder name; the default run folder is "
                            f"runs/NAME (or give --out)")
        out = Path("runs") / name
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be ≥ 1")
    if nproc > 1:  # the recipe is valid and the folder usable: now hand over to torchrun
        from .runtime import run_device
        from .train import check_run_folder

        check_run_folder(out, resume=resume, force=force)
        # what needs no worker is checked here, once, before torchrun prints its banner and starts N of them
        run_device(device, rec.train.device)
        if rec.train.batch_size < nproc:
            raise UserError(f"train.batch_size = {rec.train.batch_size} is smaller than the {nproc} processes "
                            f"(--nproc {nproc}): each takes a share of the global batch")
        argv = [a for a in sys.argv[1:] if a != "--debug"]
        raise typer.Exit(_relaunch_without_nproc(nproc, argv))
    from .train import train as run_train  # torch loads only once the recipe is known to be good

    con = _console()
    res = run_train(rec, out, resume=resume, force=force, device=device, log=_lines(con))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    con.print(_table("diffcli train", [
        ("run folder", str(res.out)), ("steps", str(res.step)), ("stopped by", res.stopped_by),
        ("loss, last step", f"{res.last_loss:.5f}" if res.last_loss == res.last_loss else "— (no step taken)"),
        ("images/s", f"{res.images_per_s:.0f}"),
        ("parameters", f"{res.parameters:,}"), ("wall-clock", f"{res.seconds:.1f} s"),
        *([("device", res.device)] if res.device else []),
        ("checkpoint", str(res.out / "last.safetensors")),
    ]))
    if res.stopped_by == "max_minutes":  # a clean stop (exit 0) that a script may want to continue
        con.print(f"train.max_minutes spent at step {res.step} of {rec.train.max_steps}; continue with: diffcli "
                  f"train --out {res.out} --resume (the budget applies again to each resume)", soft_wrap=True,
                  markup=False)


@app.command()
def sample(
    checkpoint: Optional[Path] = typer.Argument(None, help="A diffcli .safetensors checkpoint."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler name (see --list) (default: recipe)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: recipe)."),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Denoiser-call budget; chooses --steps to fit."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="karras | logsnr | logsnr_leading | logsnr_leading_ms | logsnr_linspace | uniform | linear | tuned."),
    eta: Optional[float] = typer.Option(None, "--eta", help="Stochasticity η in [0, 1] (ddim, euler_ancestral, dpmpp_2m_sde)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (1 = none) "
                                        "(default: recipe's sample.cfg, 1 unless the checkpoint sets it)."),
    class_id: Optional[int] = typer.Option(None, "--class", help="Class id for every image (default: cycle)."),
    n: Optional[int] = typer.Option(None, "--n", "-n", help="Number of images (default: recipe's sample.n)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch (results do not depend on it)."),
    seed: int = typer.Option(0, "--seed", help="Run seed; image i depends only on (seed, i)."),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Sample folder."),
    force: bool = typer.Option(False, "--force", help="Overwrite a sample folder that already holds samples."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    list_: bool = typer.Option(False, "--list", help="List the samplers and exit."),
    cfg_interval: Optional[str] = typer.Option(None, "--cfg-interval", help="LO,HI: apply --cfg only for σ in [LO, HI]."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Noise-conditional classifier checkpoint "
                                              "(train with task = \"classifier\") for classifier guidance."),
    classifier_scale: float = typer.Option(0.0, "--classifier-scale", help="Classifier-guidance scale s (0 = none)."),
    s_churn: Optional[float] = typer.Option(None, "--s-churn", help="heun: Karras et al.'s S_churn ≥ 0."),
    s_noise: Optional[float] = typer.Option(None, "--s-noise", help="heun/euler_ancestral/dpmpp_2m_sde: noise scale."),
    snr: Optional[float] = typer.Option(None, "--snr", help="pc: Langevin corrector signal-to-noise ratio in (0, 1]."),
    corrector_steps: Optional[int] = typer.Option(None, "--corrector-steps", help="pc: Langevin steps per level."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="rk45: relative (and absolute) tolerance."),
    tune_schedule: bool = typer.Option(False, "--tune-schedule", help="Fit this sampler's σ grid (--tune-method "
                                       "grid) or its grid and step coefficients (bns) to this checkpoint and --nfe "
                                       "against an rk45 reference (diffcli.tuning); store it beside the checkpoint "
                                       "(CKPT.schedules.safetensors) and sample with it. Later: --schedule tuned."),
    tune_method: str = typer.Option("grid", "--tune-method", help="grid: Nelder–Mead on the σ grid, forward calls "
                                    "only | bns: grid + step coefficients by Adam (backprop through the network)."),
    tune_draws: int = typer.Option(512, "--tune-draws", help="Noise draws the solver is tuned on (¼ held out)."),
    tune_iters: int = typer.Option(200, "--tune-iters", help="Evaluations (grid) or Adam iterations (bns) of "
                                   "--tune-schedule."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (devices) to sample on: launches torchrun; the "
                              "images are identical to one process's."),
) -> None:
    """Sample images from a checkpoint into a sample folder (grid.png, images/, sample.json).

    Examples:

      diffcli sample runs/digits/last.safetensors --sampler ddim --steps 50 --cfg 2 --out samples/digits

      diffcli sample ckpt.safetensors --sampler ddpm --steps 1000 --class 3 --n 16 --out samples/threes

      diffcli sample ckpt.safetensors --nfe 10 --n 10000 --nproc 4 --out samples/big   (or: torchrun … -m diffcli sample …)
    """
    from .samplers import SAMPLER_INFO

    if list_:
        from rich.table import Table

        table = Table(title="samplers")
        for col in ("name", "order", "stochastic", "NFE for N steps", "default schedule", "what"):
            table.add_column(col, no_wrap=col != "what")
        for info in SAMPLER_INFO.values():
            # "uniform" (the model's own time) is the default on VP and flow models; EDM and VE models, whose
            # time is σ itself, get karras (generate.default_schedule)
            sched = "uniform (VP, flow) / karras (EDM, VE)" if info.default_schedule == "uniform" \
                else info.default_schedule
            table.add_row(info.name, str(info.order), "yes" if info.stochastic else "no",
                          info.cost_text, sched, info.description)
        from rich.console import Console

        # piped or in a CI log rich would fold the table into 80 columns and cut the names: give it room,
        # unless COLUMNS says how wide (rich honours it)
        wide = sys.stdout.isatty() or "COLUMNS" in os.environ
        Console(width=None if wide else 200).print(table)
        return
    if checkpoint is None:
        raise UserError("sample needs a CHECKPOINT (a .safetensors file)")
    from .checkpoint import load_checkpoint
    from .generate import SampleSettings, validate_settings, write_sample_folder
    from .runtime import resolve_device

    from . import distributed as dist

    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be ≥ 1")
    if nproc > 1 and dist.launched():
        raise UserError(f"--nproc {nproc}: already running under torchrun; give one or the other")
    world, dev = dist.init(resolve_device(device))  # under torchrun: one rank per device, images sharded
    ck = load_checkpoint(checkpoint, dev)
    rs = ck.recipe.sample
    name = sampler or rs.sampler
    if name not in SAMPLER_INFO:
        raise UserError(f"--sampler {name!r}: unknown; choose one of {', '.join(SAMPLER_INFO)}")
    options = {k: v for k, v in {"s_churn": s_churn, "s_noise": s_noise, "snr": snr, "corrector_steps": corrector_steps,
                                 "rtol": rtol, "atol": rtol}.items() if v is not None}
    if nfe is not None:
        if steps is not None:
            raise UserError("give --steps or --nfe, not both")
        from .recipes import MAX_STEPS

        if not 1 <= nfe <= MAX_STEPS:  # finding the steps for a budget counts up to it: 10^11 would not return
            raise UserError(f"--nfe {nfe}: must be in [1, {MAX_STEPS}]")
        if SAMPLER_INFO[name].adaptive:
            raise UserError(f"--nfe {nfe}: {name} is adaptive (its NFE follows from --rtol); use --rtol")
        steps = SAMPLER_INFO[name].steps_for_nfe(nfe, **options)
        if steps < 1:
            raise UserError(f"--nfe {nfe}: too small for {name} (one step costs "
                            f"{SAMPLER_INFO[name].nfe(1, **options)} denoiser calls)")
    elif steps is not None and SAMPLER_INFO[name].adaptive:
        raise UserError(f"--steps {steps}: {name} is adaptive (it takes its own steps, their number follows from "
                        f"--rtol); use --rtol")
    steps_given = steps is not None  # --steps, or --nfe turned into steps
    steps = steps if steps is not None else rs.steps
    n = n if n is not None else rs.n
    if cfg is None:  # e.g. a guidance-distilled student records the middle of its w range
        cfg = rs.cfg if ck.denoiser.num_classes else 1.0
    if steps < 1:
        raise UserError(f"--steps {steps}: must be ≥ 1")
    interval = None
    if cfg_interval is not None:
        try:
            lo, hi = (float(v) for v in cfg_interval.split(","))
        except ValueError:
            raise UserError(f"--cfg-interval {cfg_interval!r}: expected LO,HI (two numbers)") from None
        interval = (lo, hi)
    if tune_schedule:
        schedule = "tuned"
        if not steps_given and world.is_main and not SAMPLER_INFO[name].adaptive:
            _console().print(f"note: tuning {name} at the recipe's {steps} steps (NFE "
                             f"{SAMPLER_INFO[name].nfe(steps, **options)}); give --nfe N for the budget you will "
                             f"sample at", soft_wrap=True, markup=False)
    s = SampleSettings(sampler=name, steps=steps, schedule=schedule or rs.schedule, eta=eta, cfg=cfg,
                       class_id=class_id, n=n, batch_size=batch_size, seed=seed, options=options,
                       cfg_interval=interval, classifier=str(classifier) if classifier else None,
                       classifier_scale=classifier_scale)
    if class_id is not None and not ck.denoiser.num_classes and classifier is None:
        raise UserError(f"--class {class_id}: the model is unconditional (no classes); classifier guidance "
                        f"(--classifier CKPT --classifier-scale S) can pick a class for it")
    validate_settings(s, ck.denoiser.num_classes, ck.denoiser.guidance_input)
    if world.is_main:
        from .generate import sampling_warning

        warning = sampling_warning(s, ck.denoiser, ck.meta)
        if warning:
            _console().print(f"[yellow]warning:[/] {_escape(warning)}", soft_wrap=True)
    if ck.denoiser.guidance_input and world.is_main:
        from .generate import guidance_range_warning

        warning = guidance_range_warning(s, ck.meta)
        if warning:
            _console().print(f"[yellow]warning:[/] {_escape(warning)}", soft_wrap=True)
    from .classifier import guiding_classifier

    clf = guiding_classifier(classifier, classifier_scale, ck.meta, ck.denoiser.num_classes, dev, class_id)
    from .runtime import check_out_folder

    check_out_folder(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {str(out)!r} is not empty; choose another folder or pass --force to overwrite")
    _refuse_escaping_subfolders(out, ("images",))
    from .images import check_images_replaceable

    check_images_replaceable(out)
    if s.schedule == "tuned":
        from .generate import resolve_tuned_schedule

        resolve_tuned_schedule(ck, s, dev, tune=tune_schedule, draws=tune_draws, iters=tune_iters,
                               method=tune_method, log=_lines(_console()))
    if nproc > 1:  # every input checked (and a --tune-schedule fitted, once, here): the ranks sample its result
        argv = [a for a in sys.argv[1:] if a not in ("--debug", "--tune-schedule")]
        raise typer.Exit(_relaunch_without_nproc(nproc, argv + (["--schedule", "tuned"] if tune_schedule else [])))
    from .generate import generate_sharded

    result = generate_sharded(ck.denoiser, ck.channels, ck.resolution, s, device=dev, world=world, classifier=clf)
    if result is None:  # not rank 0: rank 0 writes the folder
        dist.finish()
        return
    images, record = result
    write_sample_folder(out, images, record, s, ck, dev)
    dist.finish()
    _console().print(_table("diffcli sample", [
        ("images", f"{len(images)} → {out / 'images'}"), ("grid", str(out / "grid.png")),
        # an adaptive solver's grid only gives its ends: its steps are its own (the NFE row counts them)
        ("sampler", f"{record['sampler']} (adaptive, σ {record['sigmas'][0]:.4g} → {record['sigmas'][-2]:.4g})"
         if record.get("adaptive") else f"{record['sampler']} ({record['schedule']}, {record['steps']} "
                                         f"step{'' if record['steps'] == 1 else 's'})"),
        ("NFE", f"{record['nfe']} (network evaluations {record['network_evaluations']})"),
        ("seconds", f"{record['seconds']:.2f}"),
    ]))


@app.command()
def distill(
    recipe: Optional[Path] = typer.Argument(None, help="Distillation recipe (TOML with method = …; optional with "
                                            "--resume: the run's own)."),
    teacher: Optional[Path] = typer.Option(None, "--teacher", help="The teacher: a diffcli denoiser checkpoint "
                                           "(with --resume: default, the run's own)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/RECIPE_NAME)."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe field, e.g. --set train.max_steps=200."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Override train.max_steps (as for train)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Start over in an --out that already holds a run."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (default: recipe)."),
) -> None:
    """Distill a teacher into few-step students: progressive, consistency, guidance or reflow.

    Students are written to OUT/students/steps_NNN.safetensors and OUT/last.safetensors; each records how it
    samples, so `diffcli sample STUDENT` needs no options.

    Examples:

      diffcli distill recipes/digits-progressive.toml --teacher runs/digits/last.safetensors --out runs/pd

      diffcli sample runs/pd/students/steps_004.safetensors --out samples/pd4
    """
    from .recipes import load_distill_recipe
    from .train import check_run_folder

    if out is not None:  # the folder's own refusals (--resume with --force, no run to resume) come first
        check_run_folder(out, resume=resume, force=force)
    if recipe is None:
        if not (resume and out is not None):
            raise UserError("distill needs a RECIPE (or --out RUN --resume to continue a run with its own recipe)")
        recipe = out / "recipe.toml"
    rec = load_distill_recipe(recipe, list(set_) + _max_steps_override(max_steps))
    if out is None:
        name = rec.name or recipe.stem
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise UserError(f"{recipe}: name = {name!r} is not a plain folder name; give --out")
        out = Path("runs") / name
    from .distill.common import distill as run_distill
    from .distill.common import recorded_teacher

    teacher_given = teacher is not None
    if teacher is None:
        teacher = recorded_teacher(out) if resume else None
        if teacher is None:
            if rec.method == "consistency" and rec.config.mode == "ct":
                raise UserError("distill needs --teacher CKPT: consistency.mode = 'ct' takes no ODE step of it, "
                                "but starts from its network, weights, data and σ range")
            raise UserError("distill needs --teacher CKPT (the checkpoint to distill)")

    con = _console()
    res = run_distill(rec, teacher, out, resume=resume, force=force, device=device, log=_lines(con),
                      teacher_given=teacher_given)
    rows = [("run folder", str(out)), ("method", res["method"]), ("steps", f"{res['steps']} / {res['total_steps']}"),
            ("last loss", f"{res['last_loss']:.5f}"), ("wall-clock", f"{res['seconds']:.1f} s")]
    rows += [("student", str(out / p)) for p in res["students"]]
    if "straightness_teacher" in res:
        rows.append(("straightness", f"teacher {res['straightness_teacher']:.5f} → reflowed flow "
                                     f"{res['straightness_flow']:.5f}"))
    rows.append(("checkpoint", str(out / "last.safetensors")))
    con.print(_table("diffcli distill", rows))


@app.command()
def encode(
    checkpoint: Path = typer.Argument(..., help="A diffcli .safetensors checkpoint."),
    inputs: Optional[List[Path]] = typer.Argument(None, help="Image files or folders to encode."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    solver: Optional[str] = typer.Option(None, "--solver", help="Deterministic sampler run as ODE solver "
                                         "(default: dpmpp_2m; with --decode: the latents file's)."),
    nfe: Optional[int] = typer.Option(None, "--nfe", help="Denoiser calls per decode (default: 100)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance (adaptive solvers)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="σ spacing: karras | logsnr | logsnr_leading | "
                                           "logsnr_leading_ms | logsnr_linspace | uniform | linear."),
    decode: Optional[Path] = typer.Option(None, "--decode", help="Decode a latents .safetensors file instead."),
    interpolate: bool = typer.Option(False, "--interpolate", help="Slerp between the latents of the two INPUTS."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames of --interpolate (default: 8)."),
    nll: bool = typer.Option(False, "--nll", help="Negative log-likelihood in bits/dim (dequantized 8-bit)."),
    probes: Optional[int] = typer.Option(None, "--probes", help="--nll: Rademacher probes of the Hutchinson trace "
                                         "estimator (default: 4)."),
    exact_divergence: bool = typer.Option(False, "--exact-divergence", help="Exact trace (small images)."),
    class_id: Optional[int] = typer.Option(None, "--class", help="Class label (default: unconditional)."),
    cfg: float = typer.Option(1.0, "--cfg", help="Guidance scale; ≠ 1 breaks exact invertibility."),
    seed: int = typer.Option(0, "--seed", help="Seed of dequantization noise and probes (per image)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per batch."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty --out: first removes the earlier "
                               "run's own files there (others stay)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
) -> None:
    """Invert images through the probability-flow ODE: latents, reconstruction error, interpolation, bits/dim.

    Examples:

      diffcli encode runs/digits/last.safetensors digits/ --solver heun --nfe 100 --out enc

      diffcli encode runs/digits/last.safetensors --decode enc/latents.safetensors --out dec

      diffcli encode runs/digits/last.safetensors a.png b.png --interpolate --frames 9 --out walk

      diffcli encode runs/digits/last.safetensors digits/ --nll --probes 8 --out nll
    """
    from .checkpoint import load_checkpoint
    from .encode import EncodeSettings, run_decode, run_encode
    from .runtime import resolve_device

    if probes is not None and not nll:  # an option that would change nothing is a mistake worth naming
        raise UserError(f"--probes {probes}: sets the trace estimator of --nll; it needs --nll")
    if probes is not None and exact_divergence:
        raise UserError(f"--probes {probes}: --exact-divergence computes the trace exactly (no probes); give one "
                        f"of them")
    if frames is not None and not interpolate:
        raise UserError(f"--frames {frames}: the frame count of --interpolate; it needs --interpolate")
    s = EncodeSettings(solver=solver, nfe=nfe, rtol=rtol, schedule=schedule, class_id=class_id, cfg=cfg, nll=nll,
                       probes=4 if probes is None else probes, exact_divergence=exact_divergence,
                       interpolate=interpolate, frames=8 if frames is None else frames, seed=seed,
                       batch_size=batch_size)
    if decode is not None and inputs:
        raise UserError(f"--decode {str(decode)!r} takes no INPUTS (got {len(inputs)})")
    if decode is not None and interpolate:
        raise UserError("--interpolate needs two input images, not --decode")
    _refuse_escaping_subfolders(out, ("images",))
    dev = resolve_device(device)
    ck = load_checkpoint(checkpoint, dev)
    con = _console()
    if decode is not None:
        rec = run_decode(ck, decode, out, s, device=dev, force=force, log=_lines(con))
        con.print(_table("diffcli encode --decode", [
            ("images", f"{rec['n']} → {out / 'images'}"), ("grid", str(out / "decoded.png")),
            ("solver", f"{rec['solver']} ({rec['schedule']}, {rec['noise_levels']} levels)"),
            ("NFE", str(rec["nfe_decode"])), ("seconds", f"{rec['seconds']:.2f}")]))
        return
    rec = run_encode(ck, inputs or [], out, s, device=dev, force=force, log=_lines(con))
    o = rec["overall"]
    rows = [("images", str(len(rec["images"]))), ("latents", str(out / "latents.safetensors")),
            ("solver", f"{rec['solver']} ({rec['schedule']}, {rec['noise_levels']} levels)"),
            ("NFE", f"encode {rec['nfe_encode']} · decode {rec['nfe_decode']}"),
            ("round trip", f"PSNR {o['psnr_db']:.2f} dB · max |err| {o['max_abs_error']:.2e}"
             if o["psnr_db"] is not None else "exact"),
            ("grid", str(out / "reconstruction.png"))]
    if "nll" in rec:
        se = rec["nll"]["se"]
        rows.append(("bits/dim", f"{rec['nll']['bits_per_dim']:.4f}" + (f" ± {se:.4f} (SE)" if se else "")))
    if "interpolation" in rec:
        rows.append(("interpolation", rec["interpolation"]["file"]))
    rows.append(("seconds", f"{rec['seconds']:.2f}"))
    con.print(_table("diffcli encode", rows))


@app.command("eval-fid")
def eval_fid(
    generated: Path = typer.Argument(..., help="A checkpoint (.safetensors), a sample folder, or a folder of images."),
    ref: Optional[str] = typer.Option(None, "--ref", help="Reference: dataset name (digits, mnist, cifar10, celeba), "
                                      "a folder of images, or a statistics .safetensors (default: the checkpoint's "
                                      "training data)."),
    ref_split: Optional[str] = typer.Option(None, "--ref-split", help="train | test | all (default: recipe's / train)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where torchvision datasets live."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma list of fid, kid, is, pr (default: all)."),
    extractor: Optional[str] = typer.Option(None, "--extractor", help="digits | inception (default: digits for "
                                            "1×8×8 images, else inception)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local InceptionV3 weights "
                                                     "(.pth or .safetensors) for offline machines."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Sampler, or a comma list for a sweep."),
    nfe: Optional[str] = typer.Option(None, "--nfe", help="Denoiser-call budget, or a comma list (5,10,20,50)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: recipe)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Sigma schedule (default: the sampler's); "
                                           "'tuned' runs the solver `diffcli sample --tune-schedule` stored beside "
                                           "the checkpoint for each sampler and NFE."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Classifier-free guidance scale (default: recipe's "
                                        "sample.cfg, as in `diffcli sample`)."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="Noise-conditional classifier checkpoint "
                                              "for classifier-guided generation (as in `diffcli sample`)."),
    classifier_scale: float = typer.Option(0.0, "--classifier-scale", help="Classifier-guidance scale s (0 = none)."),
    n: Optional[int] = typer.Option(None, "--n", "-n", help="Images to generate (checkpoint: 10000) or to read "
                                    "(folder: all)."),
    seed: int = typer.Option(0, "--seed", help="Run seed; image i depends only on (seed, i)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch."),
    resize: bool = typer.Option(False, "--resize", help="Resize generated images to the reference resolution."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute reference statistics (and do not store them)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the protocol record (every field) here."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep folder: eval_fid.csv, .png and .json."),
    force: bool = typer.Option(False, "--force", help="Replace the eval_fid.* of an earlier sweep in --out, or "
                               "an earlier --json record."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (devices) to generate on: launches torchrun."),
) -> None:
    """Score generated images against a reference: FID, KID, IS, precision/recall (torch-fidelity).

    The protocol (n, extractor and its weights hash, resize, seeds, sampler, NFE, checkpoint hash) is saved
    beside the score with --json; --nfe 5,10,20 --sampler a,b sweeps and plots into --out.

    Examples:

      diffcli eval-fid runs/digits/last.safetensors --sampler ddim --nfe 20 --n 10000 --json fid.json

      diffcli eval-fid runs/digits/last.safetensors --sampler ddim,heun --nfe 5,10,20,50 --out eval/digits

      diffcli eval-fid samples/cifar --ref cifar10 --inception-weights weights-inception-2015-12-05-6726825d.pth

      diffcli eval-fid runs/cifar10/last.safetensors --nfe 35 --n 50000 --nproc 4   (or: torchrun … -m diffcli eval-fid …)
    """
    from . import distributed as dist
    from .metrics import EvalOptions, check, evaluate, summary_rows, sweep_table

    con = _console()
    opts = EvalOptions(
        generated=generated, ref=ref, ref_split=ref_split, data_root=data_root, metrics=metrics, extractor=extractor,
        inception_weights=inception_weights, sampler=sampler, nfe=nfe, steps=steps, schedule=schedule, cfg=cfg,
        classifier=classifier, classifier_scale=classifier_scale, n=n, seed=seed, batch_size=batch_size, resize=resize, cache=not no_cache, device=device, out=out,
        json_path=json_path, force=force)
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be ≥ 1")
    if nproc > 1:
        if dist.launched():
            raise UserError(f"--nproc {nproc}: already running under torchrun; give one or the other")
        check(opts, log=_lines(con))  # every bad input is reported here, once, before a worker starts
        raise typer.Exit(_relaunch_without_nproc(nproc, [a for a in sys.argv[1:] if a != "--debug"]))
    res = evaluate(opts, log=_lines(con))
    dist.finish()
    if res is None:  # not rank 0: rank 0 reports and writes
        return
    if len(res.records) == 1:
        con.print(_table("diffcli eval-fid", summary_rows(res.records[0])))
    else:
        con.print(sweep_table(res.records))
    for w in res.warnings:
        con.print(f"[yellow]warning:[/] {_escape(w)}", soft_wrap=True)
    for f in res.files:
        con.print(f"wrote {f}")


def _say_interrupted() -> None:
    """Ctrl-C reaches every torchrun rank: rank 0 says so, once."""
    if os.environ.get("RANK", "0") == "0":
        print("error: interrupted", file=sys.stderr)


def _refuse_escaping_subfolders(out: Path, subfolders: tuple[str, ...]) -> None:
    """Output files have generated names inside --out; a sub-folder that is a symbolic link (say, in a folder
    someone else prepared, written into with --force) would send them elsewhere, so it is refused."""
    for sub in subfolders:
        p = out / sub
        if p.is_symlink() or (p.exists() and out.resolve() not in p.resolve().parents):
            raise UserError(f"--out {str(out)!r}: {sub} is a symbolic link (to {str(p.resolve())!r}); diffcli writes "
                            f"only inside --out — remove it or choose another folder")
        if p.exists() and not p.is_dir():
            raise UserError(f"--out {str(out)!r}: {sub} is a file, not a folder; diffcli writes its images into "
                            f"{str(p)!r}/ — move it or choose another folder")


_RELAUNCHED = {"torchrun": False}


def _relaunch_without_nproc(nproc: int, argv: list[str]) -> int:
    """Drop `--nproc N` / `--nproc=N` from the command line and run it under torchrun."""
    _RELAUNCHED["torchrun"] = True
    from .distributed import relaunch

    clean, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            clean.append(a)
    return relaunch(nproc, clean)


def _click_exceptions():
    """Typer ≥ 0.22 vendors click privately; older versions use click itself."""
    try:
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - depends on the installed typer
        import click.exceptions as cx
    return cx


PATH_OPTIONS = ("--out", "-o", "--teacher", "--classifier", "--json", "--decode", "--ref", "--inception-weights")


def _refuse_empty_paths(argv: list[str]) -> None:
    """`--out ""` reaches a Path option as "." (the working directory): a script's unset variable would train
    or sample into the cwd. An empty value of a path option is refused instead."""
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if flag in PATH_OPTIONS and ((eq and value == "") or (not eq and i + 1 < len(argv) and argv[i + 1] == "")):
            raise UserError(f"{flag} '': an empty path; give a file or folder name")


def _given_value(e, argv: list[str]) -> str:
    """' (got VALUE)' for an option value click could not convert, whose message does not repeat it."""
    param = getattr(e, "param", None)
    opts = getattr(param, "opts", None) or []
    if not opts or not opts[0].startswith("-"):
        return ""
    value = None
    for i, a in enumerate(argv):
        if a in opts and i + 1 < len(argv):
            value = argv[i + 1]
        for o in opts:
            if a.startswith(o + "="):
                value = a[len(o) + 1:]
    if value is None or repr(value) in e.format_message() or f"'{value}'" in e.format_message():
        return ""
    return f" (got {value!r})"


def openmp_wait_policy(environ=os.environ) -> None:
    """Cap OpenMP's spin-wait (GOMP_SPINCOUNT = 3000), unless the user chose (OMP_WAIT_POLICY, GOMP_SPINCOUNT).

    torch's CPU ops are each an OpenMP parallel region, and libgomp's idle threads spin 300,000 iterations
    (~3 ms) at every region's end before they sleep. Beside any other job the spinning threads eat the time
    slices their descheduled team-mates need, and every op waits a scheduler tick: the digits training step
    took 1.9 s instead of 0.3 s beside one busy process (bench/omp_wait.py, docs/BENCHMARKS.md). Sleeping at
    once (OMP_WAIT_POLICY=PASSIVE) costs 1.6× on idle cores; a 3000-iteration spin keeps the idle speed.
    Must run before torch is imported — libgomp reads it once, when it loads — so this module imports no torch."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = "3000"


_TERMINATED: list[int] = []  # the SIGTERM that `_terminate_like_ctrl_c` turned into an interrupt, if one came


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside the engines' own signal handling (start-up, sampling): handled like Ctrl-C, exit 143."""


def _terminate_like_ctrl_c() -> None:
    """SIGTERM's default kills the process without a word; before a training loop installs its own handler
    (and after it restores this one) it takes Ctrl-C's path: `error: interrupted`, no partial output, 143."""
    import signal

    def handler(signum, frame):
        _TERMINATED.append(signum)  # typer may turn the interrupt into a bare 130: main maps it back to 143
        raise _Terminated

    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


RANK_ERROR_GRACE_S = 10.0  # how long a rank > 0 waits for rank 0 to report the bad input both met


def _out_of_memory(e: BaseException) -> str | None:
    """One line for an allocation that failed (a runtime failure, exit 1: what was written before stays), or
    None when `e` is something else. torch reports a failed CPU allocation as a RuntimeError
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes") and a CUDA one as
    torch.OutOfMemoryError (a RuntimeError too)."""
    text = str(e)
    torch = sys.modules.get("torch")
    cuda_oom = torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ()))
    if not (isinstance(e, MemoryError) or cuda_oom or "can't allocate memory" in text or "out of memory" in text):
        return None
    tried = re.search(r"tried to allocate (\d+) bytes", text)  # the CPU allocator's wording
    tried = tried or re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]iB)", text)  # the CUDA allocator's
    size = ""
    if tried:
        amount = tried.group(1)
        size = f" ({int(amount) / 2**30:.2f} GiB at once)" if amount.isdigit() else f" ({amount} at once)"
    return (f"out of memory{size}: lower --batch-size (sample, eval-fid, encode) or train.batch_size, or the "
            f"image count")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs the app and maps every error to its exit code and one line."""
    openmp_wait_policy()
    _TERMINATED.clear()
    _terminate_like_ctrl_c()
    cx = _click_exceptions()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # a global flag, accepted anywhere: `diffcli sample --debug …` as well as `diffcli --debug sample …`
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    try:
        _refuse_empty_paths(argv)
        rc = app(args=argv, prog_name="diffcli", standalone_mode=False)
        if rc == 130 and not _RELAUNCHED["torchrun"]:
            # typer turns Ctrl-C outside the engines' own signal handling into a silent return of 130 (a
            # torchrun relaunch passes on its workers' code, and they have said so themselves)
            _say_interrupted()
            return 143 if _TERMINATED else 130
        return rc if isinstance(rc, int) else 0
    except DiffcliError as e:
        if getattr(e, "quiet", False):  # already reported by rank 0 of this torchrun job
            return e.exit_code
        if os.environ.get("RANK", "0") != "0" and isinstance(e, (UserError, Interrupted)):
            # under torchrun every rank meets the same bad input and the same signal: rank 0 says it, once
            if isinstance(e, UserError):
                # and says it first: a rank that exits before rank 0 reached the error has torchrun stop rank 0
                # (SIGTERM), which then reports "interrupted" instead of the bad input
                try:
                    time.sleep(RANK_ERROR_GRACE_S)
                except KeyboardInterrupt:  # torchrun's stop once rank 0 has exited: the code is still ours
                    pass
            return e.exit_code
        if debug:  # the traceback, and still the exit code scripts rely on
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except cx.NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else "", file=sys.stderr)
        return 0
    except cx.UsageError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e.format_message()}{_given_value(e, argv)}", file=sys.stderr)
        return 2
    except (typer.Exit, getattr(cx, "Exit", typer.Exit)) as e:
        return e.exit_code
    except (typer.Abort, getattr(cx, "Abort", typer.Abort)):  # click's wrapping of a KeyboardInterrupt
        _say_interrupted()
        return 143 if _TERMINATED else 130
    except KeyboardInterrupt:
        _say_interrupted()
        return 143 if _TERMINATED else 130
    except BrokenPipeError:
        return 1
    except OSError as e:  # e.g. out of disk in a write no engine wrapped: a runtime failure, one line
        if debug:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        message = _out_of_memory(e)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return 1
