"""Probability-flow ODE inversion: encode images to latents and back, interpolate, and measure likelihood.

The probability-flow ODE (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 13) written
in the VE/EDM convention is dx/dσ = f(x, σ) = (x - D(x, σ))/σ (Karras et al. 2022, eq. 3). It is a bijection
between data (σ → 0) and noise (σ = σ_max); DDIM inversion (Song, Meng & Ermon 2021, Sec. 4.3) is its
Euler discretisation.

Where the path starts. Every diffcli sampler ends with the step σ_min → 0 that returns the denoised estimate
x0 = D(x, σ_min) (EDM's and k-diffusion's convention). The decoder is therefore

    x(σ_max) --ODE on [σ_max, σ_min]--> x(σ_min) --D(·, σ_min)--> x0,

and the encoder inverts both parts: it solves D(x, σ_min) = x0 for x(σ_min) by fixed-point iteration
x ← x - (D(x, σ_min) - x0) (a contraction: the map's Jacobian I - ∂D/∂x = σ_min²·∇² log p is tiny), then
integrates the ODE *forwards* from σ_min to σ_max with the chosen deterministic sampler run on the increasing
grid (same noise levels, reversed). Decoding runs the same sampler on the decreasing grid that ends in 0.
The round trip is then exact up to the solver's discretisation error — no σ_min offset is left over.

Likelihood (Song et al. 2021, App. D; Chen et al. 2018, instantaneous change of variables). Along the ODE
d/dσ log p_σ(x(σ)) = -∇·f, and ∇·f = tr(I - ∂D/∂x)/σ. So, on the same path as the encoder,

    log p_σmin(x(σ_min)) = log N(x(σ_max); 0, σ_max² I) + ∫_{σmin}^{σmax} tr(I - ∂D/∂x)/σ dσ,
    log p_0(x0)           = log p_σmin(x(σ_min)) - log |det ∂D/∂x (x(σ_min), σ_min)|      (x0 = D(x(σ_min))).

The integral is carried by the sampler itself, so it gets the solver's order and step control: the state is
augmented with K accumulators y_k = exp(ℓ_k / D), ℓ_k the running integral, and the field handed to the
sampler returns D_yk = y_k·(1 - q_k/D), q_k = v_kᵀ(I - ∂D/∂x)v_k, so that the sampler's own slope
(y - D_y)/σ = y·q/(D σ) is exactly dy/dσ. The exponential form matters: at large σ, q → D and y ∝ σ, which
every sampler integrates exactly (a plain accumulator dℓ/dσ = q/σ ∝ 1/σ had 3-4× the log-density error with
heun at 10-40 levels on the mixture oracle). The trace is exact (all D unit vectors,
`exact=True`) or Hutchinson's estimate with K Rademacher probes v_k held fixed along each path (Hutchinson
1989; Grathwohl et al. 2018), whose spread gives the standard error. The last-step log-determinant is the
exact slogdet with `exact=True`, and its first-order trace tr(∂D/∂x - I) with probes.

Dequantization (the convention used for bits/dim): uniform dequantization of 8-bit data as in Song et al.
2021 App. D / Theis et al. 2016. Pixel k ∈ {0..255} sits at x = k/127.5 - 1; we draw x̃ = x + (u - ½)·2/255,
u ~ U[0, 1)^D, a bin of width 2/255 centred on the training value, and report

    bits/dim = -log p(x̃) / (D ln 2) + log2(127.5),

the NLL of the dequantized pixels k + u - ½ in 8-bit units (an upper bound on the discrete NLL). Ho et al.'s
discretised Gaussian decoder is *not* used.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from .errors import UserError
from .generate import check_class_id, check_scale
from .guidance import Conditioned
from .recipes import MAX_STEPS
from .runtime import check_out_folder
from .samplers import SAMPLER_INFO, SAMPLERS, SCHEDULES, NFECounter, get_sigmas

LATENTS_KIND = "latents"
DEQUANT_LEVELS = 255  # 8-bit data: x = k/127.5 - 1, k = 0..255 → bin width 2/255
EXACT_DIVERGENCE_MAX_DIMS = 4096
MAX_PROBES = 1024  # --nll: every probe's noise is drawn at once, beside the images (SE ∝ 1/√probes long before)
MAX_FRAMES = 1024  # --interpolate: every frame's latent is held at once and drawn side by side in one strip
LOG2_BIN = math.log2(DEQUANT_LEVELS / 2)  # log2(127.5): [-1, 1] units → 8-bit pixel units


# --- the ODE grid -----------------------------------------------------------------------------------------
@dataclass
class ODESpec:
    """How the probability-flow ODE is discretised: a deterministic sampler on `steps` noise levels in
    [sigma_min, sigma_max] (decoding adds the final σ = 0), spaced by `schedule`."""

    solver: str = "heun"
    steps: int = 50
    schedule: str = "karras"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    options: dict = field(default_factory=dict)

    def grid(self, process=None) -> Tensor:
        """Decreasing noise levels σ_max … σ_min, 0: (steps + 1,) float64 (the decoder's grid)."""
        return get_sigmas(self.schedule, self.steps, self.sigma_min, self.sigma_max, rho=self.rho, process=process,
                          endpoint=True)  # the inversion starts exactly at σ_min

    def inversion_grid(self, process=None) -> Tensor:
        """Increasing σ_min … σ_max: the same levels, reversed, without the 0 (the encoder's grid)."""
        return self.grid(process)[:-1].flip(0)


def min_steps(solver: str) -> int:
    """Noise levels an inversion needs: two (one ODE step), or the sampler's own minimum."""
    return max(2, SAMPLER_INFO[solver].min_steps)


def accepts_option(solver: str, name: str) -> bool:
    params = inspect.signature(SAMPLERS[solver]).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_spec(spec: ODESpec, what: str = "--solver") -> None:
    """UserErrors for solvers and grids an inversion cannot use."""
    if spec.solver not in SAMPLER_INFO:
        raise UserError(f"{what} {spec.solver!r}: unknown; choose one of {', '.join(deterministic_solvers())}")
    if spec.solver not in deterministic_solvers():
        raise UserError(f"{what} {spec.solver!r}: not an invertible (deterministic) solver; choose one of "
                        f"{', '.join(deterministic_solvers())}")
    if spec.schedule not in SCHEDULES:
        raise UserError(f"--schedule {spec.schedule!r}: unknown; choose one of {', '.join(SCHEDULES)}")
    if spec.steps < min_steps(spec.solver):
        raise UserError(f"{spec.steps} noise levels: {spec.solver} inversion needs at least {min_steps(spec.solver)}")
    if not 0 < spec.sigma_min < spec.sigma_max:
        raise UserError(f"σ range [{spec.sigma_min}, {spec.sigma_max}]: need 0 < σ_min < σ_max")


def deterministic_solvers() -> list[str]:
    """Samplers that integrate the ODE on increasing grids too (the sampler registry's `invertible`)."""
    return [k for k, v in SAMPLER_INFO.items() if getattr(v, "invertible", not v.stochastic)]


def is_adaptive(solver: str) -> bool:
    return bool(getattr(SAMPLER_INFO[solver], "adaptive", False))


def steps_for_nfe(solver: str, nfe: int) -> int:
    """Noise levels whose *decoding* costs at most `nfe` denoiser calls; UserError when too few."""
    info = SAMPLER_INFO[solver]
    if is_adaptive(solver):
        raise UserError(f"--nfe {nfe}: {solver} is adaptive (its NFE follows from the tolerance); use --rtol")
    steps = info.steps_for_nfe(nfe)
    need = min_steps(solver)
    if steps < need:
        raise UserError(f"--nfe {nfe}: too small for {solver}; it needs at least {info.nfe(need)} "
                        f"({need} noise levels)")
    return steps


def default_schedule(solver: str, process=None) -> str:
    """The sampler's own default spacing; its "uniform" (the model's time) only where that time is a sensible
    grid (VP steps, flow's t), else Karras et al.'s ρ-schedule (as `diffcli sample` does)."""
    name = SAMPLER_INFO[solver].default_schedule
    if name == "uniform" and (process is None or process.name in ("edm", "ve")):
        return "karras"
    return name


def _process_of(denoiser):
    return getattr(denoiser, "process", None)


# --- encode / decode --------------------------------------------------------------------------------------
def _bind(denoiser, cond: Tensor | None, cfg: float) -> Callable[[Tensor, Tensor], Tensor]:
    return Conditioned(denoiser, cond, cfg)


@torch.no_grad()
def invert_final_step(field_fn, x0: Tensor, sigma_min: float, *, tol: float = 1e-6,
                      max_iter: int = 12) -> tuple[Tensor, int, float]:
    """Solve D(x, σ_min) = x0 for x (B, C, H, W) float64 by x ← x - (D(x) - x0).

    Returns (x, denoiser calls, final max residual). The iteration contracts with factor ‖I - ∂D/∂x‖, which
    is σ_min²·‖∇² log p_σmin‖ for an exact denoiser (module docstring)."""
    x0 = x0.to(torch.float64)
    x = x0.clone()
    s = torch.full((x.shape[0],), sigma_min, dtype=torch.float32, device=x.device)
    calls, res = 0, float("inf")
    for _ in range(max_iter):
        r = field_fn(x.to(torch.float32), s).to(torch.float64) - x0
        calls += 1
        res = float(r.abs().max()) if r.numel() else 0.0
        if res <= tol:
            break
        x = x - r
    return x, calls, res


@dataclass
class EncodeResult:
    latents: Tensor  # (B, C, H, W) float64: x(σ_max), i.e. σ_max·ε
    x_sigma_min: Tensor  # (B, C, H, W) float64: the ODE start x(σ_min)
    nfe: int  # denoiser calls per image, including the final-step inversion
    final_step_residual: float


def encode(denoiser, x0: Tensor, spec: ODESpec, *, cond: Tensor | None = None, cfg: float = 1.0) -> EncodeResult:
    """Images x0 (B, C, H, W) in [-1, 1] → latents x(σ_max) (B, C, H, W) float64 (module docstring)."""
    check_spec(spec)
    if is_adaptive(spec.solver) and len(x0) > 1:  # its steps follow what it integrates: one image at a time
        parts = [encode(denoiser, x0[i:i + 1], spec, cond=None if cond is None else cond[i:i + 1], cfg=cfg)
                 for i in range(len(x0))]
        return EncodeResult(torch.cat([p.latents for p in parts]), torch.cat([p.x_sigma_min for p in parts]),
                            max(p.nfe for p in parts), max(p.final_step_residual for p in parts))
    fn = NFECounter(_bind(denoiser, cond, cfg))
    x, calls, res = invert_final_step(fn, x0, spec.sigma_min)
    up = spec.inversion_grid(_process_of(denoiser)).to(x0.device)
    z = SAMPLERS[spec.solver](fn, x, up, **spec.options)
    return EncodeResult(z.to(torch.float64), x, fn.nfe, res)


def decode(denoiser, latents: Tensor, spec: ODESpec, *, cond: Tensor | None = None,
           cfg: float = 1.0) -> tuple[Tensor, int]:
    """Latents x(σ_max) (B, C, H, W) → images (B, C, H, W) float64 (unclamped), and the NFE per image."""
    check_spec(spec)
    if is_adaptive(spec.solver) and len(latents) > 1:  # as in `encode`: one image at a time
        parts = [decode(denoiser, latents[i:i + 1], spec, cond=None if cond is None else cond[i:i + 1], cfg=cfg)
                 for i in range(len(latents))]
        return torch.cat([p[0] for p in parts]), max(p[1] for p in parts)
    fn = NFECounter(_bind(denoiser, cond, cfg))
    grid = spec.grid(_process_of(denoiser)).to(latents.device)
    x0 = SAMPLERS[spec.solver](fn, latents.to(torch.float64), grid, **spec.options)
    return x0.to(torch.float64), fn.nfe


def slerp(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """Spherical interpolation between latents a, b (B, …) per row (Shoemake 1985; DDIM Sec. 5.4), falling back
    to linear interpolation when they are (nearly) parallel. t ∈ [0, 1]."""
    a64, b64 = a.to(torch.float64).flatten(1), b.to(torch.float64).flatten(1)
    t = torch.as_tensor(t, dtype=torch.float64, device=a.device).reshape(-1, 1)
    cos = (a64 * b64).sum(1, keepdim=True) / (a64.norm(dim=1, keepdim=True) * b64.norm(dim=1, keepdim=True))
    theta = cos.clamp(-1, 1).acos()
    sin = theta.sin()
    near = sin.abs() < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, 1 - t, ((1 - t) * theta).sin() / safe)
    wb = torch.where(near, t, (t * theta).sin() / safe)
    return (wa * a64 + wb * b64).reshape(-1, *a.shape[1:])


# --- likelihood -------------------------------------------------------------------------------------------
def jacobian_quadratic(denoiser, x: Tensor, sigma: Tensor, cond: Tensor | None, V: Tensor,
                       max_batch: int = 4096) -> tuple[Tensor, Tensor]:
    """D(x, σ) and the rows v_kᵀ·(∂D/∂x) for probes V (B, K, D): returns (D (B, C, H, W) float32,
    VJ (B, K, D) float64). Each image is replicated K times so one backward pass gives all K products."""
    b, k, d = V.shape
    outs, rows = [], []
    per = max(1, max_batch // k)
    for i in range(0, b, per):
        xi = x[i:i + per].to(torch.float32)
        n = xi.shape[0]
        with torch.enable_grad():
            xr = xi.detach().repeat_interleave(k, 0).requires_grad_(True)
            sr = sigma[i:i + per].to(torch.float32).repeat_interleave(k, 0)
            cr = None if cond is None else cond[i:i + per].repeat_interleave(k, 0)
            out = denoiser(xr, sr, cr)
            v = V[i:i + per].reshape(n * k, *x.shape[1:]).to(out.dtype)
            (g,) = torch.autograd.grad(out, xr, grad_outputs=v)
        outs.append(out.detach()[::k].to(torch.float32))
        rows.append(g.detach().to(torch.float64).reshape(n, k, d))
    return torch.cat(outs), torch.cat(rows)


class AugmentedField:
    """The field a sampler integrates for the likelihood: state [x (D) | y (K)] shaped (B, 1, 1, D+K), with
    y_k = exp(ℓ_k / D) the exponentiated running divergence integral per dimension (module docstring).

    Returns [D(x, σ) | y_k·(1 - v_kᵀ(I - ∂D/∂x)v_k / D)], so the sampler's slope (y - D_y)/σ is dy/dσ. With
    `exact` (probes None) the probes are the D unit vectors and one accumulator holds the full trace."""

    def __init__(self, denoiser, cond: Tensor | None, shape: Sequence[int], probes: Tensor | None) -> None:
        self.denoiser, self.cond, self.shape = denoiser, cond, tuple(shape)
        self.d = math.prod(self.shape)
        self.probes = probes  # (B, K, D) Rademacher, or None = exact

    @property
    def k(self) -> int:
        return 1 if self.probes is None else self.probes.shape[1]

    def quadratic(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(D(x, σ), q (B, K)) with q_k = v_kᵀ(I - ∂D/∂x)v_k (exact: q = tr(I - ∂D/∂x))."""
        b = x.shape[0]
        if self.probes is None:
            V = torch.eye(self.d, dtype=torch.float32, device=x.device).expand(b, self.d, self.d)
            den, J = jacobian_quadratic(self.denoiser, x, sigma, self.cond, V)
            q = (self.d - torch.diagonal(J, dim1=1, dim2=2).sum(1)).reshape(b, 1)
        else:
            V = self.probes.to(x.device)
            den, VJ = jacobian_quadratic(self.denoiser, x, sigma, self.cond, V)
            v64 = V.to(torch.float64)
            q = (v64 * v64).sum(2) - (VJ * v64).sum(2)
        return den, q

    def __call__(self, y: Tensor, sigma: Tensor, *args, **kw) -> Tensor:
        b = y.shape[0]
        flat = y.reshape(b, -1)
        x = flat[:, :self.d].reshape(b, *self.shape)
        ell = flat[:, self.d:].to(torch.float64)
        sigma = sigma.reshape(-1).expand(b)
        den, q = self.quadratic(x, sigma)
        out = torch.cat([den.reshape(b, -1).to(torch.float64), ell * (1 - q / self.d)], dim=1)
        return out.reshape(y.shape)


def rademacher(b: int, k: int, d: int, generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """(b, k, d) float32 ±1 probes; row i from generators[i] when given (per-image seeding)."""
    if generators is None:
        return torch.randint(0, 2, (b, k, d)).float() * 2 - 1
    return torch.stack([torch.randint(0, 2, (k, d), generator=g).float() * 2 - 1 for g in generators])


@dataclass
class Likelihood:
    """log-densities in nats, per image (B,). With K probes, `per_probe` (B, K) holds each probe's estimate
    and `se` its standard error over probes (NaN for K = 1; 0 for the exact divergence)."""

    log_prob: Tensor  # log p_0(x0): the model density of the data point (B,)
    log_prob_sigma_min: Tensor  # log p_σmin(x(σ_min)) (B,)
    per_probe: Tensor  # (B, K) estimates of log p_0
    se: Tensor  # (B,)
    latents: Tensor  # (B, C, H, W)
    nfe: int
    exact: bool


def gaussian_log_prob(z: Tensor, sigma: float) -> Tensor:
    """log N(z; 0, σ² I) per row (B,) in float64."""
    z = z.to(torch.float64).flatten(1)
    d = z.shape[1]
    return -0.5 * (z**2).sum(1) / sigma**2 - 0.5 * d * math.log(2 * math.pi * sigma**2)


@torch.no_grad()
def log_likelihood(denoiser, x0: Tensor, spec: ODESpec, *, cond: Tensor | None = None, probes: int = 4,
                   exact: bool = False, generators: Sequence[torch.Generator] | None = None) -> Likelihood:
    """Model log-density of x0 (B, C, H, W) through the probability-flow ODE (module docstring)."""
    check_spec(spec)
    b, shape = x0.shape[0], tuple(x0.shape[1:])
    if is_adaptive(spec.solver) and b > 1:  # as in `encode`: the step sizes follow one image, not the batch
        parts = [log_likelihood(denoiser, x0[i:i + 1], spec, cond=None if cond is None else cond[i:i + 1],
                                probes=probes, exact=exact, generators=None if generators is None else [generators[i]])
                 for i in range(b)]
        return Likelihood(*(torch.cat([getattr(p, f) for p in parts]) for f in
                            ("log_prob", "log_prob_sigma_min", "per_probe", "se", "latents")),
                          max(p.nfe for p in parts), exact)
    d = math.prod(shape)
    fn = NFECounter(_bind(denoiser, cond, 1.0))
    x, calls, _ = invert_final_step(fn, x0, spec.sigma_min)
    V = None if exact else rademacher(b, probes, d, generators).to(x0.device)
    field_fn = AugmentedField(denoiser, cond, shape, V)
    k = field_fn.k
    # the last step x0 = D(x(σ_min)): its log|det ∂D/∂x|
    s_min = torch.full((b,), spec.sigma_min, dtype=torch.float32, device=x0.device)
    if exact:
        E = torch.eye(d, dtype=torch.float32, device=x0.device).expand(b, d, d)
        _, J = jacobian_quadratic(denoiser, x, s_min, cond, E)
        logdet = torch.linalg.slogdet(J.to(torch.float64))[1].reshape(b, 1)
    else:
        _, q = field_fn.quadratic(x, s_min)
        logdet = -q  # tr(∂D/∂x - I), first order
    calls += 1
    y = torch.cat([x.reshape(b, -1), x.new_ones(b, k)], dim=1).reshape(b, 1, 1, d + k)
    counter = NFECounter(field_fn)
    up = spec.inversion_grid(_process_of(denoiser)).to(x0.device)
    yT = SAMPLERS[spec.solver](counter, y, up, **spec.options).to(torch.float64).reshape(b, -1)
    if not bool((yT[:, d:] > 0).all() and torch.isfinite(yT).all()):
        from .errors import RunFailure

        raise RunFailure(f"the likelihood integration with {spec.solver} on {spec.steps} noise levels diverged; "
                         f"raise --nfe (or use --rtol with rk45)")
    z = yT[:, :d].reshape(b, *shape)
    integral = yT[:, d:].log() * d  # (B, K) ∫ ∇·f dσ
    lp_min = gaussian_log_prob(z, spec.sigma_max)[:, None] + integral
    per_probe = lp_min - logdet
    lp = per_probe.mean(1)
    if exact:
        se = torch.zeros(b, dtype=torch.float64)
    elif k > 1:
        se = per_probe.std(1) / math.sqrt(k)
    else:
        se = torch.full((b,), float("nan"), dtype=torch.float64)
    return Likelihood(lp, lp_min.mean(1), per_probe, se, z, calls + counter.nfe, exact)


def dequantize(x: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Uniform dequantization of 8-bit data in [-1, 1]: x + (u - ½)·2/255, u ~ U[0, 1)^D (module docstring)."""
    if generators is None:
        u = torch.rand(x.shape, dtype=torch.float64)
    else:
        u = torch.stack([torch.rand(x.shape[1:], generator=g, dtype=torch.float64) for g in generators])
    return x.to(torch.float64) + (u.to(x.device) - 0.5) * (2 / DEQUANT_LEVELS)


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """bits/dim of dequantized 8-bit data from log p(x̃) in [-1, 1] units (module docstring)."""
    return -log_prob / (dims * math.log(2)) + LOG2_BIN


# --- metrics ----------------------------------------------------------------------------------------------
def psnr(mse: float) -> float | None:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2, the same as [0, 1] images with MSE/4); None if exact."""
    return None if mse <= 0 else 10 * math.log10(4.0 / mse)


def reconstruction_errors(x: Tensor, y: Tensor) -> dict:
    """Per-image and overall errors between inputs x and reconstructions y (B, C, H, W)."""
    diff = (y.to(torch.float64) - x.to(torch.float64)).flatten(1)
    mse = diff.square().mean(1)
    per = [{"psnr_db": psnr(float(m)), "rms_error": math.sqrt(float(m)), "max_abs_error": float(a)}
           for m, a in zip(mse, diff.abs().amax(1))]
    overall_mse = float(mse.mean()) if len(mse) else 0.0
    return {"images": per, "overall": {
        "psnr_db": psnr(overall_mse), "rms_error": math.sqrt(overall_mse),
        "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
        "mean_psnr_db": (sum(p["psnr_db"] for p in per if p["psnr_db"] is not None) / len(per)) if per else None,
    }}


# --- the `diffcli encode` engine --------------------------------------------------------------------------
@dataclass
class EncodeSettings:
    """Everything `diffcli encode` was asked to do (recorded in encode.json and the latents' metadata)."""

    solver: str | None = None  # None: DEFAULT_SOLVER (encode) or the latents file's solver (decode)
    nfe: int | None = None  # decoding budget per image; encoding costs about the same
    rtol: float | None = None  # adaptive solvers only
    schedule: str | None = None
    rho: float = 7.0
    class_id: int | None = None
    cfg: float = 1.0
    nll: bool = False
    probes: int = 4
    exact_divergence: bool = False
    interpolate: bool = False
    frames: int = 8
    seed: int = 0
    batch_size: int = 64


# DPM-Solver++(2M): the steadiest round trip across models. UniPC's higher orders win at coarse grids on one
# digits model but extrapolate badly over the growing steps of an inversion on others (round trip −7.6 dB at
# NFE 30 on a 16×16 RGB model, where dpmpp_2m gave 49 dB; non-monotone in NFE on a digits model), and at the
# default NFE 100 dpmpp_2m was ahead on all three models measured (docs/BENCHMARKS.md, "encode").
DEFAULT_SOLVER = "dpmpp_2m"
# a round trip below this PSNR is no inversion a user can build on (8-bit images: ≥ 48 dB is exact to the grey level)
POOR_ROUND_TRIP_DB = 20.0
DEFAULT_NFE = 100


def _log_default(*a, **k) -> None:
    pass


def resolve_spec(s: EncodeSettings, denoiser, base: ODESpec | None = None) -> ODESpec:
    """The ODESpec of a run: --solver/--nfe/--rtol/--schedule over `base` (a latents file's) or the defaults."""
    solver = s.solver or (base.solver if base else DEFAULT_SOLVER)
    what = "--solver" if s.solver or base is None else "the latents' solver (give --solver to decode with another)"
    if solver not in SAMPLER_INFO:
        raise UserError(f"{what} {solver!r}: unknown; choose one of {', '.join(deterministic_solvers())}")
    if solver not in deterministic_solvers():
        raise UserError(f"{what} {solver!r}: not an invertible solver; choose one of "
                        f"{', '.join(deterministic_solvers())}")
    if s.nfe is not None and s.rtol is not None:
        raise UserError("give --nfe or --rtol, not both")
    options = dict(base.options) if base and solver == base.solver else {}
    if s.rtol is not None:
        if not 0 < s.rtol < 1:
            raise UserError(f"--rtol {s.rtol}: must be in (0, 1)")
        if not accepts_option(solver, "rtol"):
            raise UserError(f"--rtol {s.rtol}: solver {solver!r} takes fixed steps; use --nfe (adaptive solvers: "
                            f"{', '.join(n for n in deterministic_solvers() if accepts_option(n, 'rtol')) or 'none'})")
        options["rtol"] = s.rtol
    if s.nfe is not None:
        if not 1 <= s.nfe <= MAX_STEPS:  # finding the levels for a budget counts up to it: 10^11 would not return
            raise UserError(f"--nfe {s.nfe}: must be in [1, {MAX_STEPS}]")
        steps = steps_for_nfe(solver, s.nfe)
    elif base is not None and solver == base.solver:
        steps = base.steps
    elif is_adaptive(solver):
        steps = min_steps(solver)  # an adaptive solver uses only the grid's ends
    else:
        steps = steps_for_nfe(solver, DEFAULT_NFE)
    schedule = s.schedule or (base.schedule if base and solver == base.solver
                              else default_schedule(solver, _process_of(denoiser)))
    if schedule not in SCHEDULES:
        raise UserError(f"--schedule {schedule!r}: unknown; choose one of {', '.join(SCHEDULES)}")
    spec = ODESpec(solver=solver, steps=steps, schedule=schedule,
                   sigma_min=base.sigma_min if base else float(denoiser.sigma_min),
                   sigma_max=base.sigma_max if base else float(denoiser.sigma_max),
                   rho=base.rho if base else s.rho, options=options)
    check_spec(spec)
    return spec


def validate_settings(s: EncodeSettings, num_classes: int, mode: str) -> list[str]:
    """UserErrors for bad options; returns the warnings to show (and record)."""
    warnings = []
    if s.batch_size < 1:
        raise UserError(f"--batch-size {s.batch_size}: must be ≥ 1")
    if s.seed < 0:
        raise UserError(f"--seed {s.seed}: must be ≥ 0")
    check_class_id(s.class_id, num_classes)
    check_scale("--cfg", s.cfg)
    if s.cfg != 1.0:
        if num_classes == 0:
            raise UserError(f"--cfg {s.cfg}: the model is unconditional (no classes); guidance needs a "
                            f"class-conditional model")
        if s.class_id is None and mode != "decode":
            raise UserError(f"--cfg {s.cfg}: guidance needs a label; pass --class")
        if s.nll:
            raise UserError(f"--cfg {s.cfg}: the guided field is not the probability flow of any density, so "
                            f"--nll is undefined; use --cfg 1")
        warnings.append(f"--cfg {s.cfg} ≠ 1 breaks exact invertibility: the guided field is not the probability-"
                        f"flow ODE of the model, latents are not N(0, σ_max² I) and reconstructions degrade")
    if not 2 <= s.frames <= MAX_FRAMES:
        raise UserError(f"--frames {s.frames}: must be in [2, {MAX_FRAMES}]")
    if not 1 <= s.probes <= MAX_PROBES:
        raise UserError(f"--probes {s.probes}: must be in [1, {MAX_PROBES}]")
    if s.exact_divergence and not s.nll:
        raise UserError("--exact-divergence needs --nll")
    if s.nll and mode != "encode":
        raise UserError(f"--nll measures the likelihood of input images; it does not combine with --{mode}")
    return warnings


def collect_inputs(inputs: Sequence[Path], out: Path | None = None) -> list[Path]:
    """Image files and the images inside folders (recursively, sorted), in the order given; a diffcli sample
    or decode folder gives its images/ (not its grid), and an encode folder, which keeps no images, is refused.
    When this run's `out` lies below an input folder, the files in `out` are not inputs: they are an earlier
    run's outputs."""
    from .data import diffcli_output_images, list_images

    files: list[Path] = []
    for p in inputs:
        p = Path(p)
        if not p.exists():
            raise UserError(f"input {str(p)!r} does not exist")
        if p.is_dir():
            if (p / "encode.json").is_file() and diffcli_output_images(p) is None:
                raise UserError(f"input {str(p)!r} is a diffcli encode folder: it keeps latents and a "
                                f"reconstruction strip, not images; give the images that were encoded, or decode "
                                f"its latents.safetensors with --decode")
            found = list_images(diffcli_output_images(p) or p)
            skip = Path(out).resolve() if out is not None else None
            if skip is not None and skip != p.resolve() and skip.is_relative_to(p.resolve()):
                found = [f for f in found if not f.resolve().is_relative_to(skip)]
            if not found:
                raise UserError(f"input folder {str(p)!r} holds no images")
            files.extend(found)
        else:
            files.append(p)
    return files


def load_images(files: Sequence[Path], channels: int, resolution: int, log=_log_default,
                warnings: list[str] | None = None) -> Tensor:
    """(N, C, H, W) float32 in [-1, 1]; images of another size are centre-cropped and resized, with a note
    (also appended to `warnings`, which encode.json records: the PSNR is then against the resized input)."""
    from .data import read_image

    imgs, resized = [], []
    for f in files:
        img = read_image(f, channels, None)
        if tuple(img.shape[1:]) != (resolution, resolution):
            resized.append(f"{f.name} ({img.shape[2]}×{img.shape[1]})")
            img = read_image(f, channels, resolution)
        imgs.append(img)
    if resized:
        more = f" (+{len(resized) - 3} more)" if len(resized) > 3 else ""
        note = (f"{len(resized)} image(s) centre-cropped and resized to the model's {resolution}×{resolution}: "
                f"{', '.join(resized[:3])}{more}")
        log(f"note: {note}")
        if warnings is not None:
            warnings.append(note)
    return torch.stack(imgs)


def _latent_view(z: Tensor, sigma_max: float) -> Tensor:
    """Latents shown as images: ε = z/σ_max at half scale (±2 standard deviations fill [-1, 1])."""
    return (z.to(torch.float32) / sigma_max * 0.5).clamp(-1, 1)


def _labels(s: EncodeSettings, n: int, device) -> Tensor | None:
    return None if s.class_id is None else torch.full((n,), s.class_id, dtype=torch.long, device=device)


def _image_generator(seed: int, index: int) -> torch.Generator:
    """Dequantization noise and probes of image `index`: they depend only on (seed, index)."""
    from .runtime import mix_seed

    return torch.Generator().manual_seed(mix_seed(seed, index, 0x4E4C))


def _spec_meta(spec: ODESpec) -> dict[str, str]:
    return {"solver": spec.solver, "steps": str(spec.steps), "schedule": spec.schedule, "rho": repr(spec.rho),
            "sigma_min": repr(spec.sigma_min), "sigma_max": repr(spec.sigma_max),
            "options": json.dumps(spec.options)}


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _student_warnings(ck) -> list[str]:
    """Progressive and consistency students are trained for their own few σ levels (or as a consistency
    function), not as a denoiser along the whole ODE: an inversion with them runs, but means little."""
    method = ck.meta.get("distill_method")
    if method not in ("progressive", "consistency"):
        return []
    return [f"{ck.path} is a {method} student made to sample in {ck.meta.get('student_steps', '?')} step(s), not a "
            f"denoiser along the whole ODE: its latents, round trip and bits/dim describe that student; encode "
            f"with its teacher for an ODE inversion"]


def _prepare_out(out: Path, force: bool, inputs: Sequence[Path], decoding: bool) -> None:
    from .images import check_images_replaceable, check_inputs_survive

    check_out_folder(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {str(out)!r} is not empty; choose another folder or pass --force to overwrite")
    if decoding:
        check_images_replaceable(out)
        check_inputs_survive(out, DECODE_CLEARS, inputs)
    else:
        check_inputs_survive(out, ENCODE_OUTPUTS, inputs, ENCODE_IMAGE_RECORDS)
    # the folder itself is made when the results are written: a failure or Ctrl-C before leaves nothing behind


def _record_base(ck, spec: ODESpec, s: EncodeSettings, device, mode: str) -> dict:
    from . import __version__
    from .checkpoint import file_hash

    return {"diffcli_version": __version__, "mode": mode, "checkpoint": str(ck.path),
            "checkpoint_sha256": file_hash(ck.path), "checkpoint_step": ck.step, "device": str(device),
            "solver": spec.solver, "schedule": spec.schedule, "rho": spec.rho, "noise_levels": spec.steps,
            "sigma_min": spec.sigma_min, "sigma_max": spec.sigma_max, "options": spec.options, "cfg": s.cfg,
            "class": s.class_id, "seed": s.seed,
            "sigmas": [float(v) for v in spec.grid(_process_of(ck.denoiser))]}


# every file `diffcli encode` writes in --out (besides images/NNNNNN.png), in any of its modes
ENCODE_OUTPUTS = ("latents.safetensors", "encode.json", "reconstruction.png", "interpolation.png", "decoded.png",
                  "decode.json")
# decode writes images/ as a sample does: a sample folder's record and grid go with the images it replaces
DECODE_CLEARS = ENCODE_OUTPUTS + ("sample.json", "grid.png")
ENCODE_IMAGE_RECORDS = ("decode.json",)  # encode writes no images: it removes a decode's, never a sample's


def run_encode(ck, inputs: Sequence[Path], out: Path, s: EncodeSettings, *, device: torch.device,
               force: bool = False, log=_log_default) -> dict:
    """`diffcli encode CKPT INPUTS… --out DIR [--interpolate] [--nll]`: writes DIR/latents.safetensors,
    DIR/encode.json, DIR/reconstruction.png (input | latent | reconstruction) and, with --interpolate,
    DIR/interpolation.png. Returns the encode.json record."""
    from .checkpoint import atomic_write_text, save_safetensors
    from .images import clear_outputs, save_grid

    mode = "interpolate" if s.interpolate else "encode"
    den = ck.denoiser
    warnings = validate_settings(s, den.num_classes, mode) + _student_warnings(ck)
    spec = resolve_spec(s, den)
    if s.exact_divergence:
        d = ck.channels * ck.resolution**2
        if d > EXACT_DIVERGENCE_MAX_DIMS:
            raise UserError(f"--exact-divergence: images have {d} dimensions; the exact trace costs one backward "
                            f"pass per dimension and is allowed up to {EXACT_DIVERGENCE_MAX_DIMS}; use --probes")
    if not inputs:
        raise UserError("encode needs INPUTS (image files or folders), or --decode LATENTS.safetensors")
    files = collect_inputs(inputs, out)
    if s.interpolate and len(files) != 2:
        raise UserError(f"--interpolate needs exactly two input images, got {len(files)}")
    resized: list[str] = []  # the resize note, recorded beside the option warnings
    x_all = load_images(files, ck.channels, ck.resolution, log, resized)
    _prepare_out(out, force, files, decoding=False)
    for w in warnings:
        log(f"warning: {w}")
    t0 = time.perf_counter()
    zs, recs, res, nfe_enc, nfe_dec = [], [], 0.0, 0, 0
    for b0 in range(0, len(files), s.batch_size):
        x = x_all[b0:b0 + s.batch_size].to(device)
        cond = _labels(s, len(x), device)
        e = encode(den, x, spec, cond=cond, cfg=s.cfg)
        y, nfe = decode(den, e.latents, spec, cond=cond, cfg=s.cfg)
        zs.append(e.latents.cpu())
        recs.append(y.cpu())
        # the most calls any batch took (an adaptive solver's count varies by image)
        res, nfe_enc, nfe_dec = max(res, e.final_step_residual), max(nfe_enc, e.nfe), max(nfe_dec, nfe)
    z, y = torch.cat(zs), torch.cat(recs)
    errs = reconstruction_errors(x_all, y)
    record = _record_base(ck, spec, s, device, mode)
    eps = z.flatten(1) / spec.sigma_max
    spread = float(eps.std()) if eps.numel() > 1 else 0.0
    db = errs["overall"]["psnr_db"]
    if not math.isfinite(spread) or spread > 3:  # x(σ_max) = x0 + σ_max·ε has std ≈ σ_max: ε std ≈ 1
        warnings.append(f"the inversion diverged: latents have std {spread:.3g}·σ_max (≈ 1 expected; round-trip "
                        f"PSNR {'∞' if db is None else f'{db:.1f}'} dB); raise --nfe or use another --solver")
        log(f"warning: {warnings[-1]}")
    elif db is not None and db < POOR_ROUND_TRIP_DB:  # latents of a normal spread can still be far off
        warnings.append(f"round-trip PSNR {db:.1f} dB (< {POOR_ROUND_TRIP_DB:g}): the inversion with {spec.solver} "
                        f"on {spec.steps} noise levels is inaccurate; raise --nfe or use another --solver")
        log(f"warning: {warnings[-1]}")
    record.update({"nfe_encode": nfe_enc, "nfe_decode": nfe_dec, "final_step_residual": res,
                   "warnings": warnings + resized, "overall": errs["overall"],
                   "latent_stats": {"mean": float(eps.mean()), "std": float(eps.std()) if eps.numel() > 1 else None}})
    images = []
    for i, (f, e_i) in enumerate(zip(files, errs["images"])):
        images.append({"index": i, "source": str(f), "label": s.class_id, **e_i,
                       "latent_mean": float(eps[i].mean()), "latent_std": float(eps[i].std())})
    if s.nll:
        record["nll"] = _nll(den, x_all, spec, s, device, images, log)
    record["images"] = images
    meta = {"format": "1", "kind": LATENTS_KIND, "checkpoint_sha256": record["checkpoint_sha256"],
            "checkpoint": str(ck.path), **_spec_meta(spec), "nfe_encode": str(nfe_enc), "nfe_decode": str(nfe_dec),
            "cfg": repr(s.cfg), "channels": str(ck.channels), "resolution": str(ck.resolution),
            "sources": json.dumps([str(f) for f in files])}
    labels = torch.full((len(files),), -1 if s.class_id is None else s.class_id, dtype=torch.long)
    out.mkdir(parents=True, exist_ok=True)
    # an earlier encode/decode run's files (--force): never mix two runs; encode writes no images, so it removes
    # a decode's but leaves a sample folder's
    clear_outputs(out, ENCODE_OUTPUTS, ENCODE_IMAGE_RECORDS)
    save_safetensors(out / "latents.safetensors", {"latents": z, "labels": labels}, meta)
    rows = torch.stack([x_all.float(), _latent_view(z, spec.sigma_max), y.float().clamp(-1, 1)], 1)
    save_grid(out / "reconstruction.png", rows[:64].flatten(0, 1), nrow=3)
    if s.interpolate:
        record["interpolation"] = _interpolate(den, z, spec, s, device, out)
    record["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(out / "encode.json", json.dumps(record, indent=2, default=_finite))
    return record


def _nll(den, x_all: Tensor, spec: ODESpec, s: EncodeSettings, device, images: list[dict], log) -> dict:
    """bits/dim of every input (dequantized, module docstring), its SE over probes and over images."""
    d = x_all[0].numel()
    bpd, probe_se, nfe = [], [], 0
    for b0 in range(0, len(x_all), s.batch_size):
        x = x_all[b0:b0 + s.batch_size]
        gens = [_image_generator(s.seed, i) for i in range(b0, b0 + len(x))]
        xq = dequantize(x, gens).to(device)
        L = log_likelihood(den, xq, spec, cond=_labels(s, len(x), device), probes=s.probes,
                           exact=s.exact_divergence, generators=gens)
        bpd.append(bits_per_dim(L.log_prob, d).cpu())
        probe_se.append((L.se / (d * math.log(2))).cpu())
        nfe = max(nfe, L.nfe)
    bpd_t, se_t = torch.cat(bpd), torch.cat(probe_se)
    for im, v, e in zip(images, bpd_t.tolist(), se_t.tolist()):
        im["bits_per_dim"], im["bits_per_dim_probe_se"] = v, _finite(e)
    n = len(bpd_t)
    return {
        "bits_per_dim": float(bpd_t.mean()),
        "se": float(bpd_t.std() / math.sqrt(n)) if n > 1 else None,
        "se_meaning": "standard error of the mean over images" + (" (the divergence is exact: no probes)"
                                                                   if s.exact_divergence
                                                                   else " (includes the probes' variance)"),
        "divergence": "exact" if s.exact_divergence else f"hutchinson, {s.probes} Rademacher probe(s) per image",
        "dequantization": "uniform: x + (u - 1/2)*2/255, u ~ U[0,1)^D; bits/dim = -log p(x~)/(D ln 2) + log2(127.5)",
        "nfe": nfe, "dims": d,
    }


def _interpolate(den, z: Tensor, spec: ODESpec, s: EncodeSettings, device, out: Path) -> dict:
    from .images import save_grid

    t = torch.linspace(0, 1, s.frames, dtype=torch.float64)
    frames = slerp(z[:1].expand(s.frames, *z.shape[1:]), z[1:2].expand(s.frames, *z.shape[1:]), t)
    imgs, nfe = [], 0
    for b0 in range(0, s.frames, s.batch_size):
        zb = frames[b0:b0 + s.batch_size].to(device)
        y, n = decode(den, zb, spec, cond=_labels(s, len(zb), device), cfg=s.cfg)
        imgs.append(y.cpu())
        nfe = max(nfe, n)
    strip = torch.cat(imgs).float().clamp(-1, 1)
    save_grid(out / "interpolation.png", strip, nrow=s.frames)
    return {"frames": s.frames, "t": t.tolist(), "method": "slerp", "nfe_per_frame": nfe,
            "file": str(out / "interpolation.png")}


def read_latents(path: Path, ck) -> tuple[Tensor, Tensor | None, ODESpec, dict[str, str]]:
    """A latents file written by `diffcli encode`, checked against the checkpoint it must be decoded with."""
    from .checkpoint import file_hash, read_safetensors

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--decode {str(path)!r}: no such file")
    tensors, meta = read_safetensors(path)
    if meta.get("kind") != LATENTS_KIND:
        raise UserError(f"--decode {str(path)!r}: not a diffcli latents file (kind = {meta.get('kind')!r})")
    want = file_hash(ck.path)
    if meta.get("checkpoint_sha256") != want:
        raise UserError(f"--decode {str(path)!r}: encoded with checkpoint sha256 {meta.get('checkpoint_sha256')}, "
                        f"but {str(ck.path)!r} has {want}; decode with the checkpoint that encoded it")
    z = tensors.get("latents")
    shape = (ck.channels, ck.resolution, ck.resolution)
    if z is None:
        raise UserError(f"--decode {str(path)!r}: holds no tensor 'latents' (it has {sorted(tensors) or 'none'})")
    if z.ndim != 4 or tuple(z.shape[1:]) != shape:
        raise UserError(f"--decode {str(path)!r}: tensor 'latents' has shape "
                        f"{tuple(z.shape)}, expected (N, {', '.join(map(str, shape))})")
    if not torch.isfinite(z).all():
        raise UserError(f"--decode {str(path)!r}: tensor 'latents' has non-finite values")
    labels = tensors.get("labels")
    if labels is not None:  # (N,) int64: a class, or -1 for none (what encode writes)
        if labels.shape != (len(z),) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise UserError(f"--decode {str(path)!r}: tensor 'labels' is {labels.dtype} of shape {tuple(labels.shape)}, "
                            f"expected {len(z)} integer labels, one per latent")
        nc = ck.denoiser.num_classes
        bad = labels[(labels < -1) | (labels >= nc)] if nc else labels[labels != -1]
        if len(bad):
            raise UserError(f"--decode {str(path)!r}: tensor 'labels' holds {int(bad[0])}; "
                            + (f"{str(ck.path)!r} has classes 0–{nc - 1} (-1: none)" if nc else
                               f"{str(ck.path)!r} is unconditional (-1: none)"))
    if meta.get("solver") not in SAMPLER_INFO:
        raise UserError(f"--decode {str(path)!r}: metadata solver = {meta.get('solver')!r} is not a diffcli solver")
    try:
        spec = ODESpec(solver=meta["solver"], steps=int(meta["steps"]), schedule=meta["schedule"],
                       sigma_min=float(meta["sigma_min"]), sigma_max=float(meta["sigma_max"]),
                       rho=float(meta.get("rho", "7.0")), options=json.loads(meta.get("options", "{}")))
    except (KeyError, ValueError) as e:
        raise UserError(f"--decode {str(path)!r}: malformed metadata ({e.__class__.__name__}: {e})") from None
    return z.to(torch.float64), labels, spec, meta


def run_decode(ck, latents: Path, out: Path, s: EncodeSettings, *, device: torch.device, force: bool = False,
               log=_log_default) -> dict:
    """`diffcli encode CKPT --decode LATENTS.safetensors --out DIR`: DIR/images/NNNNNN.png, DIR/decoded.png,
    DIR/decode.json. The solver, grid and labels come from the latents file unless overridden."""
    from .checkpoint import atomic_write_bytes, atomic_write_text
    from .images import clear_outputs, png_bytes, save_grid, to_uint8

    den = ck.denoiser
    warnings = validate_settings(s, den.num_classes, "decode") + _student_warnings(ck)
    z, labels, base, meta = read_latents(latents, ck)
    spec = resolve_spec(s, den, base)
    if (spec.solver, spec.steps, spec.schedule) != (base.solver, base.steps, base.schedule):
        warnings.append(f"decoding with {spec.solver} on {spec.steps} {spec.schedule} levels, but the latents were "
                        f"encoded with {base.solver} on {base.steps} {base.schedule} levels: not an exact inverse")
    cfg = s.cfg if s.cfg != 1.0 else float(meta.get("cfg", "1.0"))
    _prepare_out(out, force, [Path(latents)], decoding=True)
    for w in warnings:
        log(f"warning: {w}")
    t0 = time.perf_counter()
    if s.class_id is not None:
        labels = torch.full((len(z),), s.class_id, dtype=torch.long)
    ys, nfe = [], 0
    for b0 in range(0, len(z), s.batch_size):
        zb = z[b0:b0 + s.batch_size].to(device)
        lb = None if labels is None else labels[b0:b0 + s.batch_size]
        cond = None if lb is None or bool((lb < 0).any()) or den.num_classes == 0 else lb.to(device)
        y, n = decode(den, zb, spec, cond=cond, cfg=cfg if cond is not None else 1.0)
        ys.append(y.cpu())
        nfe = max(nfe, n)
    y = torch.cat(ys) if ys else torch.empty(0, ck.channels, ck.resolution, ck.resolution)
    out.mkdir(parents=True, exist_ok=True)
    clear_outputs(out, DECODE_CLEARS)  # an earlier run's files (--force): never mix two runs
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(to_uint8(y)):
        atomic_write_bytes(out / "images" / f"{i:06d}.png", png_bytes(img))
    save_grid(out / "decoded.png", y[:256].float())
    record = _record_base(ck, spec, s, device, "decode")
    record.update({"latents": str(latents), "n": len(y), "nfe_decode": nfe, "warnings": warnings,
                   "labels": None if labels is None else labels.tolist(), "cfg": cfg,
                   "seconds": round(time.perf_counter() - t0, 3)})
    atomic_write_text(out / "decode.json", json.dumps(record, indent=2, default=_finite))
    return record
