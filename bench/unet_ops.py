"""The two UNet ops that diffcli computes in a cheaper form than the textbook one, timed against that form.

1. Up-sampling convolution: conv3×3(nearest_upsample_2×(h)) (diffusers' ResnetBlock2D(up=True) and ADM) against
   `diffcli.nets.unet.upsample_conv` (one stride-2 transposed convolution, 16 instead of 36 products per input
   pixel), at the shapes of the bench networks' decoders (bench/throughput.py): batch 32, 128 channels,
   8→16 and 16→32 for the 32×32 net; batch 128, 64 channels, 4→8 for the 8×8 digits net.
2. Attention softmax(q·kᵀ/√d)·v: torch's fused `scaled_dot_product_attention` against `diffcli.nets.unet.attention`
   (on the CPU, two matmuls and a softmax up to 128 tokens; the fused kernel above) at the bench networks'
   shapes (B, heads, tokens, d) and around the switch.

Forward + backward, median of `--repeats` runs after 3 warm-ups; both forms alternate call by call so load from
other processes falls on both alike; max |difference| of the outputs in float64 is printed as a check.

    .venv/bin/python bench/unet_ops.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diffcli.nets import unet


def _time_pair(f_ref, f_new, repeats: int) -> tuple[float, float]:
    """Median seconds of f_ref and f_new, called alternately."""
    for _ in range(3):
        f_ref()
        f_new()
    t_ref, t_new = [], []
    for _ in range(repeats):
        for f, ts in ((f_ref, t_ref), (f_new, t_new)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(t_ref), statistics.median(t_new)


def _fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out.square().sum(), inputs)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")

    print("\nup-sampling convolution, forward + backward (ms): interpolate + conv3x3 | transposed | speed-up | max|diff| f64")
    for b, c, n in ((32, 128, 16), (32, 128, 8), (128, 64, 4)):
        conv = torch.nn.Conv2d(c, c, 3, padding=1)
        h = torch.randn(b, c, n, n, requires_grad=True)
        w, bias = conv.weight, conv.bias

        def ref(h, w, bias):
            return F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), w, bias, padding=1)

        def new(h, w, bias):
            conv.weight, conv.bias = w, bias  # the same Parameters, passed through for the gradients
            return unet.upsample_conv(h, conv)

        t_ref, t_new = _time_pair(_fwd_bwd(ref, h, w, bias), _fwd_bwd(new, h, w, bias), args.repeats)
        conv64 = torch.nn.Conv2d(c, c, 3, padding=1).double()
        h64 = h.detach().double()
        diff = (conv64(F.interpolate(h64, scale_factor=2.0)) - unet.upsample_conv(h64, conv64)).abs().max().item()
        print(f"  ({b}, {c}, {n}x{n} -> {2 * n}x{2 * n}): {t_ref * 1e3:7.2f} | {t_new * 1e3:7.2f} | "
              f"{t_ref / t_new:.2f}x | {diff:.1e}")

    print("\nattention, forward + backward (ms): torch SDPA | diffcli attention | speed-up | max|diff| f64")
    for shape in ((128, 2, 16, 32), (32, 4, 64, 32), (32, 4, 128, 32), (32, 4, 256, 32)):
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        t_ref, t_new = _time_pair(_fwd_bwd(F.scaled_dot_product_attention, q, k, v),
                                  _fwd_bwd(unet.attention, q, k, v), args.repeats)
        q64, k64, v64 = (t.detach().double() for t in (q, k, v))
        diff = (F.scaled_dot_product_attention(q64, k64, v64) - unet.attention(q64, k64, v64)).abs().max().item()
        route = "matmuls" if shape[2] <= unet._CPU_MATH_TOKENS else "SDPA"
        print(f"  {shape} [{route}]: {t_ref * 1e3:7.2f} | {t_new * 1e3:7.2f} | {t_ref / t_new:.2f}x | {diff:.1e}")


if __name__ == "__main__":
    main()
