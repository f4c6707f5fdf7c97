"""RMS error of each sampler's final sample against a tight reference solve, on a hard Gaussian-mixture oracle.

    .venv/bin/python bench/samplers_accuracy.py [--draws 128] [--quick]

Oracle: D = 64 (1×8×8), 32 components, component std 0.02 (narrow), means in [-0.6, 0.6]^64, σ ∈ [0.002, 80].
Every sampler starts from the same noise; the reference is diffcli's rk45 at rtol = atol = 1e-9 with float64
denoiser calls. Peers (bench extra only): k-diffusion's euler, heun, lms, dpmpp_2m on its Karras and exponential
schedules. diffcli: every deterministic sampler on its default schedule, plus grids tuned by
`diffcli.samplers.tune_schedule` on *different* noise draws (seed 1) than the evaluation draws (seed 0).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.samplers import SAMPLER_INFO, NFECounter, exact_denoiser_calls, get_sigmas, sample_rk45, tune_schedule

SMIN, SMAX = 0.002, 80.0
NFES = (5, 10, 20, 50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=128)
    ap.add_argument("--tune-evals", type=int, default=200)
    ap.add_argument("--out", default="bench/samplers_accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gm = GaussianMixtureDenoiser.random(k=32, shape=(1, 8, 8), std=0.02, seed=0)
    shape = (1, 8, 8)
    x = torch.randn(args.draws, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SMAX
    t0 = time.time()
    with exact_denoiser_calls():
        ref = sample_rk45(gm, x, get_sigmas("karras", 2, SMIN, SMAX), rtol=1e-9, atol=1e-9)
    print(f"reference solved in {time.time() - t0:.1f} s")

    def rms(out) -> float:
        return float((out.double() - ref).pow(2).mean().sqrt())

    rows = []

    def record(family, name, schedule, nfe, out, true_nfe):
        rows.append({"family": family, "sampler": name, "schedule": schedule, "nfe_budget": nfe,
                     "nfe": true_nfe, "rms": rms(out)})
        print(f"{family:9s} {name:16s} {schedule:12s} NFE {nfe:3d} ({true_nfe:3d})  RMS {rows[-1]['rms']:.4e}",
              flush=True)

    # --- k-diffusion ----------------------------------------------------------------------------------------
    import sys
    import types

    # k_diffusion/__init__ imports its CLIP-based evaluation code, which needs pkg_resources (gone from recent
    # setuptools); the samplers do not use it, so a placeholder module stands in for `clip` here.
    sys.modules.setdefault("clip", types.ModuleType("clip"))
    import k_diffusion.sampling as K

    def kmodel(counter):
        def f(xx, sigma, **kw):
            counter[0] += 1
            return gm(xx.float(), sigma.float()).to(xx.dtype)
        return f

    kcost = {"euler": (lambda n: n, lambda b: b), "heun": (lambda n: 2 * n - 1, lambda b: (b + 1) // 2),
             "lms": (lambda n: n, lambda b: b), "dpmpp_2m": (lambda n: n, lambda b: b)}
    for name, (cost, steps_for) in kcost.items():
        for sched in ("karras", "exponential"):
            for nfe in NFES:
                n = steps_for(nfe)
                sig = (K.get_sigmas_karras(n, SMIN, SMAX, rho=7.0) if sched == "karras"
                       else K.get_sigmas_exponential(n, SMIN, SMAX)).float()
                c = [0]
                out = getattr(K, f"sample_{name}")(kmodel(c), x.float(), sig, disable=True)
                record("k-diff", name, sched, nfe, out, c[0])

    # --- diffcli ----------------------------------------------------------------------------------------------
    for name, info in SAMPLER_INFO.items():
        if info.stochastic or info.adaptive:
            continue
        for sched in (info.default_schedule if info.default_schedule != "uniform" else "karras", "logsnr"):
            for nfe in NFES:
                n = info.steps_for_nfe(nfe)
                c = NFECounter(gm)
                out = info.fn(c, x, get_sigmas(sched, n, SMIN, SMAX))
                record("diffcli", name, sched, nfe, out, c.nfe)
    for name in ("dpmpp_2m", "unipc", "ipndm"):
        for nfe in (5, 10):
            info = SAMPLER_INFO[name]
            n = info.steps_for_nfe(nfe)
            sig, _, _ = tune_schedule(gm, name, n, SMIN, SMAX, shape, draws=args.draws, seed=1,
                                      max_evals=args.tune_evals, start=info.default_schedule)
            c = NFECounter(gm)
            out = info.fn(c, x, sig)
            record("diffcli", name, "tuned", nfe, out, c.nfe)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
