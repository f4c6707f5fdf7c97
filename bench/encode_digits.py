"""Benchmark: probability-flow ODE inversion on the trained digits model, diffcli vs diffusers.

Round trip (encode → latents → decode) PSNR vs NFE for each diffcli solver, side by side with diffusers'
`DDIMInverseScheduler` + `DDIMScheduler` driving the same network at the same NFE, and bits/dim of the digits
test images with its standard error.

    .venv/bin/pip install diffusers     # bench-only extra; diffcli never imports it
    .venv/bin/python bench/encode_digits.py runs/digits/last.safetensors --out bench/encode_digits.json

diffusers sees diffcli's denoiser D(x, σ) as an ε-model in VP coordinates: a discrete table of 1000 noise
levels σ_t, log-uniform on [σ_min, σ_max] of the checkpoint, ᾱ_t = 1/(1 + σ_t²) (passed as `trained_betas`),
x_vp = x/sqrt(1 + σ²) and ε̂(x_vp, t) = (x - D(x, σ_t))/σ_t. "trailing" timestep spacing (Lin et al. 2024)
makes both schedulers span the whole table, ending (and the inversion starting) at ᾱ = 1, i.e. the data.
Inputs are the first --n digits test images quantized to 8 bits, as `diffcli encode` reads them from PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffcli.checkpoint import file_hash, load_checkpoint  # noqa: E402
from diffcli.data import digits_arrays  # noqa: E402
from diffcli.encode import (ODESpec, bits_per_dim, decode, default_schedule, dequantize, encode,  # noqa: E402
                            is_adaptive, log_likelihood, min_steps, _image_generator)
from diffcli.samplers import SAMPLER_INFO  # noqa: E402


def psnr_of(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(PSNR of the overall MSE, mean per-image PSNR) in dB for [-1, 1] images."""
    mse = (y.double() - x.double()).flatten(1).square().mean(1)
    overall = 10 * math.log10(4 / float(mse.mean()))
    return overall, float((10 * torch.log10(4 / mse.clamp_min(1e-30))).mean())


def diffcli_round_trip(den, x, solver: str, nfe: int | None, rtol: float | None, batch: int) -> dict:
    solver, _, sched = solver.partition(":")  # "ddim:logsnr" picks the spacing
    info = SAMPLER_INFO[solver]
    if rtol is not None:
        spec = ODESpec(solver, min_steps(solver), default_schedule(solver, den.process), den.sigma_min,
                       den.sigma_max, options={"rtol": rtol, "atol": rtol})
    else:
        steps = info.steps_for_nfe(nfe)
        if steps < min_steps(solver):
            return {}
        spec = ODESpec(solver, steps, sched or default_schedule(solver, den.process), den.sigma_min, den.sigma_max)
    ys, ne, nd = [], 0, 0
    t0 = time.perf_counter()
    for b in range(0, len(x), batch):
        e = encode(den, x[b:b + batch], spec)
        y, n = decode(den, e.latents, spec)
        ys.append(y)
        ne, nd = max(ne, e.nfe), max(nd, n)
    y = torch.cat(ys)
    p, pm = psnr_of(x, y)
    return {"method": f"diffcli {solver}" + (f" ({sched})" if sched else ""), "solver": solver, "schedule": spec.schedule, "levels": spec.steps,
            "rtol": rtol, "nfe_encode": ne, "nfe_decode": nd, "psnr_db": p, "mean_psnr_db": pm,
            "max_abs_error": float((y - x.double()).abs().max()), "seconds": time.perf_counter() - t0}


class EpsModel:
    """diffcli's denoiser as the ε-model diffusers' VP schedulers expect (module docstring)."""

    def __init__(self, den, sigmas_t: torch.Tensor) -> None:
        self.den, self.sigmas_t = den, sigmas_t

    @torch.no_grad()
    def __call__(self, x_vp: torch.Tensor, t: int) -> torch.Tensor:
        s = float(self.sigmas_t[int(t)])
        x = x_vp.double() * math.sqrt(1 + s * s)
        d = self.den(x.float(), torch.full((len(x),), s, dtype=torch.float32)).double()
        return ((x - d) / s).to(x_vp.dtype)


