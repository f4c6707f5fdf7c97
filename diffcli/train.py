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

import contextlib
import copy
import csv
import json
import math
import re
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
from .recipes import Recipe, load_recipe, model_resolution_problem
from . import distributed as dist
from .runtime import (check_out_folder, mix_seed, progress, run_device, to_channels_last,
                      use_channels_last)

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
    device: str = ""  # where and how it ran, e.g. "cpu, channels_last" (what train.channels_last = "auto" chose)


# --- run folder -------------------------------------------------------------------------------------------
def check_run_folder(out: Path, *, resume: bool, force: bool) -> None:
    """The run-folder checks of `prepare_run_folder` that change nothing (for a launcher to run first)."""
    check_out_folder(out)
    if resume and force:
        raise UserError("--resume continues a run and --force deletes it: give one of them")
    for name in RUN_FILES:  # an entry of the wrong kind: say so before anything reads, writes or removes it
        p, folder = out / name, name in ("checkpoints", "samples")
        if p.exists() and (p.is_dir() != folder):
            raise UserError(f"--out {str(out)!r}: {name} is a {'folder' if p.is_dir() else 'file'}, where a run "
                            f"keeps its {'folder' if folder else 'file'} of that name; move it away")
    if resume and not (out / "recipe.toml").exists():
        raise UserError(f"--resume: {str(out)!r} holds no run (no recipe.toml)")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not (resume or force):
        raise UserError(f"--out {str(out)!r} already holds a run ({', '.join(existing)}); use --resume to continue "
                        f"it or --force to start over")


# Fields a resumed run takes from the recipe given now: the step and time budget, and how (not what) it
# computes — a run started on one machine may go on on another whose layout or compiler choice differs.
RESUME_ANEW = ("max_steps", "max_minutes", "channels_last", "compile", "device")


def prepare_run_folder(out: Path, recipe: Recipe, *, resume: bool, force: bool, loader=None) -> Recipe:
    """Create, resume or (with --force) restart a run folder; never overwrite a run silently.

    Returns the recipe to train with (a resumed run keeps its own, with only RESUME_ANEW taken anew)."""
    check_run_folder(out, resume=resume, force=force)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        saved = (loader or load_recipe)(out / "recipe.toml")  # loader: e.g. load_distill_recipe
        found = latest_state(out)
        if found is not None and found[0] > recipe.train.max_steps:
            # the step budget counts from the run's start: a smaller one would train nothing and say so only
            # in a summary, after rewriting the run's recipe.toml
            raise UserError(f"--resume {str(out)!r}: train.max_steps = {recipe.train.max_steps} is below the run's "
                            f"step {found[0]}; give a larger --max-steps (it counts from the run's start)")
        a = saved.model_dump(mode="json")
        b = recipe.model_dump(mode="json")
        for d in (a, b):
            for k in RESUME_ANEW:
                d["train"].pop(k, None)
        diff = sorted(_diff_keys(a, b))
        if diff:
            # values spelled as in the TOML (true, "ddim"), not as Python reprs (True, 'ddim')
            shown = ", ".join(f"{k} ({json.dumps(_value_at(a, k))} in the run, {json.dumps(_value_at(b, k))} given)"
                              for k in diff[:4])
            raise UserError(f"--resume {str(out)!r}: the recipe differs from the run's recipe.toml in "
                            f"{shown}{' and more' if len(diff) > 4 else ''}; resume with the run's own recipe")
        for k in RESUME_ANEW:
            if hasattr(saved.train, k):
                setattr(saved.train, k, getattr(recipe.train, k))
        _clean_run_temporaries(out)
        return saved
    if existing:  # check_run_folder let it through: --force
        for f in existing:
            remove_run_entry(out / f)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a path that cannot be a folder here (/proc/x, a read-only place): bad input
        raise UserError(f"--out {str(out)!r}: cannot create the run folder ({e.strerror or e})") from None
    _clean_run_temporaries(out)  # e.g. a first save killed before any run file existed
    return recipe


# What diffcli writes inside a run's folders: --force removes these and leaves anything else a user put there
RUN_FOLDER_NAMES = {"checkpoints": r"step_\d+(\.state)?\.safetensors", "samples": r"step_\d+\.png",
                    "students": r"(steps_\d+|flow)\.safetensors", "pairs": r"chunk_\d+\.safetensors",
                    "pairs_flow": r"chunk_\d+\.safetensors"}


