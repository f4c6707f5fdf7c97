"""1 vs N processes on this machine: training throughput of `diffcli train` with the same global batch.

    .venv/bin/python bench/scaling.py [--recipe recipes/digits.toml] [--steps 120] [--rounds 2] [--cores 2]

Each configuration trains the recipe from scratch for `--steps` optimizer steps through the CLI (`--nproc N`
launches torchrun, gloo on CPU), with the machine's `--cores` split evenly: one process with `cores` threads
against N processes with `cores / N` threads each. Images/s is measured from metrics.csv between the first
logged window and the last (start-up, data loading and the process group's rendezvous are excluded), median
over `--rounds` alternating rounds. The last loss of each run is printed too: N processes train on exactly the
samples one process does (docs/SCALING.md), so the losses agree to float rounding.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(recipe: Path, nproc: int, steps: int, threads: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "diffcli", "train", str(recipe), "--out", str(out), "--force", "--max-steps",
           str(steps), "--set", "train.max_minutes=1000", "--set", "train.log_every=10",
           "--set", f"train.checkpoint_every={steps}", "--set", f"train.sample_every={steps * 10}",
           "--set", "train.device='cpu'"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    first, last = rows[0], rows[-1]
    batch = _batch_size(out)
    ips = (int(last["step"]) - int(first["step"])) * batch / (float(last["seconds"]) - float(first["seconds"]))
    return {"nproc": nproc, "threads_per_process": threads, "images_per_s": ips, "wall_s": wall,
            "last_loss": float(last["loss"])}


def _batch_size(out: Path) -> int:
    import tomllib

    return int(tomllib.loads((out / "recipe.toml").read_text())["train"]["batch_size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes/digits.toml")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2, help="the N compared with one process")
    ap.add_argument("--out", type=Path, default=REPO / "docs/bench/scaling.json")
    args = ap.parse_args()
    results: dict[int, list[dict]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = (1, args.nproc) if r % 2 == 0 else (args.nproc, 1)
            for n in order:
                res = run(args.recipe, n, args.steps, max(1, args.cores // n), Path(tmp) / f"n{n}_r{r}")
                results[n].append(res)
                print(json.dumps(res), flush=True)
    summary = {"recipe": str(args.recipe.relative_to(REPO)) if args.recipe.is_relative_to(REPO) else str(args.recipe),
               "steps": args.steps, "rounds": args.rounds, "cores": args.cores,
               "load_average_at_end": os.getloadavg()[0], "runs": results}
    for n, rs in results.items():
        summary[f"median_images_per_s_{n}proc"] = statistics.median(r["images_per_s"] for r in rs)
    summary["speedup"] = summary[f"median_images_per_s_{args.nproc}proc"] / summary["median_images_per_s_1proc"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