def diffusers_round_trip(den, x, nfe: int, batch: int) -> dict:
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    T = 1000
    sig = torch.logspace(math.log10(den.sigma_min), math.log10(den.sigma_max), T, dtype=torch.float64)
    abar = 1 / (1 + sig**2)
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    kw = dict(num_train_timesteps=T, trained_betas=betas.tolist(), clip_sample=False, set_alpha_to_one=True,
              prediction_type="epsilon", timestep_spacing="trailing")
    inv, fwd = DDIMInverseScheduler(**kw), DDIMScheduler(**kw)
    inv.set_timesteps(nfe)
    fwd.set_timesteps(nfe)
    model = EpsModel(den, sig)
    ys, calls = [], 0
    t0 = time.perf_counter()
    for b in range(0, len(x), batch):
        lat = x[b:b + batch].double()  # ᾱ = 1 at the start: x_vp = x0
        calls = 0
        for t in inv.timesteps:
            lat = inv.step(model(lat, t), t, lat).prev_sample
            calls += 1
        sig_T = float(sig[int(inv.timesteps[-1])])
        z = lat * math.sqrt(1 + sig_T**2)
        for t in fwd.timesteps:
            lat = fwd.step(model(lat, t), t, lat, eta=0.0).prev_sample
            calls += 1
        ys.append(lat)
    y = torch.cat(ys)
    p, pm = psnr_of(x, y)
    return {"method": "diffusers DDIMInverseScheduler+DDIMScheduler", "nfe_encode": len(inv.timesteps),
            "nfe_decode": len(fwd.timesteps), "psnr_db": p, "mean_psnr_db": pm,
            "max_abs_error": float((y - x.double()).abs().max()), "latent_std": float(z.std() / sig_T),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--n", type=int, default=16, help="test images in the round-trip benchmark")
    ap.add_argument("--nfe", default="10,25,50,100")
    ap.add_argument("--solvers", default="ddim,ddim:logsnr,heun,dpmpp_2m,unipc",
                    help="solver[:schedule], comma-separated")
    ap.add_argument("--rtol", default="1e-3", help="tolerances of adaptive solvers (rk45)")
    ap.add_argument("--nll-n", type=int, default=64, help="test images for bits/dim (0: skip)")
    ap.add_argument("--nll-solver", default="unipc")
    ap.add_argument("--nll-nfe", type=int, default=50)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--exact", action="store_true", help="exact divergence instead of Hutchinson")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ck = load_checkpoint(a.checkpoint)
    den = ck.denoiser
    xt, _ = digits_arrays("test")
    x = torch.from_numpy(xt)
    x = ((x + 1) * 127.5).round() / 127.5 - 1  # 8-bit, as read from PNG files
    xr = x[: a.n].double()
    rows = []
    for nfe in [int(v) for v in a.nfe.split(",")]:
        r = diffusers_round_trip(den, xr.float(), nfe, a.batch)
        r["nfe"] = nfe
        rows.append(r)
        print(json.dumps(r), flush=True)
        for solver in a.solvers.split(","):
            r = diffcli_round_trip(den, xr, solver, nfe, None, a.batch)
            if r:
                r["nfe"] = nfe
                rows.append(r)
                print(json.dumps(r), flush=True)
    for solver in [s for s in SAMPLER_INFO if is_adaptive(s)]:
        for rtol in [float(v) for v in a.rtol.split(",") if v]:
            r = diffcli_round_trip(den, xr, solver, None, rtol, a.batch)
            r["nfe"] = r["nfe_decode"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    result = {"checkpoint": str(a.checkpoint), "checkpoint_sha256": file_hash(a.checkpoint),
              "checkpoint_step": ck.step, "n_images": len(xr), "round_trip": rows, "args": vars(a) | {
                  "checkpoint": str(a.checkpoint), "out": str(a.out)}}
    if a.nll_n > 0:
        xn = x[: a.nll_n]
        info = SAMPLER_INFO[a.nll_solver]
        spec = ODESpec(a.nll_solver, info.steps_for_nfe(a.nll_nfe), default_schedule(a.nll_solver, den.process),
                       den.sigma_min, den.sigma_max)
        t0 = time.perf_counter()
        bpd, pse, nfe = [], [], 0
        for b in range(0, len(xn), a.batch):
            gens = [_image_generator(0, i) for i in range(b, min(b + a.batch, len(xn)))]
            xq = dequantize(xn[b:b + a.batch], gens)
            L = log_likelihood(den, xq, spec, probes=a.probes, exact=a.exact, generators=gens)
            bpd.append(bits_per_dim(L.log_prob, 64))
            pse.append(L.se / (64 * math.log(2)))
            nfe = L.nfe
        bpd_t = torch.cat(bpd)
        result["nll"] = {"n_images": len(xn), "solver": a.nll_solver, "levels": spec.steps, "nfe": nfe,
                         "divergence": "exact" if a.exact else f"hutchinson x{a.probes}",
                         "bits_per_dim": float(bpd_t.mean()), "se": float(bpd_t.std() / math.sqrt(len(bpd_t))),
                         "mean_probe_se": float(torch.cat(pse).nanmean()) if not a.exact else 0.0,
                         "seconds": time.perf_counter() - t0}
        print(json.dumps(result["nll"]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
