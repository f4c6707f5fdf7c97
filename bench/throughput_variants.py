"""diffcli's UNet training step under the per-device speed options, back to back in one process (issue 8):
`base` (contiguous NCHW), `cl` (channels_last weights and input: what `diffcli train` runs on an AVX-512
CPU), `compile` (torch.compile, as `train.compile = true`), `cl_compile` (both), `bf16` / `cl_bf16` (bf16
autocast, as `train.bf16 = true`). Same network, optimizer (make_optimizer: fused AdamW) and batch; the median seconds per
step over ROUNDS rounds, each round one step of every variant in turn, so machine load falls on all alike.
With `--before DIR` (an older checkout, e.g. `git archive REV diffcli | tar -x -C DIR`), a variant named
`before_X` is X with that checkout's UNet: the network's own speed-up, with the optimizer held fixed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/throughput_variants.py --res 32 --batch 32 --variants base,cl,compile --rounds 10
    .venv/bin/python bench/throughput_variants.py --res 8 --batch 128 --variants before_base,base --before /tmp/before --rounds 60 --threads 2

The networks are bench/throughput.py's (`build`): the 8×8 digits config and the 32×32 config.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import build  # noqa: E402

from diffcli.train import make_optimizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, choices=(8, 32), default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--variants", default="base,cl,compile")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", default=None, help="folder holding an older checkout's diffcli/, for before_* variants")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c = 3 if args.res == 32 else 1
    x = torch.randn(args.batch, c, args.res, args.res)
    t = torch.rand(args.batch) * 999
    steps = {}
    for v in args.variants.split(","):
        torch.manual_seed(0)
        before = v.startswith("before_")
        if before and not args.before:
            ap.error(f"variant {v} needs --before DIR")
        net = build("diffcli_before", args.res, args.before) if before else build("diffcli", args.res)
        v_opts = v.removeprefix("before_")
        xx = x
        if v_opts.startswith("cl"):
            net = net.to(memory_format=torch.channels_last)
            xx = x.contiguous(memory_format=torch.channels_last)
        f = torch.compile(net) if v_opts.endswith("compile") else net
        opt = make_optimizer(net.parameters(), lr=1e-4)
        bf16 = v_opts.endswith("bf16")  # as train.bf16 = true: torch.autocast on the device

        def step(f=f, xx=xx, opt=opt, bf16=bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = (f(xx, t).float() - x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        t0 = time.time()
        step()
        step()
        print(f"{v}: warm-up (2 steps, compile included) {time.time() - t0:.1f} s", flush=True)
        steps[v] = step
    times = {v: [] for v in steps}
    for _ in range(args.rounds):
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(times))])
    for v, ts in times.items():
        m = statistics.median(ts)
        print(f"{v}: median {m:.4f} s/step, {args.batch / m:.1f} img/s, {base / m:.3f}x the first variant")


if __name__ == "__main__":
    main()
