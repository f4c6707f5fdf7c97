"""The sampling engine behind `diffcli sample`: labels, per-sample seeds, batching, guidance, NFE, and the
sample folder (DESIGN.md): DIR/grid.png, DIR/images/000000.png …, DIR/sample.json."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import __version__
from .checkpoint import LoadedCheckpoint, atomic_write_text, file_hash
from .errors import UserError
from .guidance import ClassifierGuided, Conditioned, GuidanceInput
from .images import clear_outputs, png_bytes, save_grid, to_uint8
from .recipes import MAX_BATCH, MAX_IMAGES, MAX_STEPS
from .runtime import progress, sample_generator
from .samplers import SAMPLER_INFO, SCHEDULES, NFECounter, get_sigmas


@dataclass
class SampleSettings:
    sampler: str = "ddim"
    steps: int = 50
    schedule: str | None = None  # None: the sampler's default
    eta: float | None = None
    cfg: float = 1.0
    class_id: int | None = None
    n: int = 64
    batch_size: int = 256
    seed: int = 0
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    options: dict = field(default_factory=dict)
    sigmas: list[float] | None = None  # an explicit grid (e.g. a tuned one); overrides schedule and steps
    coefficients: dict | None = None  # a tuned solver's {"a": [...], "B": [[...]]} on `sigmas` (diffcli.tuning)
    cfg_interval: tuple[float, float] | None = None  # apply CFG only for σ in [lo, hi]
    classifier: str | None = None  # classifier-guidance checkpoint (recorded; the engine gets the model)
    classifier_scale: float = 0.0


def validate_settings(s: SampleSettings, num_classes: int, guidance_input: bool = False) -> None:
    """Every bad sampling option is a UserError naming the option and its value. `guidance_input`: the model is
    a guidance-distilled student, which takes w as an input at every step (no two-pass CFG to restrict)."""
    if guidance_input and s.cfg_interval is not None:
        lo, hi = s.cfg_interval
        raise UserError(f"--cfg-interval {lo:g},{hi:g}: this guidance-distilled student takes the scale w as an "
                        f"input at every σ; an interval applies only to two-pass CFG")
    if s.sampler not in SAMPLER_INFO:
        raise UserError(f"--sampler {s.sampler!r}: unknown; choose one of {', '.join(SAMPLER_INFO)}")
    info = SAMPLER_INFO[s.sampler]
    if s.schedule is not None and s.schedule not in SCHEDULES + ("tuned",):
        raise UserError(f"--schedule {s.schedule!r}: unknown; choose one of {', '.join(SCHEDULES + ('tuned',))}")
    for key, value in s.options.items():
        flag = "--" + key.replace("_", "-")
        if key not in info.options:
            raise UserError(f"{flag} {value}: the {s.sampler} sampler does not take it"
                            + (f" (it takes {', '.join(info.options)})" if info.options else ""))
        lo, hi = info.options[key]
        if not lo <= value <= hi:
            raise UserError(f"{flag} {value}: out of range for {s.sampler}; must be in [{lo:g}, {hi:g}]")
    check_scale("--classifier-scale", s.classifier_scale)
    if s.cfg_interval is not None:
        lo, hi = s.cfg_interval
        if not 0 <= lo < hi:
            raise UserError(f"--cfg-interval {lo},{hi}: need 0 ≤ lo < hi")
    if s.steps < info.min_steps:
        raise UserError(f"--steps {s.steps}: {s.sampler} needs at least {info.min_steps}")
    if s.steps > MAX_STEPS:  # the σ grid alone would not fit in memory long before 10^11
        raise UserError(f"--steps {s.steps}: must be at most {MAX_STEPS}")
    if s.n < 1:
        raise UserError(f"--n {s.n}: must be ≥ 1")
    if s.n > MAX_IMAGES:  # every image (and its label) is held in memory
        raise UserError(f"--n {s.n}: must be at most {MAX_IMAGES}")
    if not 1 <= s.batch_size <= MAX_BATCH:
        raise UserError(f"--batch-size {s.batch_size}: must be in [1, {MAX_BATCH}]")
    if s.eta is not None and not 0 <= s.eta <= 1:
        raise UserError(f"--eta {s.eta}: must be in [0, 1]")
    if s.eta is not None and "eta" not in info.options:
        eta_takers = ", ".join(k for k, v in SAMPLER_INFO.items() if "eta" in v.options)
        raise UserError(f"--eta {s.eta}: the {s.sampler} sampler does not take η (these do: {eta_takers})")
    check_scale("--cfg", s.cfg)
    if s.cfg != 1.0 and num_classes == 0:
        raise UserError(f"--cfg {s.cfg}: the model is unconditional (no classes); classifier-free guidance "
                        f"needs a class-conditional model")
    if num_classes or s.classifier is None:  # else the classifier's classes decide (checked once it is loaded)
        check_class_id(s.class_id, num_classes)
    if s.seed < 0:
        raise UserError(f"--seed {s.seed}: must be ≥ 0")


def recorded_w_range(meta: dict) -> tuple[float, float] | None:
    """The w range a guidance-distilled student was trained on: metadata guidance_w_range, or for a student
    written before that key existed, its own guidance distill recipe; None when neither says."""
    try:
        lo, hi = (float(v) for v in json.loads(meta["guidance_w_range"]))
        return lo, hi
    except (KeyError, ValueError, TypeError):
        pass
    try:
        r = json.loads(meta["distill_recipe"])
        if r.get("method") == "guidance":
            return float(r["guidance"]["w_min"]), float(r["guidance"]["w_max"])
    except (KeyError, ValueError, TypeError, AttributeError):
        pass
    return None


def guidance_range_warning(s: SampleSettings, meta: dict) -> str | None:
    """A warning when --cfg lies outside the w range a guidance-distilled student was trained on: the student
    then extrapolates its w input."""
    w = recorded_w_range(meta)
    if w is None or w[0] <= s.cfg <= w[1]:
        return None
    return (f"--cfg {s.cfg:g} is outside the w range [{w[0]:g}, {w[1]:g}] this student was distilled for; "
            f"it extrapolates")


def sampling_warning(s: SampleSettings, ck_denoiser, meta: dict) -> str | None:
    """A warning when the settings leave what the model was made for: the consistency sampler on a model that
    is not a consistency model (each jump returns D(x, σ) = E[x0 | x], a blurred mean), or a progressive
    student sampled off the grid it was distilled for (it learned those steps only)."""
    if s.sampler == "consistency" and ck_denoiser.parameterization != "consistency":
        return (f"--sampler consistency is for consistency models (diffcli distill, method = 'consistency'); this "
                f"model's parameterization is {ck_denoiser.parameterization!r}, so each jump returns its "
                f"posterior mean E[x0 | x] — blurred samples; use an ODE sampler")
    student = getattr(ck_denoiser, "student_grid", None)
    if (student is not None and meta.get("distill_method") == "progressive" and s.sigmas is None
            and s.schedule != "tuned"):
        if labelled_sigma_grid(ck_denoiser, s)[1] != "student":
            n = len(_valid_grid(student[1])) - 1
            return (f"this progressive student was distilled for {n} {student[0]} step{'' if n == 1 else 's'} on "
                    f"its own grid; {s.sampler} at {s.steps} step{'' if s.steps == 1 else 's'} leaves what it "
                    f"learned (sample it without --sampler/--steps/--schedule to use its grid)")
    return None


def check_scale(flag: str, value: float) -> None:
    """A guidance scale must be a finite number ≥ 0: NaN passed a plain `< 0` test, sampled black images and
    wrote NaN (not JSON) into sample.json."""
    if not 0 <= value < float("inf"):
        raise UserError(f"{flag} {value}: must be a finite number ≥ 0")


def check_class_id(class_id: int | None, num_classes: int, owner: str = "the model") -> None:
    """`--class K` must name one of the model's classes (and the model must have classes); for an unconditional
    model guided by a classifier, `owner` = "the classifier" and its classes count."""
    if class_id is None:
        return
    if num_classes == 0:
        raise UserError(f"--class {class_id}: the model is unconditional (no classes)")
    if not 0 <= class_id < num_classes:
        raise UserError(f"--class {class_id}: out of range; {owner} has classes 0..{num_classes - 1}")


def labels_for(s: SampleSettings, num_classes: int) -> Tensor | None:
    """Image i gets --class, or class i mod num_classes (a balanced, deterministic set); None if unconditional."""
    if num_classes == 0:
        return None
    if s.class_id is not None:
        return torch.full((s.n,), s.class_id, dtype=torch.long)
    return torch.arange(s.n, dtype=torch.long) % num_classes


def default_schedule(sampler: str, process) -> str:
    """The sampler's default; "uniform" (the model's own time) only where that time is a sensible grid —
    VP's discrete steps and flow's t — and Karras et al.'s ρ-schedule for EDM and VE, where uniform time
    would be uniform σ."""
    name = SAMPLER_INFO[sampler].default_schedule
    if name == "uniform" and process.name in ("edm", "ve"):
        return "karras"
    return name


def sigma_grid(ck_denoiser, s: SampleSettings) -> Tensor:
    """(steps+1,) float64 decreasing σ grid ending at 0 for these settings (see `labelled_sigma_grid`)."""
    return labelled_sigma_grid(ck_denoiser, s)[0]


def labelled_sigma_grid(ck_denoiser, s: SampleSettings) -> tuple[Tensor, str]:
    """The σ grid and the name sample.json records for it: an explicit grid is "explicit" (or "tuned" when it
    came from `--schedule tuned`), a distilled student's own grid is "student", else the schedule's name."""
    if s.sigmas is not None:
        return torch.tensor(s.sigmas, dtype=torch.float64), ("tuned" if s.schedule == "tuned" else "explicit")
    student = getattr(ck_denoiser, "student_grid", None)  # (sampler, σ grid JSON) of a distilled student
    if student is not None and s.schedule is None and s.sigma_min is None and s.sigma_max is None:
        grid = _valid_grid(student[1])
        if s.sampler == student[0] and s.steps == len(grid) - 1:  # the student's own sampling: its exact grid
            return torch.tensor(grid, dtype=torch.float64), "student"
    lo = s.sigma_min if s.sigma_min is not None else ck_denoiser.sigma_min
    hi = s.sigma_max if s.sigma_max is not None else ck_denoiser.sigma_max
    if s.sampler == "consistency" and s.schedule in (None, "karras"):
        from .samplers import consistency_sigmas
        return consistency_sigmas(s.steps, lo, hi, s.rho), "karras"
    name = s.schedule or default_schedule(s.sampler, ck_denoiser.process)
    return get_sigmas(name, s.steps, lo, hi, rho=s.rho, process=ck_denoiser.process), name


def student_sigmas(ck: LoadedCheckpoint) -> list[float]:
    """The σ grid a distilled student was trained for (metadata `student_sigmas`, diffcli.distill)."""
    return _valid_grid(ck.meta.get("student_sigmas"), ck.path)


def _valid_grid(text, source="checkpoint") -> list[float]:
    try:
        sig = [float(v) for v in json.loads(text)]
    except (ValueError, TypeError):
        raise UserError(f"{source}: metadata student_sigmas is not a list of numbers") from None
    if len(sig) < 2 or sig[-1] != 0 or any(a <= b for a, b in zip(sig, sig[1:])):
        raise UserError(f"{source}: metadata student_sigmas {sig[:4]}… is not a decreasing grid ending with 0")
    return sig


TUNE_METHODS = ("grid", "bns")


def resolve_tuned_schedule(ck: LoadedCheckpoint, s: SampleSettings, device: torch.device, *, tune: bool = False,
                           draws: int = 512, iters: int = 200, method: str = "grid", log=print) -> None:
    """`--schedule tuned`: put the tuned grid (and a learned solver's coefficients, if stored) for (sampler, steps)
    into `s.sigmas` / `s.coefficients`; with `tune`, first learn them against an rk45 reference and store them in
    the sidecar file beside the checkpoint (the checkpoint itself is never rewritten). `method` "grid":
    diffcli.tuning.tune_grid, the σ grid by Nelder–Mead on the end-point error (`iters` evaluations), the
    sampler's own rule; "bns": diffcli.tuning.tune_solver, grid and step coefficients by Adam (`iters`
    iterations). Grid-only entries (and those of older files) run the sampler's own rule on the stored grid."""
    from .samplers import tuned_keys, tuned_schedule_path
    from .tuning import load_tuned_solver, save_tuned_solver, tune_grid, tune_solver

    info = SAMPLER_INFO[s.sampler]
    if info.stochastic or info.adaptive:
        fixed = ", ".join(k for k, v in SAMPLER_INFO.items() if not (v.stochastic or v.adaptive))
        raise UserError(f"--schedule tuned: {s.sampler} has no fixed grid to tune; choose one of {fixed}")
    if draws < 8:
        raise UserError(f"--tune-draws {draws}: must be ≥ 8")
    if iters < 1:
        raise UserError(f"--tune-iters {iters}: must be ≥ 1")
    if method not in TUNE_METHODS:
        raise UserError(f"--tune-method {method!r}: unknown; choose one of {', '.join(TUNE_METHODS)}")
    path = tuned_schedule_path(ck.path)
    sha = file_hash(ck.path)
    if tune:
        d = ck.denoiser
        lo = s.sigma_min if s.sigma_min is not None else d.sigma_min
        hi = s.sigma_max if s.sigma_max is not None else d.sigma_max
        tune_s = SampleSettings(**{**asdict(s), "n": draws})
        labels = labels_for(tune_s, d.num_classes)
        bound = Conditioned(d, labels.to(device) if labels is not None else None, s.cfg, s.cfg_interval)
        opts = dict(s.options)
        if s.sampler == "unipc" and s.cfg != 1.0:
            opts.setdefault("variant", "bh2")  # as `generate` samples it
        labels = labels.to(device) if labels is not None else None
        common = dict(options=opts, reference_rtol=1e-5, batch_size=s.batch_size, device=device, labels=labels,
                      bind=lambda lab: Conditioned(d, lab, s.cfg, s.cfg_interval), log=log)
        shape = (ck.channels, ck.resolution, ck.resolution)
        start = None if s.schedule in (None, "tuned") else s.schedule
        # an earlier fit for this checkpoint and scale competes on this fit's held-out draws: a quick re-fit
        # (fewer draws or iterations) must not replace a better one
        stored = load_tuned_solver(path, s.sampler, s.steps) if path.exists() else None
        incumbent = None
        if stored is not None:
            try:
                check_tuned_for(path, f"{s.sampler}/steps{s.steps}", sha, s.cfg)
                incumbent = stored[1] if stored[1] is not None else stored[0]
            except UserError:
                pass  # fitted to another checkpoint or scale: nothing to keep
        if method == "grid":
            solver, rec = tune_grid(bound, s.sampler, info.nfe(s.steps, **s.options), lo, hi, shape, draws=draws,
                                    evals=iters, schedule=start or "logsnr_leading_ms", incumbent=incumbent,
                                    **common)
        else:
            solver, rec = tune_solver(bound, s.sampler, info.nfe(s.steps, **s.options), lo, hi, shape, draws=draws,
                                      iters=iters, schedule=start or default_schedule(s.sampler, d.process),
                                      incumbent=incumbent, **common)
        if rec.get("kept") != "stored":
            save_tuned_solver(path, s.sampler, s.steps, solver,
                              {"checkpoint_sha256": sha, "rms_before": f"{rec['rms_before']:.6g}",
                               "rms_after": f"{rec['rms_after']:.6g}", "draws": draws, "iters": iters, "cfg": s.cfg,
                               "method": method})
    found = load_tuned_solver(path, s.sampler, s.steps)
    if found is None:
        have = ", ".join(tuned_keys(path)) or "none"
        nfe = SAMPLER_INFO[s.sampler].nfe(s.steps, **s.options)
        raise UserError(f"--schedule tuned: no tuned grid for {s.sampler} with {s.steps} steps (NFE {nfe}) in {path} "
                        f"(have: {have}); create one with --tune-schedule")
    check_tuned_for(path, f"{s.sampler}/steps{s.steps}", sha, s.cfg)
    sig, solver = found
    s.sigmas = [float(v) for v in sig]
    if solver is not None:
        s.coefficients = {"a": solver.a.tolist(), "B": solver.B.tolist()}


