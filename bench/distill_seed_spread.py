"""FD spread over sampling seeds (digits extractor, n images per seed) of distilled students and teachers.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_seed_spread.py \
        [--model PATH[:SAMPLER:STEPS] ...] [--seeds 0,1,2,3] [--n 1000]

A model without SAMPLER:STEPS is sampled as its checkpoint says (a student's recorded sampler, steps and σ grid);
with them, as that sampler at that many steps on its default schedule. Default: the 1-step CD student of
bench/distill_digits.py. Prints one row per model with the FD at each seed, and, when two or more models are
given, the ratio of each model's FD to the first model's at the same seed (the same noise for both).
"""

from __future__ import annotations

import argparse

import torch

from diffcli.checkpoint import load_checkpoint
from diffcli.data import load_dataset
from diffcli.features import digits_frechet_distance
from diffcli.generate import SampleSettings, generate, student_sigmas


def fd_at_seed(spec: str, seed: int, n: int, ref: torch.Tensor) -> float:
    path, *rest = spec.split(":")
    ck = load_checkpoint(path)
    if rest:
        sampler, steps = rest[0], int(rest[1])
        s = SampleSettings(sampler=sampler, steps=steps, n=n, seed=seed, batch_size=500)
    else:
        s = SampleSettings(sampler=ck.meta["student_sampler"], steps=int(ck.meta["student_steps"]), n=n, seed=seed,
                           sigmas=student_sigmas(ck), batch_size=500)
    imgs, _ = generate(ck.denoiser, ck.channels, ck.resolution, s, device=torch.device("cpu"), show_progress=False)
    return round(digits_frechet_distance(imgs, ref), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = args.model or ["bench/out/distill/consistency/last.safetensors"]
    seeds = [int(s) for s in args.seeds.split(",")]
    ref = load_dataset(load_checkpoint(models[0].split(":")[0]).recipe.data).images
    table = {m: [fd_at_seed(m, seed, args.n, ref) for seed in seeds] for m in models}
    for m, fds in table.items():
        print(m, " ".join(f"seed{s}={v}" for s, v in zip(seeds, fds)), flush=True)
    for m in models[1:]:
        ratios = [round(a / b, 3) for a, b in zip(table[m], table[models[0]])]
        print(f"{m} / {models[0]}:", " ".join(f"seed{s}={r}" for s, r in zip(seeds, ratios)))


if __name__ == "__main__":
    main()
