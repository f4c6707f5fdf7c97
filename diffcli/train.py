"""The training engine behind `diffcli train`.

Run folder (DESIGN.md): recipe.toml, checkpoints/step_XXXXXXX.safetensors (EMA weights, a model checkpoint)
with checkpoints/step_XXXXXXX.state.safetensors beside it (raw weights, EMA, optimizer — no pickle),
last.safetensors, samples/step_XXXXXXX.png, metrics.csv.

Determinism: everything random in step k (the σ and ε draws, label dropout, flips, network dropout) is seeded
from (seed, k), and the data order is a fixed permutation per epoch seeded from (seed, epoch). A run resumed
from step N therefore continues exactly as the straight run would — the random state is a function of the
step, so there is no generator state that could be lost or restored wrongly.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import (FORMAT_VERSION, atomic_write_bytes, build_denoiser, clean_temporaries, read_safetensors,
                         save_denoiser, save_safetensors)
from .data import ImageData, load_dataset
from .denoiser import Denoiser
from .errors import Interrupted, RunFailure, UserError
from .generate import SampleSettings, generate
from .images import save_grid
from .recipes import Recipe, load_recipe
from .runtime import mix_seed, progress, resolve_device

RUN_FILES = ("recipe.toml", "checkpoints", "samples", "last.safetensors", "metrics.csv")
METRICS_HEADER = ["step", "loss", "lr", "images_per_s", "seconds"]


@dataclass
class TrainResult:
    out: Path
    step: int
    last_loss: float
    images_per_s: float
    seconds: float
    checkpoint: Path
    stopped_by: str  # "max_steps" | "max_minutes"
    parameters: int


# --- run folder -------------------------------------------------------------------------------------------
def prepare_run_folder(out: Path, recipe: Recipe, *, resume: bool, force: bool) -> Recipe:
    """Create, resume or (with --force) restart a run folder; never overwrite a run silently.

    Returns the recipe to train with (a resumed run keeps its own, with only the step budget taken anew)."""
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a folder")
    if resume:
        if not (out / "recipe.toml").exists():
            raise UserError(f"--resume: {str(out)!r} holds no run (no recipe.toml)")
        saved = load_recipe(out / "recipe.toml")
        a = saved.model_dump(mode="json")
        b = recipe.model_dump(mode="json")
        for d in (a, b):
            d["train"].pop("max_steps"), d["train"].pop("max_minutes")
        diff = sorted(_diff_keys(a, b))
        if diff:
            raise UserError(f"--resume {str(out)!r}: the recipe differs from the run's recipe.toml in "
                            f"{', '.join(diff[:6])}; resume with the run's own recipe")
        saved.train.max_steps, saved.train.max_minutes = recipe.train.max_steps, recipe.train.max_minutes
        clean_temporaries(out)
        return saved
    if existing and not force:
        raise UserError(f"--out {str(out)!r} already holds a run ({', '.join(existing)}); use --resume to continue "
                        f"it or --force to start over")
    if existing and force:
        for f in existing:
            p = out / f
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return recipe


def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def latest_state(out: Path) -> tuple[int, Path] | None:
    """The newest complete training state in a run folder (both files of a step present)."""
    best = None
    for p in (out / "checkpoints").glob("step_*.state.safetensors"):
        try:
            step = int(p.name.split("_")[1].split(".")[0])
        except ValueError:
            continue
        if (out / "checkpoints" / f"step_{step:07d}.safetensors").exists() and (best is None or step > best[0]):
            best = (step, p)
    return best


# --- data order -------------------------------------------------------------------------------------------
class BatchOrder:
    """Indices of the batch at each step: epochs of seeded permutations laid end to end."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.b, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 2))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int) -> Tensor:
        pos = step * self.b
        out = []
        while len(out) < self.b:
            epoch, off = divmod(pos, self.n)
            take = min(self.b - len(out), self.n - off)
            out.extend(self._perm_of(epoch)[off:off + take].tolist())
            pos += take
        return torch.tensor(out, dtype=torch.long)


class Batches:
    """Batches for step k from an in-memory tensor (on the device) or a streaming dataset."""

    def __init__(self, data: ImageData, batch_size: int, seed: int, device: torch.device, workers: int) -> None:
        self.data, self.order, self.device = data, BatchOrder(len(data), batch_size, seed), device
        self.workers = workers
        if data.images is not None:
            self.images = data.images.to(device)
            self.labels = data.labels.to(device) if data.labels is not None else None
        self._iter, self._next_step = None, None

    def get(self, step: int) -> tuple[Tensor, Tensor | None]:
        if self.data.images is not None:
            idx = self.order.indices(step).to(self.device)
            return self.images[idx], (self.labels[idx] if self.labels is not None else None)
        if self._iter is None or self._next_step != step:
            self._iter = self._stream(step)
        self._next_step = step + 1
        x, y = next(self._iter)
        x = x.to(self.device, non_blocking=True)
        return x, (y.to(self.device) if self.data.num_classes else None)

    def _stream(self, start: int):
        order = self.order

        class _Sampler(torch.utils.data.Sampler):
            def __iter__(self_inner):
                step = start
                while True:
                    yield from order.indices(step).tolist()
                    step += 1

        loader = torch.utils.data.DataLoader(self.data.dataset, batch_size=order.b, sampler=_Sampler(None),
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                             persistent_workers=self.workers > 0)
        return iter(loader)


