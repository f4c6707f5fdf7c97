"""The sampler targets re-measured on fresh, larger draw sets (issue 3): the best peer (diffusers' UniPC in the
configuration bench/samplers_accuracy.py chose for it on its selection draws) against diffcli's default
(unipc, logsnr) and the tuned grids stored in bench/samplers_accuracy.json (fitted on the training draws,
seed 2), on SEEDS × 4096 evaluation draws none of them has seen (default seeds 10–13: 16,384 draws), with a
paired-bootstrap 95% interval of each ratio. Same oracle and reference (rk45, 1e-9) as samplers_accuracy.py.

    OMP_NUM_THREADS=1 .venv/bin/python bench/samplers_confirm.py --seeds 10,11,12,13 --out bench/samplers_confirm.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from samplers_accuracy import SMAX, SMIN, run_diffusers

from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.samplers import SAMPLER_INFO, NFECounter, exact_denoiser_calls, get_sigmas, sample_rk45

# diffusers' UniPC as samplers_accuracy.py chose it per NFE (docs/BENCHMARKS.md, "Configuration each diffusers
# scheduler was run with")
PEER = {5: dict(timestep_spacing="linspace", solver_order=3, solver_type="bh2", lower_order_final=True,
                final_sigmas_type="sigma_min", prediction_type="sample"),
        10: dict(timestep_spacing="leading", solver_order=3, solver_type="bh2", lower_order_final=True,
                 final_sigmas_type="zero", prediction_type="epsilon"),
        20: dict(timestep_spacing="linspace", use_karras_sigmas=True, solver_order=3, solver_type="bh2",
                 lower_order_final=True, final_sigmas_type="sigma_min", prediction_type="epsilon")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="10,11,12,13")
    ap.add_argument("--draws", type=int, default=4096, help="draws per seed")
    ap.add_argument("--tuned", default="bench/samplers_accuracy.json")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--schedules", default="", help="also diffcli unipc on these schedules (comma-separated)")
    ap.add_argument("--out", default="bench/samplers_confirm.json")
    args = ap.parse_args()
    import diffusers

    torch.set_num_threads(1)
    gm = GaussianMixtureDenoiser.random(k=32, shape=(1, 8, 8), std=0.02, seed=0)
    tuned = [t for t in json.loads(Path(args.tuned).read_text())["tuned"] if "Nelder" in t["label"]]
    rows: dict[tuple, list] = {}  # (nfe, label) -> per-draw squared errors, one tensor per seed
    for seed in [int(s) for s in args.seeds.split(",")]:
        eps = torch.randn(args.draws, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        with exact_denoiser_calls():
            ref = sample_rk45(gm, eps * SMAX, get_sigmas("karras", 2, SMIN, SMAX), rtol=1e-9, atol=1e-9)

        def add(nfe, label, out, true_nfe):
            assert true_nfe == nfe, (label, true_nfe)
            rows.setdefault((nfe, label), []).append((out.double() - ref).pow(2).flatten(1).mean(1))

        for nfe, opts in PEER.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out, n, _ = run_diffusers(diffusers.UniPCMultistepScheduler, "vp", opts, gm, eps, nfe)
            add(nfe, "diffusers UniPC (best on selection draws)", out, n)
            info = SAMPLER_INFO["unipc"]
            g = get_sigmas("logsnr", info.steps_for_nfe(nfe), SMIN, SMAX)
            c = NFECounter(gm)
            add(nfe, "diffcli unipc, logsnr (default)", info.fn(c, eps * g[0], g), c.nfe)
            for sched in filter(None, args.schedules.split(",")):  # other untuned grids, for the default's choice
                g = get_sigmas(sched, info.steps_for_nfe(nfe), SMIN, SMAX)
                c = NFECounter(gm)
                add(nfe, f"diffcli unipc, {sched}", info.fn(c, eps * g[0], g), c.nfe)
        for t in tuned:
            g = torch.tensor(t["sigmas"], dtype=torch.float64)
            c = NFECounter(gm)
            add(t["nfe"], f"diffcli {t['sampler']}, {t['label']}", SAMPLER_INFO[t["sampler"]].fn(c, eps * g[0], g),
                c.nfe)
        print(f"seed {seed} done", flush=True)
    gen = torch.Generator().manual_seed(0)
    result = []
    for nfe in sorted({k[0] for k in rows}):
        peer = torch.cat(rows[(nfe, "diffusers UniPC (best on selection draws)")])
        idx = torch.randint(0, len(peer), (args.bootstrap, len(peer)), generator=gen)
        for (n, label), parts in rows.items():
            if n != nfe:
                continue
            sq = torch.cat(parts)
            boot = (sq[idx].mean(1).sqrt() / peer[idx].mean(1).sqrt()).sort().values
            lo, hi = boot[int(0.025 * args.bootstrap)], boot[int(0.975 * args.bootstrap) - 1]
            r = {"nfe": nfe, "row": label, "draws": len(sq), "rms": float(sq.mean().sqrt()),
                 "draws_off_component": int((sq.sqrt() > 0.1).sum()),
                 "ratio_to_peer": float(sq.mean().sqrt() / peer.mean().sqrt()), "ci95": [float(lo), float(hi)]}
            result.append(r)
            print(f"NFE {nfe:3d} {label:52s} RMS {r['rms']:.5f} off {r['draws_off_component']:4d}  "
                  f"{r['ratio_to_peer']:.3f}x [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    Path(args.out).write_text(json.dumps({"seeds": args.seeds, "draws_per_seed": args.draws, "rows": result},
                                         indent=1))


if __name__ == "__main__":
    main()