def remove_run_entry(p: Path) -> None:
    """--force on one entry of a run folder: a file goes; a folder loses diffcli's own files (RUN_FOLDER_NAMES,
    and temporaries) and goes itself only when nothing else is left in it."""
    if p.is_symlink() or p.is_file():
        p.unlink()
        return
    if not p.is_dir():
        return
    pattern = RUN_FOLDER_NAMES.get(p.name)
    clean_temporaries(p)
    for f in p.iterdir():
        if pattern is not None and re.fullmatch(pattern, f.name) and (f.is_file() or f.is_symlink()):
            f.unlink()
    if not any(p.iterdir()):
        p.rmdir()


def _clean_run_temporaries(out: Path) -> None:
    """Leftovers of atomic writes killed mid-save, in the folders a run writes to (and only there)."""
    for folder in (out, out / "checkpoints", out / "samples"):
        clean_temporaries(folder)


def _value_at(d: dict, key: str):
    """d["a"]["b"] for key "a.b" (None where the path ends early)."""
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


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
    """The newest complete training state in a run folder, for --resume; None when no checkpoint was written yet.

    A save writes the state file first, then the model checkpoint, so a state without its model file is a save
    that was cut short: it is passed over. The reverse — the newest model checkpoint without its state, or a
    last.safetensors without any state — means training state was lost, and that is an error (resuming from
    an older state, or from scratch, would silently throw work away)."""
    folder = out / "checkpoints"
    models, states = {}, {}
    for p in folder.glob("step_*.safetensors"):
        head, _, rest = p.name[len("step_"):].partition(".")
        if not head.isdigit() or rest not in ("safetensors", "state.safetensors"):
            continue
        (states if rest == "state.safetensors" else models)[int(head)] = p
    if not models:
        if (out / "last.safetensors").exists():
            raise UserError(f"--resume {str(out)!r}: last.safetensors exists but {str(folder)!r} holds no checkpoint "
                            f"with training state; cannot resume (start over with --force)")
        return None
    step = max(models)
    if step not in states:
        raise UserError(f"--resume: {models[step]} has no training state ({models[step].name[:-len('.safetensors')]}"
                        f".state.safetensors is missing); restore it, or delete {models[step].name} to resume from "
                        f"the checkpoint before it")
    from .checkpoint import read_header

    try:  # a truncated model checkpoint is named now, not after hours of training
        read_header(models[step])
    except UserError as e:
        raise UserError(f"--resume: {e}; restore it, or delete {models[step].name} and {states[step].name} to "
                        f"resume from the checkpoint before it") from None
    return step, states[step]


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

    def __init__(self, data: ImageData, batch_size: int, seed: int, device: torch.device, workers: int,
                 world: dist.World = dist.World()) -> None:
        self.data, self.order, self.device = data, BatchOrder(len(data), batch_size, seed), device
        self.workers = workers
        self.lo, self.hi = world.shard(batch_size)  # this rank's slice of every global batch
        if data.images is not None:
            self.images = data.images.to(device)
            self.labels = data.labels.to(device) if data.labels is not None else None
        self._iter, self._next_step = None, None

    def get(self, step: int) -> tuple[Tensor, Tensor | None]:
        if self.data.images is not None:
            idx = self.order.indices(step)[self.lo:self.hi].to(self.device)
            return self.images[idx], (self.labels[idx] if self.labels is not None else None)
        if self._iter is None or self._next_step != step:
            self._iter = self._stream(step)
        self._next_step = step + 1
        x, y = next(self._iter)
        x = x.to(self.device, non_blocking=True)
        return x, (y.to(self.device) if self.data.num_classes else None)

    def _stream(self, start: int):
        order, lo, hi = self.order, self.lo, self.hi

        class _Sampler(torch.utils.data.Sampler):
            def __iter__(self_inner):
                step = start
                while True:
                    yield from order.indices(step)[lo:hi].tolist()
                    step += 1

        loader = torch.utils.data.DataLoader(self.data.dataset, batch_size=hi - lo, sampler=_Sampler(None),
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


def make_optimizer(params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW with torch's fused kernel where the parameters' device has one (CPU and CUDA).

    Fused: one kernel over every tensor instead of ~10 small ops per tensor (on 2 CPU threads the per-tensor
    loop cost more than the whole optimizer's arithmetic), and it takes a device-side `found_inf` flag, so a
    non-finite step can be skipped without a host sync. Same update as the per-tensor loop up to rounding."""
    params = list(params)
    kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device without the fused kernel
        return torch.optim.AdamW(params, **kw)


def match_state_strides(opt: torch.optim.Optimizer) -> None:
    """Give each parameter's optimizer state (exp_avg, exp_avg_sq, …) the parameter's own memory layout.

    Optimizer.load_state_dict restores the moments contiguous; after a resume with channels_last weights the
    fused AdamW kernel would then pair elements of different positions (seen: wrong updates, not an error)."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k, v in st.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def lr_at(recipe: Recipe, step: int) -> float:
    t = recipe.train
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    if t.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(step, t.max_steps) / t.max_steps))
    return lr


# --- training state I/O -------------------------------------------------------------------------------------
def save_state(path: Path, step: int, recipe: Recipe, net: torch.nn.Module, ema: torch.nn.Module,
               opt: torch.optim.Optimizer, window: "LossWindow | None" = None) -> None:
    """The training state of `step`; `window`: the loss statistics of a stop between two log rows, so that a
    resumed run's next row covers the same steps as an uninterrupted run's."""
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    if window is not None and window.steps:
        tensors.update(window.tensors())
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    meta = {"format": FORMAT_VERSION, "kind": "train_state", "step": str(step), "recipe": recipe.to_json(),
            "param_groups": json.dumps(osd["param_groups"])}
    save_safetensors(path, tensors, meta)


def load_state(path: Path, net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
               expect_step: int | None = None, window: "LossWindow | None" = None) -> int:
    """Restore net, EMA and optimizer from a state file; returns its step. `window`, if given, takes the loss
    statistics a stop between log rows saved (and stays empty for a state saved at a log row)."""
    hint = (f"; restore it, or delete {path.name} and {path.name.replace('.state', '')} to resume from the "
            f"checkpoint before it")
    try:
        tensors, meta = read_safetensors(path)
    except UserError as e:  # corrupt or truncated: never fall back silently, say what to do
        raise UserError(f"--resume: training state {e}{hint}") from None
    if meta.get("kind") != "train_state":
        raise UserError(f"{path}: not a training state file{hint}")
    if expect_step is not None and meta.get("step") != str(expect_step):
        raise UserError(f"{path}: holds step {meta.get('step')!r}, its name says {expect_step}{hint}")
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: tensor {k!r} has non-finite values{hint}")
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        match_state_strides(opt)
        if window is not None:
            window.restore(tensors)
        return int(meta["step"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"{path}: training state does not match the run ({str(e).splitlines()[0][:160]})") from None


class LossWindow:
    """The loss statistics of the steps since the last metrics.csv row: their loss sum, the steps counted in
    it, and the run's training seconds at a stop. A stop between two log rows (a signal, train.max_minutes)
    writes a row of its own and saves its window in the training state; a resume restores it, drops that stop
    row and goes on adding, so every later row is the one an uninterrupted run writes (the sum continues in
    the same order: bit-equal means)."""

    KEYS = ("window.loss_sum", "window.steps", "window.seconds")

    def __init__(self, loss_sum: float = 0.0, steps: int = 0, seconds: float = 0.0) -> None:
        self.loss_sum, self.steps, self.seconds = loss_sum, steps, seconds

    def tensors(self) -> dict[str, Tensor]:
        return {k: torch.tensor(v, dtype=torch.float64)
                for k, v in zip(self.KEYS, (self.loss_sum, self.steps, self.seconds))}

    def restore(self, tensors: dict[str, Tensor]) -> None:
        if all(k in tensors for k in self.KEYS):
            self.loss_sum, steps, self.seconds = (float(tensors[k]) for k in self.KEYS)
            self.steps = int(steps)


# --- the loop ------------------------------------------------------------------------------------------------
class _Signals:
    """First SIGINT/SIGTERM sets a flag (the step finishes and a checkpoint is written); a second exits at once,
    except while a checkpoint is being written (`saving`): then it waits for the save to finish, so that two
    quick Ctrl-Cs cannot cut the save they asked for short."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}
        self._saving: int | None = None  # the step being saved
        self._deferred: int | None = None

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner's worker)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        elif self._saving is not None:
            self._deferred = signum
        else:
            raise Interrupted("interrupted again: stopped at once, without a checkpoint of this step; --resume "
                              "continues from the last checkpoint", 128 + signum)

    @contextlib.contextmanager
    def saving(self, step: int):
        """Write a checkpoint of `step` without a second signal cutting it short; exit right after it if one
        came."""
        self._saving = step
        try:
            yield
        finally:
            self._saving = None
        if self._deferred is not None:
            raise Interrupted(f"interrupted again at step {step}, after its checkpoint was written; --resume "
                              f"continues from it", 128 + self._deferred)

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
    if recipe.diffusion.parameterization == "consistency":
        raise UserError("diffusion.parameterization = 'consistency': consistency models are made by "
                        "`diffcli distill` (method = 'consistency'), not by diffcli train")
    dev = run_device(device, recipe.train.device)
    # The dataset before the run folder: a missing or broken dataset must fail before the folder is created,
    # resumed or (with --force) emptied. A resumed run's recipe equals this one but for RESUME_ANEW.
    data = load_dataset(recipe.data)
    if len(data) == 0:
        raise UserError(f"data.name = {recipe.data.name!r}: the dataset is empty")
    if recipe.train.p_uncond > 0 and data.num_classes == 0:  # an image folder without class sub-folders
        raise UserError(f"train.p_uncond = {recipe.train.p_uncond} (CFG label dropout) needs classes, but "
                        f"data.path = {recipe.data.path!r} has no class sub-folders; set train.p_uncond = 0")
    problem = model_resolution_problem(recipe.model, data.resolution)  # an image folder's size is known only now
    if problem:
        raise UserError(f"{problem} of data.path = {recipe.data.path!r}" if recipe.data.path else problem)
    world, dev = dist.init(dev)
    if recipe.train.batch_size < world.size:
        raise UserError(f"train.batch_size = {recipe.train.batch_size} is smaller than the {world.size} processes")
    if world.is_main:
        recipe = prepare_run_folder(out, recipe, resume=resume, force=force)
    dist.barrier(world)  # the other ranks see the folder rank 0 prepared (cleared, or resumed)
    if not world.is_main:
        recipe = prepare_run_folder(out, recipe, resume=resume, force=False)
    t = recipe.train
    for note in data.notes:
        log(f"note: {note}")
    if data.skipped:
        # name them: "unreadable" alone hides that a file was skipped for its channel count, or which one
        why = "; ".join(data.skipped_reasons) + ("; …" if data.skipped > len(data.skipped_reasons) else "")
        log(f"data.on_bad_image = \"skip\": skipped {data.skipped} image(s) ({why})" if why
            else f"data.on_bad_image = \"skip\": skipped {data.skipped} image(s)")
    num_classes = data.num_classes

    torch.manual_seed(mix_seed(t.seed, 0, 3))  # initial weights depend only on the seed
    denoiser = build_denoiser(recipe, data.channels, data.resolution, num_classes).to(dev)
    # channels_last before the EMA copy and the optimizer, so weights, EMA, gradients and Adam moments share
    # one layout (checkpoints are written contiguous: the file format does not change)
    channels_last = use_channels_last(t.channels_last, dev, t.bf16)
    if channels_last:
        denoiser.net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = make_optimizer(denoiser.net.parameters(), lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay)
    start, resumed_window = 0, LossWindow()
    if resume:
        found = latest_state(out)
        if found is not None:
            start = load_state(found[1], denoiser.net, ema.net, opt, expect_step=found[0], window=resumed_window)
            if world.is_main:
                log(f"resumed {out} at step {start}")
        elif world.is_main:
            log(f"no checkpoint in {out} yet; starting at step 0")
    # Written only now, so that a refused --resume (lost or corrupt state) leaves the run folder untouched.
    if world.is_main:
        atomic_write_bytes(out / "recipe.toml", recipe.to_toml().encode())
        _truncate_metrics(out / "metrics.csv", start, resumed_window)
    n_params = sum(p.numel() for p in denoiser.net.parameters())
    if t.compile:  # compile the forward only, so state-dict keys (and checkpoints) are unchanged
        denoiser.net.forward = torch.compile(denoiser.net.forward)
    batches = Batches(data, t.batch_size, t.seed, dev, recipe.data.num_workers, world)
    # The recipe's batch is the global batch: every rank draws the whole step's randomness from the same
    # generator and keeps its slice [lo, hi), so N processes see exactly the samples one process would.
    lo, hi = world.shard(t.batch_size)
    train_net = denoiser.net
    if world.distributed:
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        # attention's 1×1 convolutions produce channels-last gradients; DDP copies them into its buckets
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

        train_net = DistributedDataParallel(denoiser.net, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for p in denoiser.net.parameters()]
    ema_params = [p for p in ema.net.parameters()]
    grid_settings = SampleSettings(sampler=recipe.sample.sampler, steps=min(recipe.sample.steps, 50),
                                   schedule=recipe.sample.schedule, n=t.sample_grid, seed=1234,
                                   batch_size=min(t.sample_grid, 256))

    def checkpoint(step: int, window: LossWindow | None = None) -> Path:
        ck = out / "checkpoints" / f"step_{step:07d}.safetensors"
        for p in denoiser.net.parameters():
            if not torch.isfinite(p).all():
                raise RunFailure(f"step {step}: weights became non-finite; no checkpoint written")
        save_state(out / "checkpoints" / f"step_{step:07d}.state.safetensors", step, recipe, denoiser.net,
                   ema.net, opt, window)
        save_denoiser(ck, ema, recipe, step=step, channels=data.channels, resolution=data.resolution)
        save_denoiser(out / "last.safetensors", ema, recipe, step=step, channels=data.channels,
                      resolution=data.resolution)
        _retain(out / "checkpoints", t.keep_last)
        return ck

    def sample_grid(step: int) -> None:
        imgs, _ = generate(ema, data.channels, data.resolution, grid_settings, device=dev, show_progress=False)
        save_grid(out / "samples" / f"step_{step:07d}.png", imgs)

    metrics = _MetricsWriter(out / "metrics.csv", resumed_window) if world.is_main else None
    t0 = time.perf_counter()
    step, last_loss, window_t, window_step = start, float("nan"), time.perf_counter(), start
    reported_bad, ips = 0, 0.0
    stopped_by = "max_steps"
    last_ck = None
    # No host sync inside a step: the loss, the non-finite test and the skip stay on the device, and the
    # running statistics below are read once per sync point (a log row, checkpoint, grid or stop). The fused
    # AdamW skips a non-finite step on its device flag `found_inf`; other optimizers fall back to a host test.
    fused_skip = bool(opt.defaults.get("fused"))
    sdt = torch.float32 if dev.type == "mps" else torch.float64  # the loss statistics (float64 as python floats)
    nan = float("nan")
    win_sum, win_n, n_bad = (torch.zeros((), dtype=sdt, device=dev) for _ in range(3))
    win_sum += resumed_window.loss_sum  # a stop between log rows: its window goes on
    win_n += resumed_window.steps
    last_t, fail_step, fail_loss, fail_gnorm, fail_last = (torch.full((), v, dtype=sdt, device=dev)
                                                           for v in (nan, -1.0, nan, nan, nan))
    denoiser.train()
    with _Signals() as sigs, progress() as bar:
        task = bar.add_task("training", total=t.max_steps, completed=start, info="",
                            visible=show_progress and world.is_main)
        while step < t.max_steps:
            g = torch.Generator().manual_seed(mix_seed(t.seed, step, 1))
            # network dropout: the only randomness that is per rank (it cannot be sliced from a global draw)
            torch.manual_seed(mix_seed(t.seed, step, 4) if not world.distributed
                              else mix_seed(t.seed, step, 4, world.rank))
            x0, y = batches.get(step)  # this rank's slice of the global batch
            B = t.batch_size
            if recipe.data.hflip:
                flip = (torch.rand(B, generator=g) < 0.5)[lo:hi].to(dev)
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            if y is not None and t.p_uncond > 0:
                drop = (torch.rand(B, generator=g) < t.p_uncond)[lo:hi].to(dev)
                y = torch.where(drop, torch.full_like(y, num_classes), y)
            sigma = denoiser.process.sample_sigma(B, g, method=denoiser.sigma_sampling, p_mean=denoiser.p_mean,
                                                  p_std=denoiser.p_std)[lo:hi]
            noise = torch.randn((B, *x0.shape[1:]), generator=g)[lo:hi].to(dev)
            x0, noise = to_channels_last(x0, channels_last), to_channels_last(noise, channels_last)
            lr = lr_at(recipe, step)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=t.bf16):
                loss = denoiser.loss(x0, y, sigma=sigma, noise=noise, net=train_net).mean()
            if nan_at_step is not None and step == nan_at_step:
                loss = loss * float("nan")  # test hook: inject a divergence
            # The global mean loss: each rank holds its slice's mean, weighted by the slice's share of the batch.
            gl = loss.detach().to(sdt) * ((hi - lo) / B)
            budget_spent = t.max_minutes is not None and (time.perf_counter() - t0) > 60 * t.max_minutes
            if world.distributed:
                # One small all-reduce of host flags a step (signals, time budget), so every rank takes the same
                # decision at the same step, and one of the loss on the device (no host sync).
                flags = torch.tensor([float(sigs.received or 0), float(budget_spent)], dtype=torch.float64)
                dist.all_reduce(flags, world, "max")
                if sigs.received is None and flags[0] > 0:
                    sigs.received = int(flags[0])
                synced_signal = int(flags[0]) or None  # what every rank acts on at this step
                budget_spent = bool(flags[1] > 0)
                gl = dist.all_reduce(gl.reshape(1), world, "sum")[0]
            opt.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks; weighting each rank's slice mean by its share of the global
            # batch makes that average the global batch mean even when the slices differ in size.
            (loss * (world.size * (hi - lo) / B) if world.distributed else loss).backward()
            bad = ~torch.isfinite(gl)  # the same on every rank (global loss, all-reduced gradients)
            gnorm = None
            if t.grad_clip is not None:
                gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
                bad = bad | ~torch.isfinite(gnorm)
            if fused_skip:
                opt.found_inf = bad.float()  # a flagged step leaves weights, moments and step count untouched
                opt.step()
            elif not bool(bad):  # host sync: this optimizer cannot skip on a device flag
                opt.step()
            # EMA weight 0 on a skipped step, so the EMA skips it too
            w = (1 - ema_beta(recipe, step)) * (~bad).float()
            torch._foreach_lerp_(ema_params, params, [w] * len(params))
            for b_ema, b in zip(ema.net.buffers(), denoiser.net.buffers()):
                b_ema.copy_(b)
            n_bad += bad
            over = bad & (n_bad > t.skip_nonfinite) & (fail_step < 0)  # the step that exhausts skip_nonfinite
            fail_step = torch.where(over, float(step), fail_step)
            fail_loss, fail_last = torch.where(over, gl, fail_loss), torch.where(over, last_t, fail_last)
            if gnorm is not None:
                fail_gnorm = torch.where(over, gnorm.to(sdt), fail_gnorm)
            last_t = torch.where(bad, last_t, gl)
            win_sum += torch.where(bad, 0.0, gl)
            win_n += ~bad
            step += 1
            # Rows are also cut at every checkpoint, so a resumed run logs the very same windows.
            log_row = step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.max_steps
            # one reading of the signal flag per step: a signal arriving between the checkpoint decision and
            # the exit below must not exit without the checkpoint (it is acted on at the next step instead)
            signalled = synced_signal if world.distributed else sigs.received
            stop = bool(budget_spent or signalled)
            if not (log_row or stop or step % t.sample_every == 0):
                bar.update(task, completed=step)
                continue
            # A sync point (the same steps on every rank): read the statistics, fail before writing anything.
            f_step, f_loss, f_gnorm, f_last, bad_v, last_v, w_sum, w_n = torch.stack(
                [fail_step, fail_loss, fail_gnorm, fail_last, n_bad, last_t, win_sum, win_n]).tolist()
            if f_step >= 0:
                what = (f"loss is {f_loss}" if not math.isfinite(f_loss) else f"gradient norm is {f_gnorm}")
                raise RunFailure(f"step {int(f_step)}: {what} (last finite loss {f_last:.6g}); stopping. The last good "
                                 f"checkpoint is {last_ck or 'not written yet'}; lower train.lr or set "
                                 f"train.skip_nonfinite")
            if bad_v > reported_bad:
                log(f"step {step}: {int(bad_v - reported_bad)} non-finite step(s) skipped "
                    f"({int(bad_v)}/{t.skip_nonfinite})")
                reported_bad = int(bad_v)
            last_loss = last_v
            bar.update(task, completed=step, info=f"loss {last_v:.4f}")
            stop_window = None
            if world.is_main and (log_row or stop):
                now = time.perf_counter()
                ips = (step - window_step) * B / max(now - window_t, 1e-9)
                mean_loss = f"{w_sum / w_n:.8g}" if w_n else "nan"
                seconds = metrics.seconds_before + now - t0
                metrics.write([step, mean_loss, f"{lr:.6g}", f"{ips:.1f}", f"{seconds:.2f}"])
                window_t, window_step = now, step
                if not log_row:  # a stop between log rows: the state keeps its window for a resume
                    stop_window = LossWindow(w_sum, int(w_n), seconds)
            if log_row or stop:
                win_sum.zero_(), win_n.zero_()
            if world.is_main and (step % t.checkpoint_every == 0 or step == t.max_steps or stop):
                with sigs.saving(step):
                    last_ck = checkpoint(step, stop_window)
            if world.is_main and (step % t.sample_every == 0 or step == t.max_steps or budget_spent):
                sample_grid(step)
            if signalled:
                code = 128 + signalled
                raise Interrupted(f"interrupted at step {step}; checkpoint {last_ck} written. Resume with: "
                                  f"diffcli train {out / 'recipe.toml'} --out {out} --resume", code)
            if budget_spent:
                stopped_by = "max_minutes"
                break
    if last_ck is None and world.is_main:  # e.g. resumed a run that had already reached max_steps
        last_ck = checkpoint(step)
    dist.barrier(world)  # no rank leaves before rank 0 has written the final checkpoint
    seconds = time.perf_counter() - t0
    dist.finish()
    how = ", ".join([str(dev), "channels_last" if channels_last else "contiguous"] + (["bf16"] if t.bf16 else []))
    return TrainResult(out, step, last_loss, ips, seconds, last_ck, stopped_by, n_params, how)


def _retain(folder: Path, keep: int) -> None:
    """Keep the newest `keep` periodic checkpoints (pairs of model + state); never the newest one."""
    steps = sorted({int(p.name.split("_")[1].split(".")[0]) for p in folder.glob("step_*.safetensors")})
    for s in steps[:-max(keep, 1)]:
        for p in (folder / f"step_{s:07d}.safetensors", folder / f"step_{s:07d}.state.safetensors"):
            p.unlink(missing_ok=True)


def _metrics_text(rows: list[list[str]]) -> bytes:
    """metrics.csv's bytes: the header, then `rows`, with "\n" line ends (shell tools see no stray "\r")."""
    return "".join(",".join(r) + "\n" for r in [METRICS_HEADER, *rows]).encode()


def _metrics_rows(path: Path) -> list[list[str]]:
    """The step rows of a metrics.csv (a missing header, or lines that are not step rows, are dropped)."""
    try:
        with open(path, newline="") as f:
            return [r for r in csv.reader(f) if r and r[0].isdigit()]
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not the run's metrics file; move it away") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e}); move it away or repair "
                        f"it") from None


class _MetricsWriter:
    def __init__(self, path: Path, resumed: LossWindow | None = None) -> None:
        """`resumed`: the window a stop between log rows left; its clock, not the last row's, goes on."""
        self.path = path
        self.seconds_before = 0.0  # the run's training seconds before this start: a resumed run's clock goes on
        if not path.exists() or path.stat().st_size == 0:  # written whole or not at all (a full disk, a kill)
            atomic_write_bytes(path, _metrics_text([]))
        if resumed is not None and resumed.steps:  # the dropped stop row's clock
            self.seconds_before = resumed.seconds
            return
        rows = _metrics_rows(path)
        try:
            self.seconds_before = float(rows[-1][METRICS_HEADER.index("seconds")]) if rows else 0.0
        except (ValueError, IndexError):
            self.seconds_before = 0.0

    def write(self, row: list) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f, lineterminator="\n").writerow(row)
        except OSError as e:  # e.g. out of disk: a clean runtime failure, not a traceback
            raise RunFailure(f"cannot write {self.path}: {e.strerror or e}; the last checkpoint is intact") from None


def _truncate_metrics(path: Path, step: int, window: LossWindow | None = None) -> None:
    """On resume, drop rows logged after the checkpoint we resume from (they will be logged again), and the
    stop row at that step when its window goes on (`window` restored from the state). The file is rewritten
    with its header (a header lost to a full disk, or lines that are not step rows, are repaired)."""
    if not path.exists() and not path.is_symlink():
        return
    last = step - 1 if window is not None and window.steps else step
    atomic_write_bytes(path, _metrics_text([r for r in _metrics_rows(path) if int(r[0]) <= last]))
