"""Benchmark: distillation of the digits teacher — Fréchet distance (digits extractor) and class accuracy of
students vs the teacher, with the wall-clock of each distillation on this machine.

    .venv/bin/python bench/distill_digits.py --teacher runs/digits/last.safetensors --out bench/out/distill \
        [--n 1000] [--max-minutes 6] [--methods progressive,consistency,guidance,reflow]

Teacher at NFE 1/2/4/8/50 with its best of ddim / dpmpp_2m (heun for 50); progressive students at 8/4/2/1 steps;
consistency (CD) at 1/2 steps; reflow at 1 step; guidance-distilled student vs the teacher's CFG at the same w.
Results: OUT/results.json and a markdown table on stdout (pasted into docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffcli.checkpoint import load_checkpoint
from diffcli.data import load_dataset
from diffcli.distill.common import distill
from diffcli.features import class_accuracy, digits_frechet_distance
from diffcli.generate import SampleSettings, generate, student_sigmas
from diffcli.recipes import load_distill_recipe
from diffcli.samplers import SAMPLER_INFO


def evaluate(ck_path, ref, n, *, sampler=None, steps=None, nfe=None, cfg=1.0, student=False):
    ck = load_checkpoint(ck_path)
    d = ck.denoiser
    if student and sampler is None:
        s = SampleSettings(sampler=ck.meta["student_sampler"], steps=int(ck.meta["student_steps"]), n=n, cfg=cfg,
                           sigmas=student_sigmas(ck), batch_size=500)
    else:
        if nfe is not None:
            steps = SAMPLER_INFO[sampler].steps_for_nfe(nfe)
        s = SampleSettings(sampler=sampler, steps=steps, n=n, cfg=cfg, batch_size=500)
    imgs, rec = generate(d, ck.channels, ck.resolution, s, device=torch.device("cpu"), show_progress=False)
    labels = torch.tensor(rec["labels"]) if rec["labels"] is not None else None
    out = {"sampler": s.sampler, "steps": rec["steps"], "nfe": rec["nfe"],
           "network_evaluations": rec["network_evaluations"], "cfg": cfg,
           "fd": round(digits_frechet_distance(imgs, ref), 3)}
    if labels is not None:
        out["class_accuracy"] = round(class_accuracy(imgs, labels), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="runs/digits/last.safetensors")
    ap.add_argument("--out", default="bench/out/distill")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--max-minutes", type=float, default=None, help="override train.max_minutes of every recipe")
    ap.add_argument("--max-steps", type=int, default=None, help="override train.max_steps of every recipe")
    ap.add_argument("--methods", default="progressive,consistency,guidance,reflow")
    ap.add_argument("--cfg", type=float, default=2.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = load_dataset(load_checkpoint(args.teacher).recipe.data).images
    results = {"teacher": args.teacher, "n": args.n, "rows": [], "runs": {}}

    def row(name, r):
        r = {"model": name, **r}
        results["rows"].append(r)
        print(json.dumps(r), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    for nfe in (1, 2, 4, 8):
        best = min((evaluate(args.teacher, ref, args.n, sampler=sm, nfe=nfe) for sm in ("ddim", "dpmpp_2m")),
                   key=lambda r: r["fd"])
        row(f"teacher NFE {nfe}", best)
    row("teacher NFE 50", evaluate(args.teacher, ref, args.n, sampler="heun", steps=25))
    for method in args.methods.split(","):
        over = []
        if args.max_minutes is not None:
            over.append(f"train.max_minutes={args.max_minutes}")
        if args.max_steps is not None:
            over.append(f"train.max_steps={args.max_steps}")
        rec = load_distill_recipe(f"recipes/digits-{method}.toml", over)
        run = out / method
        t0 = time.perf_counter()
        summary = distill(rec, args.teacher, run, force=True, log=lambda *a, **k: print(*a, flush=True),
                          show_progress=False)
        summary["wall_clock_s"] = round(time.perf_counter() - t0, 1)
        results["runs"][method] = summary
        print(method, json.dumps(summary), flush=True)
        if method == "progressive":
            for k in (8, 4, 2, 1):
                p = run / "students" / f"steps_{k:03d}.safetensors"
                if p.exists():
                    row(f"progressive {k}-step", evaluate(p, ref, args.n, student=True))
        elif method == "consistency":
            p = run / "last.safetensors"
            row("consistency (CD) 1-step", evaluate(p, ref, args.n, student=True))
            row("consistency (CD) 2-step", evaluate(p, ref, args.n, sampler="consistency", steps=2))
        elif method == "reflow":
            row("reflow 1-step", evaluate(run / "last.safetensors", ref, args.n, student=True))
        elif method == "guidance":
            row(f"teacher CFG w={args.cfg} (heun 18)", evaluate(args.teacher, ref, args.n, sampler="heun", steps=18,
                                                               cfg=args.cfg))
            row(f"guidance student w={args.cfg} (heun 18)", evaluate(run / "last.safetensors", ref, args.n,
                                                                    student=True, cfg=args.cfg))
    print("\n| model | sampler | steps | NFE | net evals | FD ↓ | class acc |\n|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['network_evaluations']} | {r['fd']} "
              f"| {r.get('class_accuracy', '')} |")


if __name__ == "__main__":
    main()