def check_tuned_for(path: Path, key: str, sha: str, cfg: float) -> None:
    """A stored grid serves only the checkpoint and guidance scale it was fitted to: a retrained or replaced
    checkpoint (same file name, so the same sidecar) or another --cfg is another ODE, and the grid would be
    used silently. Entries from files that did not record these pass."""
    from .checkpoint import read_safetensors

    _, meta = read_safetensors(path)
    was = meta.get(f"{key}:checkpoint_sha256")
    if was is not None and was != sha:
        raise UserError(f"--schedule tuned: the {key} grid in {str(path)!r} was tuned for another checkpoint "
                        f"(sha256 {was[:12]}…, this one is {sha[:12]}…); re-tune it with --tune-schedule")
    tuned_cfg = meta.get(f"{key}:cfg")
    try:
        differs = tuned_cfg is not None and float(tuned_cfg) != float(cfg)
    except ValueError:
        differs = False
    if differs:
        raise UserError(f"--schedule tuned: the {key} grid in {str(path)!r} was tuned at --cfg {float(tuned_cfg):g}, "
                        f"not {cfg:g}; re-tune it with --tune-schedule --cfg {cfg:g}")


def _guided(denoiser, cond: Tensor | None, s: SampleSettings, classifier=None):
    """The denoiser the sampler calls: the model bound to its labels under the run's guidance."""
    if getattr(denoiser, "guidance_input", False):  # guidance-distilled student: w is an input
        guided = GuidanceInput(denoiser, cond, s.cfg)
    else:
        guided = Conditioned(denoiser, cond if denoiser.num_classes else None, s.cfg, s.cfg_interval)
    if classifier is not None and s.classifier_scale > 0:
        guided = ClassifierGuided(guided, classifier, cond, s.classifier_scale)
    return guided