# --- EMA ----------------------------------------------------------------------------------------------------
def ema_beta(recipe: Recipe, step: int) -> float:
    """EMA decay for this step: a fixed decay, or EDM's half-life in images with an optional ramp-up."""
    t = recipe.train
    if t.ema_decay is not None:
        return t.ema_decay
    halflife = (t.ema_halflife_kimg if t.ema_halflife_kimg is not None else 10.0) * 1000
    if t.ema_rampup_ratio is not None:
        halflife = min(halflife, (step + 1) * t.batch_size * t.ema_rampup_ratio)
    return 0.5 ** (t.batch_size / max(halflife, 1e-8))


def lr_at(recipe: Recipe, step: int) -> float:
    t = recipe.train
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    if t.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step, t.max_steps) / t.max_steps))
    return lr


# --- training state I/O -------------------------------------------------------------------------------------
def save_state(path: Path, step: int, recipe: Recipe, net: torch.nn.Module, ema: torch.nn.Module,
               opt: torch.optim.Optimizer) -> None:
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    meta = {"format": FORMAT_VERSION, "kind": "train_state", "step": str(step), "recipe": recipe.to_json(),
            "param_groups": json.dumps(osd["param_groups"])}
    save_safetensors(path, tensors, meta)


def load_state(path: Path, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    tensors, meta = read_safetensors(path)
    if meta.get("kind") != "train_state":
        raise UserError(f"{path}: not a training state file")
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        return int(meta["step"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{path}: training state does not match the run ({str(e).splitlines()[0][:160]})") from None


# --- the loop ------------------------------------------------------------------------------------------------
class _Signals:
    """First SIGINT/SIGTERM sets a flag (the step finishes and a checkpoint is written); a second exits at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise SystemExit(128 + signum)
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(recipe: Recipe, out: Path, *, resume: bool = False, force: bool = False, device: str | None = None,
          log=print, show_progress: bool = True, nan_at_step: int | None = None) -> TrainResult:
    """Train a denoiser from a recipe into the run folder `out` (see module docstring)."""
    if recipe.task == "classifier":  # noise-conditional classifier for classifier guidance (diffcli.classifier)
        from .classifier import train_classifier
        return train_classifier(recipe, out, resume=resume, force=force, device=device, log=log,
                                show_progress=show_progress)
    if recipe.task != "denoiser":
        raise UserError(f"task = {recipe.task!r}: diffcli train supports task = 'denoiser' in this version")
    recipe = prepare_run_folder(out, recipe, resume=resume, force=force)
    t = recipe.train
    dev = resolve_device(device or t.device)
    data = load_dataset(recipe.data)
    if data.skipped:
        log(f"skipped {data.skipped} unreadable image(s)")
    if len(data) == 0:
        raise UserError(f"data.name = {recipe.data.name!r}: the dataset is empty")
    num_classes = data.num_classes
    atomic_write_bytes(out / "recipe.toml", recipe.to_toml().encode())

    torch.manual_seed(mix_seed(t.seed, 0, 3))  # initial weights depend only on the seed
    denoiser = build_denoiser(recipe, data.channels, data.resolution, num_classes).to(dev)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.AdamW(denoiser.net.parameters(), lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    start = 0
    if resume:
        found = latest_state(out)
        if found is not None:
            start = load_state(found[1], denoiser.net, ema.net, opt)
            log(f"resumed {out} at step {start}")
        else:
            log(f"no checkpoint in {out} yet; starting at step 0")
    _truncate_metrics(out / "metrics.csv", start)
    n_params = sum(p.numel() for p in denoiser.net.parameters())
    if t.compile:  # compile the forward only, so state-dict keys (and checkpoints) are unchanged
        denoiser.net.forward = torch.compile(denoiser.net.forward)
    batches = Batches(data, t.batch_size, t.seed, dev, recipe.data.num_workers)
    params = [p for p in denoiser.net.parameters()]
    ema_params = [p for p in ema.net.parameters()]
    grid_settings = SampleSettings(sampler=recipe.sample.sampler, steps=min(recipe.sample.steps, 50),
                                   schedule=recipe.sample.schedule, n=t.sample_grid, seed=1234,
                                   batch_size=min(t.sample_grid, 256))

    def checkpoint(step: int) -> Path:
        ck = out / "checkpoints" / f"step_{step:07d}.safetensors"
        for p in denoiser.net.parameters():
            if not torch.isfinite(p).all():
                raise RunFailure(f"step {step}: weights became non-finite; no checkpoint written")
        save_state(out / "checkpoints" / f"step_{step:07d}.state.safetensors", step, recipe, denoiser.net,
                   ema.net, opt)
        save_denoiser(ck, ema, recipe, step=step, channels=data.channels, resolution=data.resolution)
        save_denoiser(out / "last.safetensors", ema, recipe, step=step, channels=data.channels,
                      resolution=data.resolution)
        _retain(out / "checkpoints", t.keep_last)
        return ck

    def sample_grid(step: int) -> None:
        imgs, _ = generate(ema, data.channels, data.resolution, grid_settings, device=dev, show_progress=False)
        save_grid(out / "samples" / f"step_{step:07d}.png", imgs)

    metrics = _MetricsWriter(out / "metrics.csv")
    t0 = time.perf_counter()
    step, last_loss, window, window_imgs, window_t = start, float("nan"), [], 0, time.perf_counter()
    last_finite, bad_steps, ips = float("nan"), 0, 0.0
    stopped_by = "max_steps"
    last_ck = None
    denoiser.train()
    with _Signals() as sigs, progress() as bar:
        task = bar.add_task("training", total=t.max_steps, completed=start, info="", visible=show_progress)
        while step < t.max_steps:
            g = torch.Generator().manual_seed(mix_seed(t.seed, step, 1))
            torch.manual_seed(mix_seed(t.seed, step, 4))  # network dropout
            x0, y = batches.get(step)
            if recipe.data.hflip:
                flip = torch.rand(x0.shape[0], generator=g).to(dev) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            if y is not None and t.p_uncond > 0:
                drop = torch.rand(y.shape[0], generator=g).to(dev) < t.p_uncond
                y = torch.where(drop, torch.full_like(y, num_classes), y)
            lr = lr_at(recipe, step)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16):
                loss = denoiser.loss(x0, y, generator=g).mean()
            if nan_at_step is not None and step == nan_at_step:
                loss = loss * float("nan")  # test hook: inject a divergence
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                bad_steps += 1
                if bad_steps > t.skip_nonfinite:
                    raise RunFailure(f"step {step}: loss is {loss_v} (last finite loss {last_finite:.6g}); stopping. "
                                     f"The last good checkpoint is {last_ck or 'not written yet'}; lower train.lr or "
                                     f"set train.skip_nonfinite")
                log(f"step {step}: non-finite loss skipped ({bad_steps}/{t.skip_nonfinite})")
                opt.zero_grad(set_to_none=True)
                step += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip is not None:
                gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                if not torch.isfinite(gnorm):
                    bad_steps += 1
                    if bad_steps > t.skip_nonfinite:
                        raise RunFailure(f"step {step}: gradient norm is {float(gnorm)} (last finite loss "
                                         f"{last_finite:.6g}); stopping. The last good checkpoint is "
                                         f"{last_ck or 'not written yet'}")
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    continue
            opt.step()
            beta = ema_beta(recipe, step)
            torch._foreach_lerp_(ema_params, params, 1 - beta)
            for b_ema, b in zip(ema.net.buffers(), denoiser.net.buffers()):
                b_ema.copy_(b)
            last_finite = last_loss = loss_v
            window.append(loss_v)
            window_imgs += x0.shape[0]
            step += 1
            bar.update(task, completed=step, info=f"loss {loss_v:.4f}")
            budget_spent = t.max_minutes is not None and (time.perf_counter() - t0) > 60 * t.max_minutes
            # Rows are also cut at every checkpoint, so a resumed run logs the very same windows.
            if (step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.max_steps or budget_spent
                    or sigs.received):
                now = time.perf_counter()
                ips = window_imgs / max(now - window_t, 1e-9)
                mean_loss = f"{sum(window) / len(window):.8g}" if window else "nan"
                metrics.write([step, mean_loss, f"{lr:.6g}", f"{ips:.1f}", f"{now - t0:.2f}"])
                window, window_imgs, window_t = [], 0, now
            if step % t.checkpoint_every == 0 or step == t.max_steps or budget_spent or sigs.received:
                last_ck = checkpoint(step)
            if step % t.sample_every == 0 or step == t.max_steps or budget_spent:
                sample_grid(step)
            if sigs.received:
                code = 128 + sigs.received
                raise Interrupted(f"interrupted at step {step}; checkpoint {last_ck} written. Resume with: "
                                  f"diffcli train {out / 'recipe.toml'} --out {out} --resume", code)
            if budget_spent:
                stopped_by = "max_minutes"
                break
    if last_ck is None:  # e.g. resumed a run that had already reached max_steps
        last_ck = checkpoint(step)
    seconds = time.perf_counter() - t0
    return TrainResult(out, step, last_loss, ips, seconds, last_ck, stopped_by, n_params)


def _retain(folder: Path, keep: int) -> None:
    """Keep the newest `keep` periodic checkpoints (pairs of model + state); never the newest one."""
    steps = sorted({int(p.name.split("_")[1].split(".")[0]) for p in folder.glob("step_*.safetensors")})
    for s in steps[:-max(keep, 1)]:
        for p in (folder / f"step_{s:07d}.safetensors", folder / f"step_{s:07d}.state.safetensors"):
            p.unlink(missing_ok=True)


class _MetricsWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(METRICS_HEADER)

    def write(self, row: list) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step] if rows else []
    text = "".join(",".join(r) + "\r\n" for r in keep)
    atomic_write_bytes(path, text.encode())
