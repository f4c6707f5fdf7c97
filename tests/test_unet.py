"""The UNet's layout and precision paths: channels_last and CPU bf16 autocast change speed, not results."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffcli.nets import unet
from diffcli.nets.unet import UNet


def _net() -> UNet:
    torch.manual_seed(0)
    net = UNet(in_channels=1, out_channels=1, resolution=8, channels=16, channel_mult=[1, 2], num_res_blocks=1,
               attention_resolutions=[4], head_channels=8)
    for p in net.parameters():  # the zero-initialised output layers would hide every difference
        torch.nn.init.normal_(p, std=0.2)
    return net


def test_channels_last_forward_and_gradients_match_contiguous():
    net, x, t = _net(), torch.randn(4, 1, 8, 8), torch.rand(4) * 999
    ref = net(x, t)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net.to(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), t)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout carries through every block
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-4, msg=n)


def test_cpu_bf16_autocast_runs_attention_in_float32(monkeypatch):
    """torch's bf16 CPU attention backward is slower than the float32 one: when training under CPU autocast the
    attention inputs are float32 (forward-only calls keep bf16), and the output stays within bf16 rounding."""
    seen = []
    attention = unet.attention

    def spy(q, k, v):
        seen.append(q.dtype)
        return attention(q, k, v)

    monkeypatch.setattr(unet, "attention", spy)
    torch.manual_seed(0)
    blk = unet.AttentionBlock(32, 8)
    torch.nn.init.normal_(blk.proj.weight, std=0.2)
    x = torch.randn(2, 32, 4, 4)
    ref = blk(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = blk(x)  # training: the backward will run, float32 is the faster kernel
        with torch.no_grad():
            blk(x)  # forward only: bf16 is
    assert seen == [torch.float32, torch.float32, torch.bfloat16]
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    low.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in blk.parameters())


def test_upsample_conv_is_interpolate_then_conv_in_value_and_gradient():
    """The decoder's up-sampling convolution runs as one transposed convolution: the same function of the input
    and of the 3×3 weights (float64 round-off), for odd sizes and non-square images too, and in channels_last."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).double()
    for shape in [(2, 5, 4, 4), (1, 5, 3, 6), (3, 5, 1, 1)]:
        for fmt in (torch.contiguous_format, torch.channels_last):
            h = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
            ref = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            g_ref = torch.autograd.grad(ref.sin().sum(), [h, conv.weight, conv.bias])
            out = unet.upsample_conv(h, conv)
            assert out.shape == ref.shape == (shape[0], 7, 2 * shape[2], 2 * shape[3])
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
            for a, b in zip(torch.autograd.grad(out.sin().sum(), [h, conv.weight, conv.bias]), g_ref):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    conv, h = conv.float(), torch.randn(2, 5, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as train.bf16 = true: the output within bf16 rounding
        low = unet.upsample_conv(h, conv)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), conv(F.interpolate(h, scale_factor=2.0)), rtol=0.02, atol=0.02)
    low.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()


def test_up_resblock_matches_the_interpolating_form():
    """A whole up-sampling ResBlock (as checkpoints hold it) computes what upsample-then-conv computed."""
    torch.manual_seed(1)
    blk = unet.ResBlock(8, 8, 16, 0.0, "up").double()
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(2, 8, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    h = F.silu(blk.norm0(x))
    h = blk.conv0(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    scale, shift = blk.affine(emb)[:, :, None, None].chunk(2, dim=1)
    h = blk.conv1(F.silu(torch.addcmul(shift, blk.norm1(h), scale + 1)))
    ref = h + F.interpolate(x, scale_factor=2.0, mode="nearest")
    torch.testing.assert_close(blk(x, emb), ref, rtol=0, atol=1e-12)


def test_attention_routes_agree_with_torchs_kernel():
    """The CPU matmul route for short sequences and torch's fused kernel compute the same attention, values and
    gradients, on both sides of the length at which the route changes."""
    torch.manual_seed(2)
    for n in (16, unet._CPU_MATH_TOKENS, unet._CPU_MATH_TOKENS + 16):
        q, k, v = (torch.randn(3, 2, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = unet.attention(q, k, v)
        ref = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        g, g_ref = (torch.autograd.grad(o.sin().sum(), [q, k, v]) for o in (out, ref))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
