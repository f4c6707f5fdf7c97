"""Training and sampling throughput of diffcli's UNet vs diffusers' UNet2DModel at equal widths, depth and attention.

Each configuration runs in its own subprocess (so peak resident memory, ru_maxrss, is its own), the two
networks alternate round by round so that any load on the machine falls on both, and the median of the rounds
is reported. A training step is forward + backward + AdamW on a batch of noisy images (ε-MSE for both, the
loss's cost is negligible); a sampling step is one forward pass under no_grad.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/throughput.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {  # resolution: (widths, attention resolutions, layers per block)
    8: ((32, 64), (4,), 1),
    32: ((64, 128, 128), (16,), 2),
}


def build(kind: str, res: int):
    widths, attn, layers = CONFIGS[res]
    if kind == "diffcli":
        from diffcli.nets.unet import UNet

        return UNet(in_channels=3 if res == 32 else 1, out_channels=3 if res == 32 else 1, resolution=res,
                    channels=widths[0], channel_mult=[w // widths[0] for w in widths], num_res_blocks=layers,
                    attention_resolutions=attn, head_channels=32)
    from diffusers import UNet2DModel

    down, up, r = [], [], res
    for _ in widths:
        down.append("AttnDownBlock2D" if r in attn else "DownBlock2D")
        r //= 2
    up = [b.replace("Down", "Up") for b in reversed(down)]
    return UNet2DModel(sample_size=res, in_channels=3 if res == 32 else 1, out_channels=3 if res == 32 else 1,
                       layers_per_block=layers, block_out_channels=widths, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=8, attention_head_dim=32)


def measure(kind: str, res: int, batch: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build(kind, res)
    c = 3 if res == 32 else 1
    x = torch.randn(batch, c, res, res)
    t = torch.rand(batch) * 999
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def fwd(inp):
        out = net(inp, t) if kind == "diffcli" else net(inp, t).sample
        return out

    for _ in range(2):  # warm-up
        loss = (fwd(x) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = (fwd(x) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_ips = batch * steps / (time.perf_counter() - t0)
    with torch.no_grad():
        fwd(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            fwd(x)
        sample_ips = batch * steps / (time.perf_counter() - t0)
    return {"kind": kind, "res": res, "params": sum(p.numel() for p in net.parameters()),
            "train_images_per_s": train_ips, "sample_images_per_s": sample_ips,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--one", nargs=3, metavar=("KIND", "RES", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, res, batch = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure(kind, res, batch, args.steps, args.threads)))
        return
    results = {}
    for res, batch in ((8, 128), (32, 32)):
        for _ in range(args.rounds):
            for kind in ("diffcli", "diffusers"):
                out = subprocess.run([sys.executable, __file__, "--one", kind, str(res), str(batch), "--steps",
                                      str(args.steps), "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results.setdefault((res, kind), []).append(r)
    rows = []
    for res in (8, 32):
        med = {k: {m: statistics.median(r[m] for r in results[(res, k)])
                   for m in ("train_images_per_s", "sample_images_per_s", "peak_rss_mb")}
               for k in ("diffcli", "diffusers")}
        p = {k: results[(res, k)][0]["params"] for k in ("diffcli", "diffusers")}
        rows.append({"res": res, "params": p, **{k: med[k] for k in med},
                     "train_ratio": med["diffcli"]["train_images_per_s"] / med["diffusers"]["train_images_per_s"],
                     "sample_ratio": med["diffcli"]["sample_images_per_s"] / med["diffusers"]["sample_images_per_s"]})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
