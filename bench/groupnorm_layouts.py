"""GroupNorm → SiLU, forward + backward, in each memory layout and precision (issue 8: why CPU bf16 training
stays contiguous). One 32×32 UNet activation (batch 32, 128 channels, 32 groups), one thread, median of 7.

    .venv/bin/python bench/groupnorm_layouts.py

Under CPU bf16 autocast oneDNN runs the convolutions in NHWC and converts a contiguous input to it and back
(the `aten::clone` under `mkldnn_convolution` in a profile); a channels_last network avoids those copies but
meets torch's NHWC bf16 GroupNorm kernel, which this script times against the others.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def time_gn(x: torch.Tensor, gn: torch.nn.GroupNorm, rounds: int = 7) -> float:
    x = x.detach().requires_grad_()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        F.silu(gn(x)).float().sum().backward()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    gn = torch.nn.GroupNorm(32, 128)
    x = torch.randn(32, 128, 32, 32)
    cl = torch.channels_last
    rows = [("float32", "NCHW", x), ("float32", "NHWC", x.contiguous(memory_format=cl)),
            ("bfloat16", "NCHW", x.bfloat16()), ("bfloat16", "NHWC", x.bfloat16().contiguous(memory_format=cl))]
    print("| precision | layout | GroupNorm→SiLU fwd+bwd ms |\n|---|---|---|")
    for prec, layout, xx in rows:
        print(f"| {prec} | {layout} | {time_gn(xx, gn):.1f} |")


if __name__ == "__main__":
    main()
