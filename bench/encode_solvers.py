"""Round-trip PSNR of probability-flow ODE inversion (encode, then decode) by solver, NFE and UniPC order, on
any checkpoint and images: which solver is a safe default for `diffcli encode`.

    .venv/bin/python bench/encode_solvers.py CKPT IMAGE.png [IMAGE.png …]

Each row: `diffcli.encode.encode` then `decode` with the solver's default schedule on NFE noise levels (as
`diffcli encode --solver S --nfe N` runs it, with `order` set for UniPC where given); PSNR of the overall MSE on
the [-1, 1] scale, and the latents' std in units of σ_max (≈ 1 when the inversion did not diverge).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch

from diffcli import encode as E
from diffcli.checkpoint import load_denoiser
from diffcli.data import read_image

ROWS = [("unipc", 30, {}), ("unipc", 30, {"order": 3}), ("unipc", 30, {"order": 2}), ("unipc", 60, {}),
        ("unipc", 60, {"order": 3}), ("unipc", 60, {"order": 2}), ("unipc", 100, {}), ("unipc", 100, {"order": 3}),
        ("unipc", 100, {"order": 2}), ("dpmpp_2m", 30, {}), ("dpmpp_2m", 100, {}), ("dpmpp_3m", 30, {})]


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    d = load_denoiser(sys.argv[1])
    x0 = torch.stack([read_image(Path(f), None, None) for f in sys.argv[2:]]).float()
    for solver, nfe, opts in ROWS:
        spec = E.resolve_spec(E.EncodeSettings(solver=solver, nfe=nfe), d)
        spec = dataclasses.replace(spec, options={**spec.options, **opts})
        z = E.encode(d, x0, spec)
        xr, _ = E.decode(d, z.latents, spec)
        mse = (xr - x0.double()).pow(2).mean().item()
        print(f"{solver} NFE {nfe} {opts or ''}: PSNR {10 * math.log10(4 / mse):.1f} dB, latent std "
              f"{z.latents.std().item() / spec.sigma_max:.2f}·σ_max", flush=True)


if __name__ == "__main__":
    main()
