"""Noise-conditional classifiers p(y | x, σ) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

`diffcli train` with `task = "classifier"` in the recipe trains one on the same noise process as a denoiser:
x = x0 + σ·ε with σ drawn as the process draws it for denoisers, cross-entropy on the labels. The backbone
(diffcli.nets.classifier) sees the EDM-scaled input x/sqrt(σ² + σ_data²) — unit variance at every σ — and the
process's own c_noise(σ). The checkpoint is a `.safetensors` file with `kind = "classifier"` (EMA weights)
and the process metadata, so `diffcli sample --classifier` can check that it matches the model.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import FORMAT_VERSION, load_weights, read_safetensors, save_safetensors
from .errors import Interrupted, RunFailure, UserError
from .nets.classifier import EncoderClassifier
from .processes import Process, make_process
from .recipes import Recipe, recipe_from_json


class NoisyClassifier(nn.Module):
    """logits = net(x / sqrt(σ² + σ_data²), c_noise(σ)); x (B, C, H, W) in the VE convention, σ (B,)."""

    def __init__(self, net: nn.Module, process: Process, num_classes: int) -> None:
        super().__init__()
        self.net, self.process, self.num_classes = net, process, num_classes

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        c_in = 1 / (sigma**2 + self.process.sigma_data**2).sqrt()
        return self.net(x.float() * c_in[:, None, None, None], self.process.c_noise(sigma))

    def loss(self, x0: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        sigma = self.process.sample_sigma(x0.shape[0], generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x = x0 + sigma[:, None, None, None] * noise
        return F.cross_entropy(self(x, sigma), y, reduction="none")


def build_classifier(recipe: Recipe, channels: int, num_classes: int) -> NoisyClassifier:
    d, m = recipe.diffusion, recipe.model
    process = make_process(d.process, sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data,
                           timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
    net = EncoderClassifier(in_channels=channels, num_classes=num_classes, channels=m.channels,
                            channel_mult=m.channel_mult, num_res_blocks=m.num_res_blocks, dropout=m.dropout,
                            noise_embedding=m.noise_embedding)
    return NoisyClassifier(net, process, num_classes)


def save_classifier(path: Path, clf: NoisyClassifier, recipe: Recipe, *, step: int, channels: int,
                    resolution: int) -> None:
    meta = {"format": FORMAT_VERSION, "kind": "classifier", "recipe": recipe.to_json(), "step": str(step),
            "process": clf.process.name, "sigma_min": repr(clf.process.sigma_min),
            "sigma_max": repr(clf.process.sigma_max), "sigma_data": repr(clf.process.sigma_data),
            "num_classes": str(clf.num_classes), "channels": str(channels), "resolution": str(resolution),
            "dataset": recipe.data.name}
    save_safetensors(path, clf.net.state_dict(), meta)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[NoisyClassifier, dict]:
    """A classifier checkpoint (eval mode) and its metadata; anything else is a UserError naming the file."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"--classifier {str(path)!r}: not a diffcli checkpoint of format {FORMAT_VERSION}")
    if meta.get("kind") != "classifier":
        raise UserError(f"--classifier {str(path)!r}: is a {meta.get('kind', 'unknown')!r} checkpoint, "
                        f"not a classifier (train one with task = \"classifier\")")
    recipe = recipe_from_json(meta["recipe"], str(path))
    try:
        channels, num_classes = int(meta["channels"]), int(meta["num_classes"])
    except (KeyError, ValueError):
        raise UserError(f"--classifier {str(path)!r}: metadata lacks channels/num_classes") from None
    clf = build_classifier(recipe, channels, num_classes)
    load_weights(clf.net, tensors, path)
    return clf.to(device).eval(), meta


def check_classifier_matches(meta: dict, path: str | Path, model_meta: dict, model_classes: int) -> None:
    """Classifier guidance needs the same classes, process and image shape as the model (exit 2 otherwise)."""
    n = int(meta["num_classes"])
    if model_classes and n != model_classes:
        raise UserError(f"--classifier {str(path)!r}: has {n} classes but the model has {model_classes}")
    for key in ("process", "channels", "resolution"):
        if meta.get(key) != model_meta.get(key):
            raise UserError(f"--classifier {str(path)!r}: {key} = {meta.get(key)!r} does not match the model's "
                            f"{model_meta.get(key)!r}")


def guiding_classifier(path: str | Path | None, scale: float, model_meta: dict, model_classes: int,
                       device: str | torch.device, class_id: int | None = None) -> NoisyClassifier | None:
    """The classifier of `--classifier PATH --classifier-scale S` for a model, checked against it (None without
    one). The two options come together; for an unconditional model `--class` names one of the classifier's
    classes. Every mismatch is a UserError naming the option and the value."""
    if path is None:
        if scale != 0:
            raise UserError(f"--classifier-scale {scale:g}: needs --classifier CKPT")
        return None
    if scale == 0:
        raise UserError(f"--classifier {str(path)!r}: give --classifier-scale S > 0 (without it the classifier "
                        f"would not guide)")
    clf, meta = load_classifier(path, device)
    check_classifier_matches(meta, path, model_meta, model_classes)
    if not model_classes:
        from .generate import check_class_id

        check_class_id(class_id, clf.num_classes, "the classifier")
    return clf


@torch.no_grad()
def classifier_accuracy(clf: NoisyClassifier, x0: Tensor, y: Tensor, sigma: float) -> float:
    s = torch.full((x0.shape[0],), sigma)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    return float((clf(noisy, s).argmax(1) == y).double().mean())


