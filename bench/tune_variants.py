"""Tuned grids (diffcli.tuning.tune_grid) and BNS-style learned solvers (tune_solver) from other starts or
training seeds than the sampler benchmark's, scored on the same evaluation draws and rk45 reference as
bench/samplers_accuracy.py.

    OMP_NUM_THREADS=1 .venv/bin/python bench/tune_variants.py [--eval-draws 4096] SAMPLER:SCHEDULE:NFE[:iters=N][:draws=N][:seed=N][:method=grid] ...

Each spec learns on `draws` training draws (default 4096, seed 2, a quarter held out) for `iters` Adam iterations
(default 400; with method=grid: tune_grid's Nelder–Mead evaluations, default 300) and prints the evaluation-draw RMS (the first --eval-draws draws of seed 0, as the sampler
benchmark's --draws) with the tuner's record.
"""

from __future__ import annotations

import sys
import time

import torch

from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.samplers import NFECounter, exact_denoiser_calls, get_sigmas, sample_rk45
from diffcli.samplers import SAMPLER_INFO
from diffcli.tuning import sample_linear_solver, tune_grid, tune_solver

SMIN, SMAX = 0.002, 80.0


def main() -> None:
    torch.set_num_threads(1)
    gm = GaussianMixtureDenoiser.random(k=32, shape=(1, 8, 8), std=0.02, seed=0)
    args = sys.argv[1:]
    n_eval = 4096
    if args[:1] == ["--eval-draws"]:
        n_eval, args = int(args[1]), args[2:]
    eps = torch.randn(n_eval, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with exact_denoiser_calls():
        ref = sample_rk45(gm, eps * SMAX, get_sigmas("karras", 2, SMIN, SMAX), rtol=1e-9, atol=1e-9)
    for spec in args:
        name, sched, nfe, *rest = spec.split(":")
        kw = dict(r.split("=") for r in rest)
        t0 = time.time()
        common = dict(draws=int(kw.get("draws", 4096)), seed=int(kw.get("seed", 2)), schedule=sched,
                      reference_rtol=1e-9, exact=True)
        c = NFECounter(gm)
        if kw.get("method", "bns") == "grid":  # diffcli.tuning.tune_grid: the sampler's own rule on a fitted grid
            sig, rec = tune_grid(gm, name, int(nfe), SMIN, SMAX, (1, 8, 8), evals=int(kw.get("iters", 300)),
                                 **common)
            out = SAMPLER_INFO[name].fn(c, eps * float(sig[0]), sig)
        else:
            solver, rec = tune_solver(gm, name, int(nfe), SMIN, SMAX, (1, 8, 8), iters=int(kw.get("iters", 400)),
                                      **common)
            out = sample_linear_solver(c, eps * float(solver.sigmas[0]), solver.sigmas, a=solver.a, B=solver.B)
        e = float((out.double() - ref).pow(2).mean().sqrt())
        info = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
        print(f"{spec}: NFE {c.nfe}, evaluation RMS {e:.4g}, {info}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
