"""Foundation benchmark: sample quality after the same wall-clock of training on digits, diffcli vs diffusers.

The peer is diffusers' `train_unconditional` example set-up: UNet2DModel (~0.7 M parameters at 8×8),
DDPMScheduler (linear β, ε target, T = 1000), AdamW lr 1e-4 with 500 warm-up steps then cosine decay, EMA
(EMAModel, inv_gamma 1, power 3/4, max 0.9999), batch 128, sampled with 1,000 DDPM steps as its pipeline does.
diffcli trains `recipes/digits.toml` through its CLI. Both trainers run *at the same time*, one CPU thread
each, so that whatever else loads the machine loads both equally; both get the same training budget.

Quality: Fréchet distance on the features of diffcli's digits classifier (diffcli.features, trained on the
digits train split) between 1,000 samples and the 1,797 digits images; the real-vs-real floor is the
distance between the train and test splits. diffcli's conditional model is sampled with balanced labels
(cfg 1) and also with the null class (unconditional), so the comparison with the unconditional peer is fair.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/train_digits.py --minutes 5 --n 1000
    .venv/bin/python bench/train_digits.py --curve 1,2,5,10 --n 1000     # time-to-quality curve (issue 8)

With --curve, one run of max(curve) minutes per trainer keeps snapshots along the way: diffcli a checkpoint
every 10 optimizer steps (its metrics.csv gives each one's training seconds), diffusers its EMA weights at each
mark; at every mark both are scored with the newest snapshot taken within that much training time. Results go
to OUT/curve.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def peer_model():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)


def train_peer(minutes: float, out: Path, seed: int = 0, marks: tuple[float, ...] = ()) -> dict:
    """diffusers' train_unconditional loop on digits for `minutes` of wall-clock; at each of `marks` (minutes) its
    EMA weights are saved to OUT/peer_ema_<mark>min.safetensors (the save is not counted as training time)."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    from diffcli.data import digits_arrays

    torch.manual_seed(seed)
    x_all = torch.from_numpy(digits_arrays("train")[0])
    model = peer_model()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    est_steps = 100000  # the cosine decay horizon of a long run; the budget stops far earlier
    lr_sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=500, num_training_steps=est_steps)
    ema = EMAModel(model.parameters(), inv_gamma=1.0, power=3 / 4, max_value=0.9999, use_ema_warmup=True)
    g = torch.Generator().manual_seed(seed)
    t0, step, paused = time.perf_counter(), 0, 0.0
    pending = sorted(m for m in marks if m < minutes)
    model.train()
    while time.perf_counter() - t0 - paused < 60 * minutes:
        if pending and time.perf_counter() - t0 - paused >= 60 * pending[0]:
            p0 = time.perf_counter()
            _save_peer_ema(ema, out / f"peer_ema_{pending.pop(0):g}min.safetensors", step)
            paused += time.perf_counter() - p0
        idx = torch.randint(0, len(x_all), (128,), generator=g)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (128,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(model.parameters())
        step += 1
    seconds = time.perf_counter() - t0 - paused
    out.mkdir(parents=True, exist_ok=True)
    _save_peer_ema(ema, out / "peer_ema.safetensors", step)
    if marks:
        _save_peer_ema(ema, out / f"peer_ema_{minutes:g}min.safetensors", step)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"steps": step, "seconds": seconds, "images_per_s": step * 128 / seconds, "parameters": n_params,
            "final_loss": float(loss)}
    (out / "peer_train.json").write_text(json.dumps(info, indent=2))
    return info


def _save_peer_ema(ema, path: Path, step: int) -> None:
    from safetensors.torch import save_file

    model = peer_model()
    ema.copy_to(model.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), {"step": str(step)})


