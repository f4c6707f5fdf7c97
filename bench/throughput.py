"""Training and sampling throughput of diffcli's UNet vs diffusers' UNet2DModel at equal widths, depth and attention.

Throughput: all kinds live in one process and take one training step each in turn, round after round, so
that load from other processes on a shared machine falls on every kind alike, step by step; a ratio is the
median over rounds of the two step times measured back to back, and img/s is batch / median step time.
Memory: each kind runs a few steps in its own subprocess, whose peak resident memory (ru_maxrss) is its own
(`rss_after_imports_mb` is the same reading before the network is built). A training step is forward + backward + AdamW on a batch of noisy images (ε-MSE for
all, the loss's cost is negligible); a sampling step is one forward pass under no_grad.

Kinds: `diffcli` is the network as diffcli's training engine runs it: the optimizer it builds
(diffcli.train.make_optimizer: fused AdamW) and the memory layout `train.channels_last = "auto"` picks on this
device (diffcli.runtime.use_channels_last; the report records which); `diffusers` is UNet2DModel with
torch.optim.AdamW as diffusers' own training examples build it; `diffusers_fused` is UNet2DModel with diffcli's
optimizer, which isolates the networks from the optimizers; `diffusers_cl` is stock diffusers with
channels_last weights and input (what a diffusers user could do by hand), so the layout is not counted as
diffcli's alone.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/throughput.py --threads 2 --steps 20 --steps32 8 --out docs/bench/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {  # resolution: (widths, attention resolutions, layers per block)
    8: ((32, 64), (4,), 1),
    32: ((64, 128, 128), (16,), 2),
}


def build(kind: str, res: int, before: str | None = None):
    widths, attn, layers = CONFIGS[res]
    if kind == "diffcli_before":  # the UNet of an older checkout (--before), loaded from its file
        import importlib.util

        spec = importlib.util.spec_from_file_location("unet_before", f"{before}/diffcli/nets/unet.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.UNet(in_channels=3 if res == 32 else 1, out_channels=3 if res == 32 else 1, resolution=res,
                        channels=widths[0], channel_mult=[w // widths[0] for w in widths], num_res_blocks=layers,
                        attention_resolutions=attn, head_channels=32)
    if kind in ("diffcli", "diffcli_compile"):
        from diffcli.nets.unet import UNet

        return UNet(in_channels=3 if res == 32 else 1, out_channels=3 if res == 32 else 1, resolution=res,
                    channels=widths[0], channel_mult=[w // widths[0] for w in widths], num_res_blocks=layers,
                    attention_resolutions=attn, head_channels=32)
    from diffusers import UNet2DModel

    # ADM's layout in diffusers' own blocks: residual down/up-sampling blocks (avg-pool / nearest inside a
    # ResnetBlock2D, as ADM), scale-shift time conditioning, and a GroupNorm before the middle attention
    # (attn_norm_num_groups; diffusers drops it under scale_shift otherwise) — the parameter count is then
    # exactly diffcli's.
    down, r = [], res
    for _ in widths:
        down.append("AttnDownBlock2D" if r in attn else "ResnetDownsampleBlock2D")
        r //= 2
    up = ["AttnUpBlock2D" if b.startswith("Attn") else "ResnetUpsampleBlock2D" for b in reversed(down)]
    return UNet2DModel(sample_size=res, in_channels=3 if res == 32 else 1, out_channels=3 if res == 32 else 1,
                       layers_per_block=layers, block_out_channels=widths, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=8, attn_norm_num_groups=8, attention_head_dim=32,
                       downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift")


KINDS = ("diffcli", "diffusers", "diffusers_fused", "diffusers_cl")


def channels_last(kind: str, bf16: bool = False) -> bool:
    """The memory layout a kind trains in: diffcli's is what `diffcli train` picks on this CPU."""
    import torch

    if kind in ("diffcli", "diffcli_compile"):
        from diffcli.runtime import use_channels_last

        return use_channels_last("auto", torch.device("cpu"), bf16)
    return kind in ("diffusers_cl", "diffusers_compile_cl")


def layout(kind: str, net, x, bf16: bool = False):
    """(net, x) in the kind's memory layout."""
    import torch

    if channels_last(kind, bf16):
        return net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return net, x


