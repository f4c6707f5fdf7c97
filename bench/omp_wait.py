"""The training step when the CPU is shared: OpenMP's wait policy (issue 8, speed per device).

torch's CPU kernels run each op as an OpenMP parallel region (libgomp in the pip wheels). Between regions
libgomp's idle threads spin (OMP_WAIT_POLICY unset: GOMP_SPINCOUNT = 300,000 iterations) before they sleep.
On an idle machine that saves a wake-up per op; when another process wants the same cores, the spinning threads
burn the time slices the descheduled ones need to reach the barrier, and every op waits a scheduler tick.

This bench times the digits recipe's training step (bench/throughput.py's 8×8 network, fused AdamW, batch 128,
channels_last as `diffcli train` runs it on an AVX-512 CPU) in a worker process under each setting, alone and
beside a competitor: a second worker with the same setting (two trainings, or a training and `diffcli sample`,
on one machine), or a plain busy loop on one core (any other job). Scenarios and settings are interleaved
round by round so machine drift falls on all alike; the number is the median seconds per step of the measured
worker (for `pair`, of both).

    .venv/bin/python bench/omp_wait.py --rounds 3 --steps 20 --out docs/bench/omp_wait.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": {},  # libgomp's own: spin 300,000 iterations, then sleep
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "spin3k": {"GOMP_SPINCOUNT": "3000"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin30k": {"GOMP_SPINCOUNT": "30000"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
}
SCENARIOS = ("solo", "pair", "busy")


def worker(steps: int, res: int) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from throughput import build

    from diffcli.train import make_optimizer

    torch.manual_seed(0)
    batch, c = (128, 1) if res == 8 else (32, 3)
    net = build("diffcli", res).to(memory_format=torch.channels_last)
    x = torch.randn(batch, c, res, res).contiguous(memory_format=torch.channels_last)
    t = torch.rand(batch) * 999
    opt = make_optimizer(net.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        loss = (net(x, t) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"median": statistics.median(times), "threads": torch.get_num_threads()}))


def env_for(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(SETTINGS[setting])
    return env


def run(setting: str, scenario: str, steps: int, res: int) -> list[float]:
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--res", str(res)]
    env = env_for(setting)
    busy = None
    if scenario == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2 if scenario == "pair" else 1)]
    outs = [p.communicate()[0] for p in procs]
    if busy is not None:
        busy.kill()
        busy.wait()
    for p in procs:
        if p.returncode:
            raise SystemExit(f"worker failed under {setting}/{scenario}")
    return [json.loads(o.strip().splitlines()[-1])["median"] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--res", type=int, choices=(8, 32), default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.res)
        return
    settings, scenarios = args.settings.split(","), args.scenarios.split(",")
    got = {(s, c): [] for s in settings for c in scenarios}
    for r in range(args.rounds):
        for c in scenarios:
            for s in settings:
                got[(s, c)] += run(s, c, args.steps, args.res)
                print(f"round {r} {c:5s} {s:9s} {got[(s, c)][-1]:.4f} s/step", flush=True)
    table = {c: {s: statistics.median(got[(s, c)]) for s in settings} for c in scenarios}
    print("\nmedian s/step (ratio to default)")
    print("scenario | " + " | ".join(settings))
    for c in scenarios:
        base = table[c].get("default")
        cells = [f"{table[c][s]:.4f}" + (f" ({base / table[c][s]:.2f}×)" if base else "") for s in settings]
        print(f"{c} | " + " | ".join(cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "res": args.res, "steps": args.steps,
                                              "rounds": args.rounds, "median_s_per_step": table,
                                              "all": {f"{s}/{c}": v for (s, c), v in got.items()}}, indent=1))


if __name__ == "__main__":
    main()