def sample_peer(out: Path, n: int, seed: int = 0, steps: int = 1000, weights: Path | None = None):
    import torch
    from diffusers import DDPMScheduler
    from safetensors.torch import load_file

    model = peer_model()
    model.load_state_dict(load_file(str(weights or out / "peer_ema.safetensors")))
    model.eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x, generator=g).prev_sample
    return x.clamp(-1, 1), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for each trainer")
    ap.add_argument("--out", type=Path, default=REPO / "bench/out/train_digits")
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes/digits.toml")
    ap.add_argument("--peer-steps", type=int, default=1000, help="DDPM steps for the peer (its pipeline: 1000)")
    ap.add_argument("--curve", default=None, help="comma-separated minutes: time-to-quality curve (see above)")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--marks", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _threads(args.threads)
    if args.peer_only:
        train_peer(args.minutes, args.out, marks=tuple(float(m) for m in args.marks.split(",") if m))
        return
    marks = tuple(sorted(float(m) for m in args.curve.split(","))) if args.curve else ()
    if marks:
        args.minutes = marks[-1]

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    run = args.out / "diffcli_run"
    every = 10 if marks else 1000000
    ours_cmd = [sys.executable, "-m", "diffcli", "train", str(args.recipe), "--out", str(run), "--force",
                "--set", f"train.max_minutes={args.minutes}", "--set", "train.max_steps=1000000",
                "--set", f"train.checkpoint_every={every}", "--set", "train.sample_every=1000000",
                "--set", f"train.log_every={min(every, 50)}", "--set", "train.keep_last=100000"]
    peer_cmd = [sys.executable, __file__, "--peer-only", "--minutes", str(args.minutes), "--out", str(args.out),
                "--threads", str(args.threads), "--marks", ",".join(f"{m:g}" for m in marks)]
    print("training both for", args.minutes, "minutes, in parallel ...", flush=True)
    procs = [subprocess.Popen(ours_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
             subprocess.Popen(peer_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    outs = [p.communicate()[0] for p in procs]
    for p, o in zip(procs, outs):
        if p.returncode != 0:
            sys.exit(f"trainer failed ({p.args[:4]}):\n{o}")
    peer_info = json.loads((args.out / "peer_train.json").read_text())
    import csv

    rows = list(csv.DictReader(open(run / "metrics.csv")))
    ours_steps = int(rows[-1]["step"])
    ours_seconds = float(rows[-1]["seconds"])
    ours_info = {"steps": ours_steps, "seconds": ours_seconds,
                 "images_per_s": ours_steps * 128 / ours_seconds}

    # --- sample and score (sequential; quality only, not timed against each other) -------------------
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from diffcli.checkpoint import load_checkpoint
    from diffcli.data import digits_arrays
    from diffcli.features import class_accuracy, digits_frechet_distance
    from diffcli.generate import SampleSettings, generate
    from diffcli.images import save_grid

    ref = torch.from_numpy(digits_arrays("all")[0])
    floor = digits_frechet_distance(torch.from_numpy(digits_arrays("train")[0]),
                                    torch.from_numpy(digits_arrays("test")[0]))
    if marks:
        curve(args, run, marks, ref, floor, peer_info)
        return
    ck = load_checkpoint(run / "last.safetensors")
    ours_params = sum(p.numel() for p in ck.denoiser.net.parameters())
    res = {"minutes": args.minutes, "threads_per_trainer": args.threads, "n": args.n, "real_vs_real": floor}
    for label, cls in (("cond", None), ("uncond", "null")):
        s = SampleSettings(sampler=ck.recipe.sample.sampler, steps=ck.recipe.sample.steps, n=args.n, seed=0,
                           batch_size=500)
        imgs, rec = generate(_Null(ck.denoiser) if cls else ck.denoiser, 1, 8, s, device=torch.device("cpu"))
        fd = digits_frechet_distance(imgs, ref)
        res[f"diffcli_{label}"] = {"fd": fd, "nfe": rec["nfe"], "sample_seconds": rec["seconds"]}
        if cls is None:
            res["diffcli_cond"]["class_accuracy"] = class_accuracy(imgs, torch.tensor(rec["labels"]))
        save_grid(args.out / f"diffcli_{label}_grid.png", imgs[:100], nrow=10)
    peer_imgs, peer_secs = sample_peer(args.out, args.n, steps=args.peer_steps)
    res["diffusers"] = {"fd": digits_frechet_distance(peer_imgs, ref), "nfe": args.peer_steps,
                        "sample_seconds": peer_secs}
    save_grid(args.out / "diffusers_grid.png", peer_imgs[:100], nrow=10)
    res["train"] = {"diffcli": {**ours_info, "parameters": ours_params}, "diffusers": peer_info}
    res["ratio_fd_diffcli_cond_over_diffusers"] = res["diffcli_cond"]["fd"] / res["diffusers"]["fd"]
    res["ratio_fd_diffcli_uncond_over_diffusers"] = res["diffcli_uncond"]["fd"] / res["diffusers"]["fd"]
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def curve(args, run: Path, marks: tuple[float, ...], ref, floor: float, peer_info: dict) -> None:
    """Score both trainers' snapshots at every mark (module docstring) → OUT/curve.json."""
    import csv

    import torch

    from diffcli.checkpoint import load_checkpoint
    from diffcli.features import class_accuracy, digits_frechet_distance
    from diffcli.generate import SampleSettings, generate

    seconds = {int(r["step"]): float(r["seconds"]) for r in csv.DictReader(open(run / "metrics.csv"))}
    cks = {int(p.stem.split("_")[1].split(".")[0]): p for p in (run / "checkpoints").glob("step_*.safetensors")
           if not p.name.endswith(".state.safetensors")}
    out = {"marks_minutes": list(marks), "n": args.n, "threads_per_trainer": args.threads, "real_vs_real": floor,
           "diffusers_train": peer_info, "points": []}
    for m in marks:
        ok = [s for s in cks if s in seconds and seconds[s] <= 60 * m]
        step = max(ok) if ok else min(cks)  # none yet within the mark: the first one (its seconds are recorded)
        ck = load_checkpoint(cks[step])
        s = SampleSettings(sampler=ck.recipe.sample.sampler, steps=ck.recipe.sample.steps, n=args.n, seed=0,
                           batch_size=500)
        point = {"minutes": m, "diffcli_step": step, "diffcli_seconds": seconds[step]}
        for label, d in (("cond", ck.denoiser), ("uncond", _Null(ck.denoiser))):
            imgs, rec = generate(d, 1, 8, s, device=torch.device("cpu"), show_progress=False)
            point[f"diffcli_{label}_fd"] = digits_frechet_distance(imgs, ref)
            if label == "cond":
                point["diffcli_cond_class_accuracy"] = class_accuracy(imgs, torch.tensor(rec["labels"]))
        weights = args.out / f"peer_ema_{m:g}min.safetensors"
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            point["diffusers_step"] = int(f.metadata()["step"])
        peer_imgs, _ = sample_peer(args.out, args.n, steps=args.peer_steps, weights=weights)
        point["diffusers_fd"] = digits_frechet_distance(peer_imgs, ref)
        out["points"].append(point)
        print(json.dumps(point), flush=True)
        (args.out / "curve.json").write_text(json.dumps(out, indent=2))
    peer10 = out["points"][-1]["diffusers_fd"]
    reach = [p["minutes"] for p in out["points"] if p["diffcli_uncond_fd"] <= peer10]
    out["diffcli_uncond_minutes_to_diffusers_final_fd"] = min(reach) if reach else None
    (args.out / "curve.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


class _Null:
    """The conditional denoiser asked for the null class only (its unconditional half)."""

    def __init__(self, d) -> None:
        self.d = d
        self.num_classes = 0
        self.sigma_min, self.sigma_max, self.process = d.sigma_min, d.sigma_max, d.process

    def __call__(self, x, sigma, cond=None):
        return self.d(x, sigma, None)


if __name__ == "__main__":
    main()