def measure(kind: str, res: int, batch: int, steps: int, threads: int, bf16: bool = False) -> dict:
    import torch

    if kind != "diffcli":
        import diffusers  # noqa: F401  (imported before the baseline memory reading, like diffcli below)
    try:
        from diffcli.train import make_optimizer
    except ImportError:  # a diffcli from before make_optimizer (to measure an older checkout): plain AdamW
        def make_optimizer(params, lr):
            return torch.optim.AdamW(params, lr=lr)

    torch.set_num_threads(threads)
    rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    net = build(kind, res)
    c = 3 if res == 32 else 1
    net, x = layout(kind, net, torch.randn(batch, c, res, res), bf16)
    t = torch.rand(batch) * 999
    if kind in ("diffusers", "diffusers_cl"):  # diffusers' examples: torch.optim.AdamW(unet.parameters(), lr=..., betas=..., ...)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    else:
        opt = make_optimizer(net.parameters(), lr=1e-4)

    def fwd(inp):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as train.bf16 = true
            out = net(inp, t) if kind == "diffcli" else net(inp, t).sample
        return out.float()

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
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_imports_mb": rss_imports}


COMPILED = ("diffcli_compile", "diffusers_compile", "diffusers_compile_cl")


def interleave(res: int, batch: int, steps: int, threads: int, before: str | None, bf16: bool = False,
               compile_: bool = False) -> dict:
    """Every kind in one process, one training step (then one sampling step) of each in turn, `steps` rounds:
    load from other processes falls on all kinds alike, step by step. Per-step seconds of each kind.
    `compile_`: also the compiled kinds — diffcli as `train.compile = true` runs it (the forward under
    torch.compile, fused AdamW), stock diffusers with its forward compiled the same way (contiguous, and
    channels_last) — whose compile time goes into the warm-up round, reported apart."""
    import torch

    from diffcli.train import make_optimizer

    torch.set_num_threads(threads)
    kinds = KINDS + (("diffcli_before",) if before else ()) + (COMPILED if compile_ else ())
    c = 3 if res == 32 else 1
    x = torch.randn(batch, c, res, res, generator=torch.Generator().manual_seed(1))
    t = torch.rand(batch, generator=torch.Generator().manual_seed(2)) * 999
    nets, opts, xs = {}, {}, {}
    for kind in kinds:
        torch.manual_seed(0)
        nets[kind], xs[kind] = layout(kind, build(kind, res, before), x, bf16)
        plain = kind in ("diffusers", "diffusers_cl", "diffcli_before", "diffusers_compile",
                         "diffusers_compile_cl")  # stock torch.optim.AdamW
        opts[kind] = (torch.optim.AdamW(nets[kind].parameters(), lr=1e-4) if plain
                      else make_optimizer(nets[kind].parameters(), lr=1e-4))
        if kind in COMPILED:  # the forward only, as diffcli.train does for train.compile = true
            nets[kind].forward = torch.compile(nets[kind].forward)

    def fwd(kind):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as train.bf16 = true
            out = nets[kind](xs[kind], t)
        return (out if torch.is_tensor(out) else out.sample).float()

    def train_step(kind):
        loss = (fwd(kind) - xs[kind]).square().mean()
        opts[kind].zero_grad()
        loss.backward()
        opts[kind].step()

    train_s = {k: [] for k in kinds}
    sample_s = {k: [] for k in kinds}
    warmup_s = {}
    for r in range(steps + 1):  # a warm-up round (the compiled kinds compile there)
        for kind in kinds:
            t0 = time.perf_counter()
            train_step(kind)
            if r >= 1:
                train_s[kind].append(time.perf_counter() - t0)
            else:
                warmup_s[kind] = time.perf_counter() - t0
    with torch.no_grad():
        for r in range(steps + 1):
            for kind in kinds:
                t0 = time.perf_counter()
                fwd(kind)
                if r >= 1:
                    sample_s[kind].append(time.perf_counter() - t0)
    return {"train_s": train_s, "sample_s": sample_s, "warmup_s": warmup_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--steps32", type=int, default=None, help="steps at 32×32 (default: --steps)")
    ap.add_argument("--out", default=None, help="also write the table as JSON here")
    ap.add_argument("--bf16", action="store_true", help="every kind under bf16 autocast (as train.bf16 = true, "
                    "or accelerate's mixed_precision='bf16' in diffusers' training examples)")
    ap.add_argument("--before", default=None, help="also time the UNet of an older checkout in this folder "
                    "(e.g. git archive HEAD~1 diffcli | tar -x -C DIR), with stock AdamW as it had")
    ap.add_argument("--compile", action="store_true", help="also diffcli under train.compile = true and "
                    "diffusers with its forward compiled alike (interleaved; compile time reported apart)")
    ap.add_argument("--one", nargs=3, metavar=("KIND", "RES", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--interleave", nargs=2, metavar=("RES", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, res, batch = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure(kind, res, batch, args.steps, args.threads, args.bf16)))
        return
    if args.interleave:
        res, batch = int(args.interleave[0]), int(args.interleave[1])
        print(json.dumps(interleave(res, batch, args.steps, args.threads, args.before, args.bf16, args.compile)))
        return
    load, rows = [os.getloadavg()[0]], []
    for res, batch in ((8, 128), (32, 32)):
        steps = args.steps32 if res == 32 and args.steps32 else args.steps
        # throughput: all kinds interleaved step by step in one process
        cmd = [sys.executable, __file__, "--interleave", str(res), str(batch), "--steps", str(steps),
               "--threads", str(args.threads)] + (["--before", args.before] if args.before else []) + (
                   ["--bf16"] if args.bf16 else []) + (["--compile"] if args.compile else [])
        timing = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        load.append(os.getloadavg()[0])
        # memory: each kind in its own process (ru_maxrss is per process), a few steps
        mem = {}
        for kind in KINDS:
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(res), str(batch), "--steps", "1",
                                  "--threads", str(args.threads)] + (["--bf16"] if args.bf16 else []),
                                 capture_output=True, text=True, check=True).stdout
            mem[kind] = json.loads(out.strip().splitlines()[-1])
            load.append(os.getloadavg()[0])
        kinds = list(timing["train_s"])
        row = {"res": res, "batch": batch, "params": {k: mem[k]["params"] for k in KINDS}}
        for k in kinds:
            tr, sa = timing["train_s"][k], timing["sample_s"][k]
            row[k] = {"train_images_per_s": batch / statistics.median(tr),
                      "train_images_per_s_best": batch / min(tr),
                      "sample_images_per_s": batch / statistics.median(sa)}
            if k in mem:
                row[k].update(peak_rss_mb=mem[k]["peak_rss_mb"], rss_after_imports_mb=mem[k]["rss_after_imports_mb"])

        def ratio(a: str, b: str, what: str = "train_s") -> float:
            """Median over rounds of b's step time / a's step time, the two measured back to back."""
            return statistics.median(tb / ta for ta, tb in zip(timing[what][a], timing[what][b]))

        row["train_ratio"] = ratio("diffcli", "diffusers")
        row["train_ratio_same_optimizer"] = ratio("diffcli", "diffusers_fused")
        row["train_ratio_vs_diffusers_cl"] = ratio("diffcli", "diffusers_cl")
        row["sample_ratio"] = ratio("diffcli", "diffusers", "sample_s")
        if args.compile:
            row["compile_warmup_s"] = {k: round(timing["warmup_s"][k], 1) for k in COMPILED}
            row["train_ratio_compiled_vs_diffusers"] = ratio("diffcli_compile", "diffusers")
            row["train_ratio_compiled_vs_compiled_diffusers"] = ratio("diffcli_compile", "diffusers_compile")
            row["train_ratio_compiled_vs_compiled_diffusers_cl"] = ratio("diffcli_compile", "diffusers_compile_cl")
        if args.before:
            row["train_ratio_before"] = ratio("diffcli_before", "diffusers")
            row["train_speedup_vs_before"] = ratio("diffcli", "diffcli_before")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    import torch

    report = {"threads": args.threads, "steps": args.steps, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "diffcli_channels_last": channels_last("diffcli", args.bf16), "bf16": args.bf16,
              "steps32": args.steps32 or args.steps, "load_average_1min": {"min": min(load), "max": max(load)},
              "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