def generate(denoiser, channels: int, resolution: int, s: SampleSettings, *, device: torch.device,
             indices: range | None = None, show_progress: bool = True, classifier=None) -> tuple[Tensor, dict]:
    """Sample images `indices` (default 0..n-1) of the run: (N, C, H, W) float in [-1, 1] and a record.

    Image i depends only on (seed, i) and the settings: its initial noise and every later noise draw come
    from its own generator, so batch size and sharding change nothing. An adaptive solver (rk45) solves each
    image's ODE alone, since its step sizes would otherwise follow the whole batch. The record's `nfe` is the
    most denoiser calls any image took (all alike but for adaptive solvers, which add `nfe_mean`)."""
    indices = indices if indices is not None else range(s.n)
    info = SAMPLER_INFO[s.sampler]
    sigmas, schedule = labelled_sigma_grid(denoiser, s)
    sigmas = sigmas.to(device)
    labels = labels_for(s, denoiser.num_classes)
    if labels is None and classifier is not None:  # unconditional model, classifier chooses the classes
        labels = labels_for(s, classifier.num_classes)
    opts = dict(s.options)
    if s.eta is not None:
        opts["eta"] = s.eta
    elif s.sampler == "ddim":
        opts["eta"] = 0.0
    if s.sampler == "unipc" and "variant" not in opts and (s.cfg != 1.0 or classifier is not None):
        opts["variant"] = "bh2"  # Zhao et al. 2023: B2(h) = e^h - 1 for guided sampling, B1 otherwise
    out, nfes, net_evals = [], [], 0
    t0 = time.perf_counter()
    idx = list(indices)
    with progress() as bar:
        n_steps = len(sigmas) - 1
        task = bar.add_task("sampling", total=len(idx), visible=show_progress,
                            info=f"{s.sampler} {n_steps} step{'' if n_steps == 1 else 's'}")
        for b0 in range(0, len(idx), s.batch_size):
            batch = idx[b0:b0 + s.batch_size]
            gens = [sample_generator(s.seed, i) for i in batch]
            x = torch.stack([torch.randn(channels, resolution, resolution, generator=g) for g in gens])
            x = x.to(device=device, dtype=torch.float64) * sigmas[0]
            cond = labels[batch].to(device) if labels is not None else None
            guided = _guided(denoiser, cond, s, classifier)
            if s.coefficients is not None:  # a learned solver (diffcli.tuning): its own levels and coefficients
                from .tuning import sample_linear_solver

                counter = NFECounter(guided)
                x0 = sample_linear_solver(counter, x, sigmas, a=torch.tensor(s.coefficients["a"]),
                                          B=torch.tensor(s.coefficients["B"]))
                nfes += [counter.nfe] * len(batch)
            elif info.adaptive:  # one ODE per image: its steps are its own, whatever else is in the batch
                rows = []
                for j in range(len(batch)):
                    one = _guided(denoiser, cond[j:j + 1] if cond is not None else None, s, classifier)
                    counter = NFECounter(one)
                    rows.append(info.fn(counter, x[j:j + 1], sigmas, generator=gens[j:j + 1], **opts))
                    nfes.append(counter.nfe)
                    net_evals = max(net_evals, one.network_evaluations)
                x0 = torch.cat(rows)
            else:
                counter = NFECounter(guided)
                x0 = info.fn(counter, x, sigmas, generator=gens, **opts)
                nfes += [counter.nfe] * len(batch)
            out.append(x0.float().clamp(-1, 1).cpu())
            net_evals = max(net_evals, guided.network_evaluations)
            bar.advance(task, len(batch))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # rk45 uses only its grid's ends (σ_max → σ_min, then the final denoise) and takes its own steps: it records
    # those ends and no step count (its NFE is the count of its calls)
    ends = sigmas[[0, -2, -1]] if info.adaptive else sigmas
    record = {
        "sampler": s.sampler, "schedule": schedule, "steps": None if info.adaptive else len(sigmas) - 1,
        "adaptive": info.cost is None,
        "nfe": max(nfes, default=0), "network_evaluations": net_evals, "sigmas": [float(v) for v in ends.cpu()],
        "seconds": round(seconds, 3), "options": opts, "tuned_solver": s.coefficients is not None,
        "labels": labels[idx].tolist() if labels is not None else None,
    }
    if info.adaptive:
        record["nfe_mean"] = round(sum(nfes) / len(nfes), 2) if nfes else 0
        record["nfe_total"] = sum(nfes)  # for merging shards
    return torch.cat(out) if out else torch.empty(0, channels, resolution, resolution), record


