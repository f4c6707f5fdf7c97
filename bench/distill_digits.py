"""Benchmark: distillation of the digits teacher — Fréchet distance (digits extractor) and class accuracy of
students vs the teacher, with the wall-clock of each distillation on this machine.

    .venv/bin/python bench/distill_digits.py --teacher runs/digits/last.safetensors --out bench/out/distill \
        [--n 1000] [--methods progressive,consistency,guidance,reflow] [--full]

Without --full the recipes run with BENCH_SIZES (fewer steps, batch 32: what a shared, loaded 2-core machine
finishes in minutes); --full runs the shipped recipes as they are. Teacher rows already in OUT/results.json
for the same teacher hash and n are reused (they are deterministic: image i depends only on (seed, i)).

Teacher at NFE 1/2/4/8/50 with its best of ddim / dpmpp_2m (heun for 50); progressive students at 8/4/2/1 steps;
consistency (CD) at 1/2 steps; reflow at 1 step (the flow, and the
distilled student when the recipe has reflow.distill_steps); guidance-distilled student vs the teacher's CFG at the same w.
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


BENCH_SIZES = {
    "progressive": ["progressive.teacher_steps=16", "train.max_steps=480", "train.batch_size=32",
                    "train.checkpoint_every=120", "train.ema_decay=0.995"],
    "consistency": ["train.max_steps=480", "train.batch_size=32"],
    "guidance": ["train.max_steps=360", "train.batch_size=32", "guidance.sampler='dpmpp_2m'", "guidance.steps=8"],
    "reflow": ["reflow.num_pairs=512", "reflow.chunk_size=256", "reflow.straightness_samples=128",
               "reflow.straightness_steps=16", "train.max_steps=480", "train.batch_size=32"],
}


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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override (every method)")
    ap.add_argument("--full", action="store_true", help="run the shipped recipes unchanged (no BENCH_SIZES)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # on a shared, loaded machine one thread is ~10× faster than two
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ref = load_dataset(load_checkpoint(args.teacher).recipe.data).images
    from diffcli.checkpoint import file_hash

    sha = file_hash(args.teacher)
    cached = {}
    if (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        if old.get("teacher_sha256") == sha and old.get("n") == args.n:
            cached = {r["model"]: r for r in old["rows"] if r["model"].startswith("teacher")}
    results = {"teacher": args.teacher, "teacher_sha256": sha, "n": args.n, "rows": [], "runs": {}}

    def row(name, r):
        r = {"model": name, **r}
        results["rows"].append(r)
        print(json.dumps(r), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    def teacher_row(name, fn):
        if name in cached:
            r = dict(cached[name])
            r.pop("model")
            row(name, r)
        else:
            row(name, fn())

    for nfe in (1, 2, 4, 8):
        teacher_row(f"teacher NFE {nfe}", lambda: min(
            (evaluate(args.teacher, ref, args.n, sampler=sm, nfe=nfe) for sm in ("ddim", "dpmpp_2m")),
            key=lambda r: r["fd"]))
    teacher_row("teacher NFE 50", lambda: evaluate(args.teacher, ref, args.n, sampler="heun", steps=25))
    for method in args.methods.split(","):
        over = [] if args.full else list(BENCH_SIZES[method])
        if args.max_minutes is not None:
            over.append(f"train.max_minutes={args.max_minutes}")
        if args.max_steps is not None:
            over.append(f"train.max_steps={args.max_steps}")
        over += args.sets
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
            flow = run / "students" / "flow.safetensors"
            if flow.exists():  # reflow followed by k-step distillation: score the flow and the distilled student
                row("reflow flow 1-step", evaluate(flow, ref, args.n, sampler="euler", steps=1))
                row(f"reflow + distill {rec.reflow.distill_steps}-step",
                    evaluate(run / "last.safetensors", ref, args.n, student=True))
            else:
                row("reflow 1-step", evaluate(run / "last.safetensors", ref, args.n, student=True))
        elif method == "guidance":
            sm, k = rec.guidance.sampler, rec.guidance.steps
            teacher_row(f"teacher CFG w={args.cfg} ({sm} {k})", lambda: evaluate(
                args.teacher, ref, args.n, sampler=sm, steps=k, cfg=args.cfg))
            row(f"guidance student w={args.cfg} ({sm} {k})", evaluate(run / "last.safetensors", ref, args.n,
                                                                     student=True, cfg=args.cfg))
            row(f"guidance student w=1 ({sm} {k})", evaluate(run / "last.safetensors", ref, args.n, student=True))
    print("\n| model | sampler | steps | NFE | net evals | FD ↓ | class acc |\n|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['network_evaluations']} | {r['fd']} "
              f"| {r.get('class_accuracy', '')} |")


if __name__ == "__main__":
    main()
