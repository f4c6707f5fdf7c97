"""eval-fid benchmark on digits: FID-analogue (digits extractor) and class accuracy of a trained digits model
for the main samplers at NFE 5/10/20/50, real-vs-real floors, and the time to evaluate 10,000 samples
(features + FID/KID/IS/PR against the cached reference, excluding generation).

    .venv/bin/python bench/eval_digits.py runs/digits/last.safetensors --n 500 --out bench/out/eval_digits

Prints a Markdown section for docs/BENCHMARKS.md; the sweep CSV/PNG/JSON go into --out.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--samplers", default="ddim,heun,dpmpp_2m")
    ap.add_argument("--nfe", default="5,10,20,50")
    ap.add_argument("--n", type=int, default=500, help="generated images per sampler × NFE")
    ap.add_argument("--timing-n", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path("bench/out/eval_digits"))
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffcli.data import digits_arrays
    from diffcli.images import to_uint8
    from diffcli.metrics import EvalOptions, Extractor, compute_metrics, evaluate, resolve_reference
    from diffcli.samplers import SAMPLER_INFO

    samplers = [s for s in args.samplers.split(",") if s in SAMPLER_INFO]
    skipped = [s for s in args.samplers.split(",") if s not in SAMPLER_INFO]

    # 1. the sweep, through the same engine as `diffcli eval-fid`
    t0 = time.perf_counter()
    res = evaluate(EvalOptions(generated=args.checkpoint, sampler=",".join(samplers), nfe=args.nfe, n=args.n,
                               out=args.out, device="cpu"), log=lambda m: print(m, flush=True))
    sweep_s = time.perf_counter() - t0

    # 2. real-vs-real floors with the same extractor and reference
    ext = Extractor("digits", ["fid", "kid", "is", "pr"], device=torch.device("cpu"), batch_size=1024)
    ref = resolve_reference("digits", "train", None, ext, default=None, cache=True)
    x_all = torch.from_numpy(digits_arrays("all")[0])
    perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    half_a, half_b = to_uint8(x_all[perm[: len(perm) // 2]]), to_uint8(x_all[perm[len(perm) // 2:]])
    from diffcli.metrics import _reference_from_images

    ref_b = _reference_from_images(half_b, ext, {"source": "half B"})
    layers = [ext.layer, ext.is_layer]
    floor_halves = compute_metrics(ext.features(half_a, layers), ref_b, ["fid", "kid", "pr"], layer=ext.layer,
                                   is_layer=ext.is_layer)
    x_test, y_test = digits_arrays("test")
    test_u8 = to_uint8(torch.from_numpy(x_test))
    floor_test = compute_metrics(ext.features(test_u8, layers), ref, ["fid", "kid", "pr"], layer=ext.layer,
                                 is_layer=ext.is_layer)
    from diffcli.features import class_accuracy

    acc_test = class_accuracy(torch.from_numpy(x_test), torch.from_numpy(y_test))

    # 3. time to evaluate N samples (features + all four metrics), generation excluded: N real digits drawn with
    #    replacement and ±1-pixel-jittered so that they are not duplicates of the reference
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(x_all), (args.timing_n,), generator=g)
    xs = x_all[idx]
    shifts = torch.randint(-1, 2, (args.timing_n, 2), generator=g)
    xs = torch.stack([torch.roll(x, (int(s[0]), int(s[1])), dims=(1, 2)) for x, s in zip(xs, shifts)])
    u8 = to_uint8(xs)
    t0 = time.perf_counter()
    feats = ext.features(u8, layers)
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    m10k = compute_metrics(feats, ref, ["fid", "kid", "is", "pr"], layer=ext.layer, is_layer=ext.is_layer)
    t_met = time.perf_counter() - t0

    # 4. Markdown
    r0 = res.records[0]
    print("\n## eval-fid\n")
    print(f"Digits model `{args.checkpoint}` (sha256 {r0['checkpoint_sha256']}, step {r0['checkpoint_step']}), "
          f"n = {args.n} generated per row (seed 0, classes cycling 0–9, cfg 1), reference = digits train split "
          f"(n = {ref.n}); digits extractor (64-d features, hash {ext.hash}); torch-fidelity "
          f"{r0['torch_fidelity_version']}; {args.threads} CPU threads. Command:\n")
    print(f"    .venv/bin/python bench/eval_digits.py {args.checkpoint} --samplers {args.samplers} --nfe {args.nfe} "
          f"--n {args.n} --out {args.out}\n")
    if skipped:
        print(f"(samplers not available at run time, skipped: {', '.join(skipped)})\n")
    print("| sampler | steps | NFE | FID (digits) | KID | precision | recall | class accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res.records:
        m = r["metrics"]
        print(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {m['fid']:.3f} | {m['kid_mean']:.3f} | "
              f"{m['precision']:.3f} | {m['recall']:.3f} | {r['class_accuracy']:.3f} |")
    print(f"| real: half A vs half B of all 1,797 (n {len(half_a)} vs {len(half_b)}) | – | – | "
          f"{floor_halves['fid']:.3f} | {floor_halves['kid_mean']:.3f} | {floor_halves['precision']:.3f} | "
          f"{floor_halves['recall']:.3f} | – |")
    print(f"| real: held-out test split vs train reference (n 360 vs {ref.n}) | – | – | {floor_test['fid']:.3f} | "
          f"{floor_test['kid_mean']:.3f} | {floor_test['precision']:.3f} | {floor_test['recall']:.3f} | "
          f"{acc_test:.3f} |")
    print(f"\nSweep wall-clock (generation + evaluation, {len(res.records)} rows): {sweep_s:.0f} s. "
          f"Files: {', '.join(str(f) for f in res.files)}.\n")
    print(f"Time to evaluate {args.timing_n:,} samples, generation excluded (in memory, cached reference): "
          f"features {t_feat:.2f} s + FID/KID/IS/PR {t_met:.2f} s = **{t_feat + t_met:.2f} s** "
          f"(FID of those jittered real digits: {m10k['fid']:.3f}).")


if __name__ == "__main__":
    main()