def generate_sharded(denoiser, channels: int, resolution: int, s: SampleSettings, *, device: torch.device,
                     world=None, classifier=None) -> tuple[Tensor, dict] | None:
    """`generate` with the image indices split over the torchrun ranks of `world` (contiguous blocks).

    Per-sample seeding makes every image identical to a one-process run. Rank 0 returns all images in index
    order with the merged record (the slowest rank's seconds); the other ranks return None."""
    from . import distributed as dist

    world = world or dist.World()
    lo, hi = world.shard(s.n)
    images, record = generate(denoiser, channels, resolution, s, device=device, indices=range(lo, hi),
                              show_progress=world.is_main, classifier=classifier)
    parts = dist.gather_to_main((images, record), world)
    if not world.is_main:
        return None
    images = torch.cat([p[0] for p in parts])
    record = dict(parts[0][1], seconds=max(p[1]["seconds"] for p in parts), processes=world.size)
    # the run's cost, not rank 0's (a rank with no images made no calls)
    record["nfe"] = max(p[1]["nfe"] for p in parts)
    record["network_evaluations"] = max(p[1]["network_evaluations"] for p in parts)
    if "nfe_total" in record:
        record["nfe_total"] = sum(p[1]["nfe_total"] for p in parts)
        record["nfe_mean"] = round(record["nfe_total"] / max(len(images), 1), 2)
    if record.get("labels") is not None:
        record["labels"] = [lab for p in parts for lab in p[1]["labels"]]
    return images, record