def train_classifier(recipe: Recipe, out: Path, *, resume: bool = False, force: bool = False,
                     device: str | None = None, log=print, show_progress: bool = True):
    """Train a noise-conditional classifier into the run folder `out` (same layout and guarantees as a denoiser
    run: recipe.toml, checkpoints/ with training state, last.safetensors, metrics.csv; resumable; signals)."""
    from . import train as T
    from .checkpoint import atomic_write_bytes
    from .data import load_dataset
    from .runtime import mix_seed, progress, run_device

    # as for a denoiser run: the folder's state, the device and the dataset are checked before the folder is
    # created, resumed or (with --force) emptied; a resumed run's recipe equals this one but for the budget
    T.check_run_folder(out, resume=resume, force=force)
    dev = run_device(device, recipe.train.device)
    data = load_dataset(recipe.data)
    if not data.num_classes:
        raise UserError(f"data.name = {recipe.data.name!r}: task = 'classifier' needs labels")
    recipe = T.prepare_run_folder(out, recipe, resume=resume, force=force)
    t = recipe.train
    atomic_write_bytes(out / "recipe.toml", recipe.to_toml().encode())
    torch.manual_seed(mix_seed(t.seed, 0, 3))
    clf = build_classifier(recipe, data.channels, data.num_classes).to(dev)
    ema = copy.deepcopy(clf).eval().requires_grad_(False)
    opt = torch.optim.AdamW(clf.net.parameters(), lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    start, resumed_window = 0, T.LossWindow()
    if resume and (found := T.latest_state(out)) is not None:
        start = T.load_state(found[1], clf.net, ema.net, opt, expect_step=found[0], window=resumed_window)
        log(f"resumed {out} at step {start}")
    T._truncate_metrics(out / "metrics.csv", start, resumed_window)
    batches = T.Batches(data, t.batch_size, t.seed, dev, recipe.data.num_workers)
    params, ema_params = list(clf.net.parameters()), list(ema.net.parameters())
    n_params = sum(p.numel() for p in params)

    def checkpoint(step: int, window: T.LossWindow | None = None) -> Path:
        ck = out / "checkpoints" / f"step_{step:07d}.safetensors"
        if not all(torch.isfinite(p).all() for p in params):
            raise RunFailure(f"step {step}: weights became non-finite; no checkpoint written")
        T.save_state(out / "checkpoints" / f"step_{step:07d}.state.safetensors", step, recipe, clf.net, ema.net, opt,
                     window)
        save_classifier(ck, ema, recipe, step=step, channels=data.channels, resolution=data.resolution)
        save_classifier(out / "last.safetensors", ema, recipe, step=step, channels=data.channels,
                        resolution=data.resolution)
        T._retain(out / "checkpoints", t.keep_last)
        return ck

    metrics = T._MetricsWriter(out / "metrics.csv", resumed_window)
    t0 = time.perf_counter()
    step, last_loss, last_ck, stopped_by, ips = start, float("nan"), None, "max_steps", 0.0
    window_t, window_imgs = time.perf_counter(), 0
    # the loss sum and count since the last row; a stop between rows left its window in the state
    win_sum, win_n = resumed_window.loss_sum, resumed_window.steps
    clf.train()
    with T._Signals() as sigs, progress() as bar:
        task = bar.add_task("training classifier", total=t.max_steps, completed=start, info="",
                            visible=show_progress)
        while step < t.max_steps:
            g = torch.Generator().manual_seed(mix_seed(t.seed, step, 1))
            torch.manual_seed(mix_seed(t.seed, step, 4))
            x0, y = batches.get(step)
            if recipe.data.hflip:
                flip = torch.rand(x0.shape[0], generator=g).to(dev) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            lr = T.lr_at(recipe, step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = clf.loss(x0, y, generator=g).mean()
            loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise RunFailure(f"step {step}: loss is {loss_v}; stopping. The last good checkpoint is "
                                 f"{last_ck or 'not written yet'}; lower train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            torch._foreach_lerp_(ema_params, params, 1 - T.ema_beta(recipe, step))
            for b_ema, b in zip(ema.net.buffers(), clf.net.buffers()):
                b_ema.copy_(b)
            last_loss = loss_v
            win_sum, win_n = win_sum + loss_v, win_n + 1
            window_imgs += x0.shape[0]
            step += 1
            bar.update(task, completed=step, info=f"loss {loss_v:.4f}")
            budget_spent = t.max_minutes is not None and (time.perf_counter() - t0) > 60 * t.max_minutes
            signalled = sigs.received  # read once: a later signal waits for the next step's checkpoint
            # rows are also cut at every checkpoint, so a resumed run logs the very same windows
            log_row = step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.max_steps
            stop_window = None
            if log_row or budget_spent or signalled:
                now = time.perf_counter()
                ips = window_imgs / max(now - window_t, 1e-9)
                seconds = metrics.seconds_before + now - t0
                metrics.write([step, f"{win_sum / win_n:.8g}", f"{lr:.6g}", f"{ips:.1f}", f"{seconds:.2f}"])
                if not log_row:  # a stop between log rows: the state keeps its window for a resume
                    stop_window = T.LossWindow(win_sum, win_n, seconds)
                win_sum, win_n, window_imgs, window_t = 0.0, 0, 0, now
            if step % t.checkpoint_every == 0 or step == t.max_steps or budget_spent or signalled:
                with sigs.saving(step):
                    last_ck = checkpoint(step, stop_window)
            if signalled:
                raise Interrupted(f"interrupted at step {step}; checkpoint {last_ck} written. Resume with: "
                                  f"diffcli train {out / 'recipe.toml'} --out {out} --resume", 128 + signalled)
            if budget_spent:
                stopped_by = "max_minutes"
                break
    if last_ck is None:
        last_ck = checkpoint(step)
    return T.TrainResult(out, step, last_loss, ips, time.perf_counter() - t0, last_ck, stopped_by, n_params)
