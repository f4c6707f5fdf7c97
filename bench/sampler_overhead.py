"""Sampler overhead: the share of sampling time spent outside the network, at batch 256 on a real checkpoint.

The denoiser is wrapped in a timer; overhead = (total sampling time − time inside the denoiser) / total.
Everything else a sampler does (float64 state, schedules, noise draws, the solver's arithmetic) is overhead.

    .venv/bin/python bench/sampler_overhead.py runs/digits/last.safetensors --batch 256 --nfe 20 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffcli.checkpoint import load_checkpoint
from diffcli.generate import SampleSettings, sigma_grid
from diffcli.runtime import sample_generator
from diffcli.samplers import SAMPLER_INFO


class Timed:
    def __init__(self, d, cond):
        self.d, self.cond, self.seconds = d, cond, 0.0

    def __call__(self, x, sigma, *a, **k):
        t0 = time.perf_counter()
        out = self.d(x, sigma, self.cond)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per sampler; the median is reported")
    ap.add_argument("--samplers", default="ddim,euler_ancestral,heun,dpmpp_2m,dpmpp_3m,dpmpp_2m_sde,unipc,ipndm")
    args = ap.parse_args()
    ck = load_checkpoint(args.checkpoint)
    d = ck.denoiser
    cond = torch.arange(args.batch) % max(d.num_classes, 1) if d.num_classes else None
    rows = []
    with torch.no_grad():
        for name in args.samplers.split(","):
            info = SAMPLER_INFO[name]
            s = SampleSettings(sampler=name, steps=info.steps_for_nfe(args.nfe), n=args.batch)
            sig = sigma_grid(d, s)
            gens = [sample_generator(0, i) for i in range(args.batch)]
            x = torch.stack([torch.randn(ck.channels, ck.resolution, ck.resolution, generator=g) for g in gens])
            x = x.double() * sig[0]
            info.fn(Timed(d, cond), x, sig, generator=gens)  # warm-up
            runs = []
            for _ in range(args.repeats):  # the median run: one run's share moves with machine jitter
                timed = Timed(d, cond)
                t0 = time.perf_counter()
                info.fn(timed, x, sig, generator=gens)
                total = time.perf_counter() - t0
                runs.append((100 * (total - timed.seconds) / total, total, timed.seconds))
            pct, total, net = sorted(runs)[len(runs) // 2]
            rows.append({"sampler": name, "nfe": args.nfe, "batch": args.batch, "total_s": round(total, 3),
                         "network_s": round(net, 3), "overhead_pct": round(pct, 2),
                         "overhead_pct_range": [round(min(r[0] for r in runs), 2), round(max(r[0] for r in runs), 2)]})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