def write_sample_folder(out: Path, images: Tensor, record: dict, s: SampleSettings, ck: LoadedCheckpoint,
                        device: torch.device) -> None:
    """DIR/grid.png, DIR/images/NNNNNN.png (uint8, the dataset's channels) and DIR/sample.json; a previous
    sample folder's files there (`--force`) go first, so that the folder holds this run alone."""
    from .checkpoint import atomic_write_bytes

    # a decode folder's record goes too: it would describe images this run replaces
    clear_outputs(out, ("grid.png", "sample.json", "decoded.png", "decode.json"))
    (out / "images").mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(images)
    for i, img in enumerate(u8):
        atomic_write_bytes(out / "images" / f"{i:06d}.png", png_bytes(img))
    save_grid(out / "grid.png", images[: min(len(images), 256)])
    meta = {
        "diffcli_version": __version__, "checkpoint": str(ck.path), "checkpoint_sha256": file_hash(ck.path),
        "checkpoint_step": ck.step, "kind": ck.meta.get("kind"), "process": ck.meta.get("process"),
        "parameterization": ck.meta.get("parameterization"), "n": len(images), "seed": s.seed,
        "batch_size": s.batch_size, "cfg": s.cfg, "class": s.class_id, "device": str(device),
        "channels": ck.channels, "resolution": ck.resolution, **record, "settings": asdict(s),
    }
    atomic_write_text(out / "sample.json", json.dumps(meta, indent=2))
