"""Model-adapted solvers: the σ grid *and* the step coefficients of a deterministic sampler, learned for one model.

Every deterministic diffcli sampler (ddim/euler, heun, dpmpp_2m/3m, unipc, ipndm) is, for a fixed σ grid, a
*linear* map of the initial state and the denoiser outputs: with D_j = D(x_j, σ_j) the j-th call,

    x_i = a_i·x_0 + Σ_{j<i} B_ij·D_j   (i = 0 … n-1: the points where the denoiser is called)
    out = a_n·x_0 + Σ_{j<n} B_nj·D_j,

a "non-stationary" linear multistep solver (Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast
Sampling of Diffusion and Flow Models", BNS, eq. 9: each step gets its own coefficients on *all* earlier
evaluations). `solver_coefficients` reads (a, B) off any diffcli sampler by linearity (a denoiser that ignores
x and returns unit vectors), so a learned solver starts exactly at a good hand-made one.

`tune_solver` then optimises the n-1 interior noise levels (a softmax of log-σ gaps, ends fixed) together with
a and B by Adam on the mean squared distance of the solver's output from a tight rk45 solve of the same
probability-flow ODE, on many noise draws (BNS and LD3 — Tong et al. 2024, "Learning to Discretize Denoising
Diffusion ODEs" — both train on ~hundreds to thousands of reference pairs; the gradient flows through the
denoiser calls, so it needs a differentiable denoiser: the analytic oracle, or a network). A quarter of the
draws is held out and the iterate with the lowest held-out error is kept (early stopping), which is what keeps
~n²/2 free coefficients from fitting the training draws' luck. With `coefficients=False` only the grid is
learned (the sampler's own rule makes the steps): a gradient-based "Align Your Steps"-style grid.

`tune_grid` learns the grid alone without gradients: Nelder–Mead on the same log-σ gaps, on the end-point RMS
itself. That is what lowers the error at few steps on data with separated modes: there the RMS is carried by
the draws whose trajectory ends on another mode than the exact one, a jump the gradient of the squared error
cannot see (it only moves each end point within its basin), while a search on the RMS counts them. It starts
from `logsnr_leading_ms` (the first call one log-SNR step below σ_max, where the marginal is still ≈ N(0, σ²I)
and a step buys nothing) and needs only forward calls of the denoiser.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .samplers import SAMPLER_INFO, _NET_DTYPE, _check_sigmas, exact_denoiser_calls, get_sigmas, sample_rk45


@dataclass
class LinearSolver:
    """A non-stationary linear multistep solver: n denoiser calls at `sigmas[:-1]`, then the output.

    sigmas (n+1,) float64, decreasing, ends with 0 (the call levels, then the final 0); a (n+1,) float64 with
    a[0] = 1 (x_0 = σ_0·ε); B (n+1, n) float64, strictly lower-triangular (row i uses calls j < i)."""

    sigmas: Tensor
    a: Tensor
    B: Tensor

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1

    def to_tensors(self, prefix: str) -> dict[str, Tensor]:
        return {prefix: self.sigmas.double().cpu(), prefix + "/a": self.a.double().cpu(),
                prefix + "/B": self.B.double().cpu()}


def run_linear_solver(denoiser, x: Tensor, solver: LinearSolver, *, callback=None) -> Tensor:
    """Sample with a LinearSolver from x = σ_0·ε (B, C, H, W): float64 state, denoiser called in float32 (float64
    within `exact_denoiser_calls`). Differentiable in x, the coefficients and σ when grad is enabled."""
    sig, a, B = solver.sigmas, solver.a, solver.B
    x0 = x.to(torch.float64)
    dt = _NET_DTYPE[-1]
    ds: list[Tensor] = []
    n = len(sig) - 1
    for i in range(n):
        xi = a[i] * x0
        for j, d in enumerate(ds):
            xi = xi + B[i, j] * d
        d = denoiser(xi.to(dt), sig[i].to(dt).expand(x0.shape[0]).contiguous()).to(torch.float64)
        if callback is not None:
            callback({"i": i, "sigma": sig[i], "sigma_next": sig[i + 1], "x": xi, "denoised": d, "nfe": i + 1})
        ds.append(d)
    out = a[n] * x0
    for j, d in enumerate(ds):
        out = out + B[n, j] * d
    return out


def _check_levels(sigmas: Tensor) -> Tensor:
    """Call levels of a linear solver: 1-D, non-increasing (Heun calls twice at a level), positive, then a final 0."""
    sigmas = sigmas.to(torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or float(sigmas[-1]) != 0.0 or bool((sigmas[:-1] <= 0).any()) \
            or bool((sigmas[1:] > sigmas[:-1]).any()):
        raise ValueError("a solver's sigmas must be 1-D, non-increasing and positive, then end with 0")
    return sigmas


@torch.no_grad()
def sample_linear_solver(denoiser, x: Tensor, sigmas: Tensor, *, a: Tensor, B: Tensor, generator=None,
                         callback=None) -> Tensor:
    """The Sampler contract around `run_linear_solver` (BNS, Shaul et al. 2024): `sigmas` are the solver's own
    call levels, `a`, `B` its coefficients. One denoiser call per level; deterministic."""
    sigmas = _check_levels(sigmas.to(x.device))
    solver = LinearSolver(sigmas, a.to(torch.float64).to(x.device), B.to(torch.float64).to(x.device))
    if len(solver.a) != len(sigmas) or tuple(solver.B.shape) != (len(sigmas), len(sigmas) - 1):
        raise ValueError(f"coefficients of shape {tuple(solver.a.shape)}, {tuple(solver.B.shape)} do not fit "
                         f"{len(sigmas) - 1} calls")
    return run_linear_solver(denoiser, x, solver, callback=callback)


@torch.no_grad()
def solver_coefficients(sampler: str, sigmas: Tensor, options: dict | None = None) -> LinearSolver:
    """(a, B) of a deterministic diffcli sampler on a decreasing grid `sigmas` (ends with 0), read off by linearity:
    the sampler is run on a state of n+1 coordinates with x_0 = e_0 and a denoiser whose j-th call returns e_{j+1}
    whatever its input, and records where it is called. Returns the solver's call levels (the grid without the
    levels at which the sampler never calls, e.g. none) and coefficients. Refuses samplers that are not linear."""
    info = SAMPLER_INFO[sampler]
    if info.stochastic or info.adaptive:
        raise ValueError(f"{sampler}: only fixed-step deterministic samplers are linear multistep solvers")
    sigmas = _check_sigmas(sigmas)
    if float(sigmas[-1]) != 0.0:
        raise ValueError("solver_coefficients needs a decreasing grid ending with 0")
    n_calls = info.nfe(len(sigmas) - 1)
    m = n_calls + 1
    points: list[Tensor] = []
    levels: list[float] = []

    def probe(x: Tensor, s: Tensor) -> Tensor:
        points.append(x.reshape(m).clone())
        levels.append(float(s.reshape(-1)[0]))
        e = torch.zeros(1, 1, 1, m, dtype=x.dtype)
        e[..., len(points)] = 1.0
        return e

    x = torch.zeros(1, 1, 1, m, dtype=torch.float64)
    x[..., 0] = 1.0
    with exact_denoiser_calls():
        out = info.fn(probe, x, sigmas, **(options or {}))
    if len(points) != n_calls:
        raise ValueError(f"{sampler}: made {len(points)} calls, expected {n_calls}")
    rows = torch.stack(points + [out.reshape(m)])  # (n+1, m): [a | B]
    sig = torch.tensor(levels + [0.0], dtype=torch.float64)
    B = rows[:, 1:]
    if bool((B.triu() != 0).any()):
        raise ValueError(f"{sampler}: a call depends on itself or a later one; not an explicit multistep solver")
    return LinearSolver(sig, rows[:, 0].contiguous(), B.contiguous())


def _levels_from_theta(theta: Tensor, lo: float, hi: float) -> Tensor:
    """(n,) call levels σ_0 = hi > … > σ_{n-1} > lo from n softmax-weighted log-σ gaps (the last gap reaches lo,
    where the final output sits), then the final 0: (n+1,)."""
    frac = torch.cat([theta.new_zeros(1), torch.softmax(theta, 0).cumsum(0)[:-1]])
    s = torch.exp(math.log(hi) - frac * (math.log(hi) - math.log(lo)))
    return torch.cat([s.new_full((1,), hi), s[1:], s.new_zeros(1)])  # σ_0 exactly hi


def _theta_from_levels(sig: Tensor, lo: float) -> Tensor:
    """Inverse of `_levels_from_theta` for a grid of call levels (ends with 0); gaps ≤ 0 are floored."""
    lv = sig[:-1].log()
    gaps = torch.cat([lv[:-1] - lv[1:], (lv[-1:] - math.log(lo))])
    total = float(lv[0]) - math.log(lo)
    return (gaps.clamp_min(1e-3 * total) / total).log()


def _tunable(sampler: str, nfe: int, draws: int):
    """(SamplerInfo, steps) of a sampler that has a grid to tune at `nfe` calls on `draws` draws; else ValueError."""
    info = SAMPLER_INFO[sampler]
    if info.stochastic or info.adaptive:
        raise ValueError(f"{sampler}: only fixed-step deterministic samplers have a grid to tune")
    steps = info.steps_for_nfe(nfe)
    if steps < 1:
        raise ValueError(f"nfe {nfe}: too small for {sampler}")
    if draws < 8:
        raise ValueError(f"draws {draws}: need at least 8 (a quarter is held out)")
    return info, steps


def _run_candidate(cand: LinearSolver | Tensor, denoiser, x: Tensor, info, options: dict | None, device) -> Tensor:
    """A learned solver, or a grid run with the sampler's own rule, from x (B, …) to the end point."""
    if isinstance(cand, LinearSolver):
        return run_linear_solver(denoiser, x, LinearSolver(cand.sigmas.to(device), cand.a.to(device),
                                                           cand.B.to(device)))
    return info.fn(denoiser, x, cand.to(device), **(options or {}))


def _prefer_stored(incumbent: LinearSolver | Tensor | None, start_level: float, score, rec: dict) -> bool:
    """Whether the grid or solver an earlier fit stored (`incumbent`) stays: it competes on this fit's held-out
    draws (`score(candidate)` → RMS) and wins ties. Comparable only if it starts at the same σ_0 (the draws are
    σ_0·ε); `rec` records which way it went (rms_stored / incumbent_skipped, rms_after and kept="stored")."""
    if incumbent is None:
        return False
    sig = incumbent.sigmas if isinstance(incumbent, LinearSolver) else incumbent
    if abs(float(sig[0]) - start_level) > 1e-9 * start_level:
        rec["incumbent_skipped"] = True
        return False
    e = rec["rms_stored"] = score(incumbent)
    if math.isfinite(e) and e <= rec["rms_after"]:
        rec.update(rms_after=e, kept="stored")
        return True
    return False


def tune_solver(denoiser, sampler: str, nfe: int, sigma_min: float, sigma_max: float, shape: tuple[int, ...], *,
                draws: int = 1024, seed: int = 2, schedule: str | None = None, iters: int = 400, lr: float = 0.01, lr_coef: float = 3e-4,
                coefficients: bool = True, reference_rtol: float = 1e-7, options: dict | None = None,
                batch_size: int | None = None, holdout: float = 0.25, device: torch.device | str = "cpu",
                exact: bool = False, labels: Tensor | None = None, bind=None, log=None,
                incumbent: LinearSolver | Tensor | None = None) -> tuple[LinearSolver | Tensor, dict]:
    """Learn a model-adapted solver (module docstring) starting from `sampler` on `schedule` (default: the
    sampler's) with `nfe` denoiser calls. `denoiser(x, σ)` must be bound to its labels/guidance and differentiable
    (torch autograd); for a conditional model give `labels` (draws,) and `bind(labels) -> denoiser` instead, and
    each batch is bound to its draws' labels. `exact` calls it in float64 (analytic oracles). Returns (solver, info) with the RMS errors
    on the held-out draws before and after and the iteration kept. `incumbent` (a grid or solver stored by an
    earlier fit) is returned instead, with info["kept"] = "stored", when it is better on the held-out draws: a
    re-fit with a smaller budget never replaces a better one."""
    info, steps = _tunable(sampler, nfe, draws)
    start = get_sigmas(schedule or info.default_schedule, steps, sigma_min, sigma_max)
    init = solver_coefficients(sampler, start, options)
    n = init.nfe
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((draws, *shape), generator=g, dtype=torch.float64) * float(init.sigmas[0])).to(device)
    ctx = exact_denoiser_calls if exact else _nullcontext

    def den(idx):
        return denoiser if labels is None else bind(labels[idx])

    if log is not None:
        log(f"tuning {sampler} NFE {nfe}: rk45 reference solve of {draws} draws …")
    with ctx(), torch.no_grad():
        ref = sample_rk45(den(slice(None)), x, torch.tensor([float(init.sigmas[0]), sigma_min, 0.0], dtype=torch.float64),
                          rtol=reference_rtol, atol=reference_rtol)
    n_hold = max(2, int(round(holdout * draws)))
    ho, tr = torch.arange(n_hold, device=device), torch.arange(n_hold, draws, device=device)
    x_tr, ref_tr, x_ho, ref_ho = x[n_hold:], ref[n_hold:], x[:n_hold], ref[:n_hold]

    lo = min(sigma_min, float(init.sigmas[-2]) * 0.999)
    hi = float(init.sigmas[0])
    theta = _theta_from_levels(init.sigmas, lo).to(device).requires_grad_(n > 1)
    # a_i relative to the exponential integrator's σ_i/σ_0 (every diffcli solver has it), so that a moves with σ
    a_rel0 = init.a.to(device) / (init.sigmas.to(device) / hi).clamp_min(1e-300)
    a_rel0[-1] = 0.0 if float(init.a[-1]) == 0.0 else a_rel0[-1]
    log_a = torch.zeros(n + 1, dtype=torch.float64, device=device, requires_grad=coefficients)
    dB = torch.zeros_like(init.B, device=device).requires_grad_(coefficients)
    mask = torch.ones_like(init.B, device=device).tril(-1)
    mask_a = torch.ones(n + 1, dtype=torch.float64, device=device)
    mask_a[0] = 0.0  # x_0 = σ_0·ε as sampled

    def build() -> LinearSolver:
        sig = _levels_from_theta(theta, lo, hi) if n > 1 else init.sigmas.to(device)
        ratio = sig / hi
        a = a_rel0 * ratio * torch.exp(log_a * mask_a)
        if float(init.a[-1]) == 0.0:
            a = a * torch.cat([a.new_ones(n), a.new_zeros(1)])
        return LinearSolver(sig, a, init.B.to(device) + dB * mask)

    def rms(solver: LinearSolver | Tensor, xx: Tensor, rr: Tensor) -> float:
        with ctx(), torch.no_grad():
            out = _run_candidate(solver, den(ho), xx, info, options, device)
            return float((out.to(torch.float64) - rr).pow(2).mean().sqrt())

    def keep_better(result: LinearSolver, rec: dict) -> tuple[LinearSolver | Tensor, dict]:
        rec["kept"] = "tuned" if rec["rms_after"] < rec["rms_before"] else "start"
        stays = _prefer_stored(incumbent, hi, lambda c: rms(c, x_ho, ref_ho), rec)
        return (incumbent if stays else result), rec

    groups = [{"params": [theta], "lr": lr}, {"params": [log_a, dB], "lr": lr_coef}]
    groups = [gr for gr in groups if all(p.requires_grad for p in gr["params"])]
    params = [p for gr in groups for p in gr["params"]]
    before = rms(init_dev := LinearSolver(init.sigmas.to(device), init.a.to(device), init.B.to(device)), x_ho, ref_ho)
    best = {"e": before, "solver": init_dev, "iter": 0}
    if not params or iters < 1:
        return keep_better(init, {"rms_before": before, "rms_after": before, "iter": 0, "draws": draws,
                                  "holdout": n_hold})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    bs = batch_size or len(x_tr)
    gb = torch.Generator().manual_seed(seed + 1)
    check_every = max(1, iters // 40)
    best_params = [p.detach().clone() for p in params]
    rollbacks = 0
    for it in range(1, iters + 1):
        idx = torch.randperm(len(x_tr), generator=gb)[:bs].to(device) if bs < len(x_tr) else slice(None)
        with ctx():
            out = run_linear_solver(den(tr[idx]), x_tr[idx], build())
            loss = (out - ref_tr[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
            opt.zero_grad(set_to_none=True)
            continue
        opt.step()
        sched.step()
        if it % check_every == 0 or it == iters:
            with torch.no_grad():
                cand = build()
                cand = LinearSolver(cand.sigmas.detach().clone(), cand.a.detach().clone(), cand.B.detach().clone())
            e = rms(cand, x_ho, ref_ho)
            if math.isfinite(e) and e < best["e"]:
                best = {"e": e, "solver": cand, "iter": it}
                best_params = [p.detach().clone() for p in params]
            elif not math.isfinite(e) or e > 1.25 * best["e"]:
                # a step threw some draws onto other mixture components (the loss is not smooth there): go back
                # to the best iterate with half the step size and a fresh Adam state
                with torch.no_grad():
                    for p, b in zip(params, best_params):
                        p.copy_(b)
                opt.state.clear()
                sched.base_lrs = [lr_ * 0.5 for lr_ in sched.base_lrs]
                for gr in opt.param_groups:
                    gr["lr"] *= 0.5
                rollbacks += 1
            if log is not None and it % (check_every * 10) == 0:
                log(f"  iter {it}: train RMS {float(loss.detach().sqrt()):.4g}, held-out RMS {e:.4g}")
    s = best["solver"]
    out = LinearSolver(s.sigmas.cpu(), s.a.cpu(), s.B.cpu())
    out, rec = keep_better(out, {"rms_before": before, "rms_after": best["e"], "iter": best["iter"], "draws": draws,
                                 "holdout": n_hold, "rollbacks": rollbacks})
    if log is not None:
        log(f"tuned {sampler} NFE {nfe}: held-out RMS {before:.4g} → {best['e']:.4g} (iteration {best['iter']})"
            + _kept_note(rec))
    return out, rec


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- storage beside the checkpoint ------------------------------------------------------------------------------
# The sidecar CKPT.schedules.safetensors (diffcli.samplers.tuned_schedule_path) holds, per key "SAMPLER/stepsN",
# the σ grid; a learned solver adds "SAMPLER/stepsN/a" and "SAMPLER/stepsN/B". Files with grids only (older
# diffcli) load unchanged: the sampler runs its own rule on the grid.
@torch.no_grad()
def tune_grid(denoiser, sampler: str, nfe: int, sigma_min: float, sigma_max: float, shape: tuple[int, ...], *,
              draws: int = 512, seed: int = 2, schedule: str = "logsnr_leading_ms", evals: int = 300,
              reference_rtol: float = 1e-7, options: dict | None = None, batch_size: int | None = None,
              holdout: float = 0.25, device: torch.device | str = "cpu", exact: bool = False,
              labels: Tensor | None = None, bind=None, log=None,
              incumbent: LinearSolver | Tensor | None = None) -> tuple[Tensor | LinearSolver, dict]:
    """The σ grid of `sampler` with `nfe` denoiser calls, fitted to this denoiser by Nelder–Mead (module
    docstring; ideas of Sabour et al. 2024 "Align Your Steps" and Tong et al. 2024 LD3, fitted directly on the
    end-point error). Objective: log RMS distance of the sampler's output, run on the grid with its own rule,
    from an rk45 solve of the same probability-flow ODE from the same start x = σ_0·ε, over the training
    draws. The first level σ_0 is the `schedule`'s; the other call levels are free (softmax of log-σ gaps, the
    last one above min(σ_min, 0.999·σ_{n-1}) of the start). A quarter of the draws is held out: if the fitted
    grid is not better there than the start, the start is kept. `denoiser`, `labels`/`bind`, `exact` as in
    `tune_solver`; batches of `batch_size` draws bound memory. Returns (sigmas (steps+1,) ending with 0, info
    with the held-out RMS before and after and the evaluations used); `incumbent` as in `tune_solver`."""
    from scipy.optimize import minimize

    info, steps = _tunable(sampler, nfe, draws)
    start = get_sigmas(schedule, steps, sigma_min, sigma_max)
    hi = float(start[0])
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((draws, *shape), generator=g, dtype=torch.float64) * hi).to(device)
    ctx = exact_denoiser_calls if exact else _nullcontext
    bs = batch_size or draws
    opts = options or {}

    def den(idx):
        return denoiser if labels is None else bind(labels[idx])

    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    say(f"tuning {sampler} NFE {nfe}: rk45 reference solve of {draws} draws …")
    with ctx():
        ref = torch.cat([sample_rk45(den(slice(b, b + bs)), x[b:b + bs], torch.tensor([hi, sigma_min, 0.0],
                                     dtype=torch.float64), rtol=reference_rtol, atol=reference_rtol)
                         for b in range(0, draws, bs)])
    n_hold = max(2, int(round(holdout * draws)))

    def rms(sig: Tensor | LinearSolver, lo_i: int, hi_i: int) -> float:
        sq = 0.0
        with ctx():
            for b in range(lo_i, hi_i, bs):
                e = min(b + bs, hi_i)
                out = _run_candidate(sig, den(slice(b, e)), x[b:e], info, opts, device)
                sq += float((out.to(torch.float64) - ref[b:e]).pow(2).sum())
        return math.sqrt(sq / ((hi_i - lo_i) * x[0].numel()))

    before_ho = rms(start, 0, n_hold)
    rec = {"rms_before": before_ho, "rms_after": before_ho, "evals": 0, "draws": draws, "holdout": n_hold,
           "kept": "start"}
    if steps < 2:
        return start, rec
    lo = min(sigma_min, float(start[-2]) * 0.999)
    t1 = time.perf_counter()
    best = {"e": rms(start, n_hold, draws), "s": start}
    per_eval = time.perf_counter() - t1
    # a long fit on a real network must not look hung: an estimate now, then a line per tenth of the budget
    say(f"  reference {t1 - t0:.1f} s; up to {evals} grid evaluations at {per_eval:.2f} s each "
        f"(about {_duration(evals * per_eval)}); start grid train RMS {best['e']:.4g}")
    count = [0]
    every = max(1, evals // 10)

    def f(theta) -> float:
        count[0] += 1
        sig = _levels_from_theta(torch.as_tensor(theta, dtype=torch.float64), lo, hi)
        e = rms(sig, n_hold, draws)
        if math.isfinite(e) and e < best["e"]:
            best.update(e=e, s=sig)
        if count[0] % every == 0:
            say(f"  evaluation {count[0]}/{evals}: best train RMS {best['e']:.4g}")
        return math.log(e) if math.isfinite(e) else 1e30

    minimize(f, _theta_from_levels(start, lo).numpy(), method="Nelder-Mead",
             options={"maxfev": evals, "xatol": 1e-4, "fatol": 1e-7, "adaptive": True})
    after_ho = rms(best["s"], 0, n_hold)
    rec["evals"] = count[0]
    if after_ho < before_ho:
        rec.update(rms_after=after_ho, kept="tuned")
        out = best["s"]
    else:
        out = start
    if _prefer_stored(incumbent, hi, lambda c: rms(c, 0, n_hold), rec):
        out = incumbent
    if log is not None:
        log(f"tuned {sampler} NFE {nfe} grid: held-out RMS {before_ho:.4g} → {rec['rms_after']:.4g} "
            f"({count[0]} evaluations, kept the {rec['kept']} grid)" + _kept_note(rec))
    return (out if isinstance(out, LinearSolver) else out.cpu()), rec


def _kept_note(rec: dict) -> str:
    if rec.get("kept") == "stored":
        return f"; the grid stored before is better on these draws (RMS {rec['rms_stored']:.4g}) and stays"
    if "rms_stored" in rec:
        return f"; it replaces the stored one (RMS {rec['rms_stored']:.4g} on these draws)"
    if rec.get("incumbent_skipped"):
        return "; the stored entry starts at another σ_0, so it cannot be compared on these draws: replaced"
    return ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def save_tuned_solver(path, sampler: str, steps: int, solver: LinearSolver | Tensor, meta: dict[str, str]) -> None:
    """Add (or replace) `sampler/steps{steps}` in the sidecar file `path`, atomically: a LinearSolver's levels and
    coefficients, or a grid alone (a Tensor: the sampler's own rule runs on it)."""
    from pathlib import Path

    from .checkpoint import read_safetensors, save_safetensors

    tensors, old_meta = read_safetensors(path) if Path(path).exists() else ({}, {})
    key = f"{sampler}/steps{steps}"
    for k in (key, key + "/a", key + "/B"):
        tensors.pop(k, None)
    old_meta = {k: v for k, v in old_meta.items() if not k.startswith(key + ":")}
    if isinstance(solver, LinearSolver):
        tensors.update(solver.to_tensors(key))
    else:
        tensors[key] = _check_sigmas(solver.to(torch.float64).cpu())
    old_meta.update({f"{key}:{k}": str(v) for k, v in meta.items()})
    old_meta["kind"] = "schedules"
    save_safetensors(path, tensors, old_meta)


def load_tuned_solver(path, sampler: str, steps: int) -> tuple[Tensor, LinearSolver | None] | None:
    """(grid, solver or None) stored for (sampler, steps) in a sidecar file; None if there is none. A grid without
    coefficients (a tuned schedule) gives solver None. Malformed entries are a UserError naming the file."""
    from pathlib import Path

    from .checkpoint import read_safetensors
    from .errors import UserError

    if not Path(path).exists():
        return None
    tensors, _ = read_safetensors(path)
    key = f"{sampler}/steps{steps}"
    grid = tensors.get(key)
    if grid is None:
        return None
    grid = grid.to(torch.float64)
    a, B = tensors.get(key + "/a"), tensors.get(key + "/B")
    try:
        if a is None and B is None:
            _check_sigmas(grid)
            return grid, None
        if a is None or B is None:
            raise ValueError("has only one of its coefficient tensors")
        solver = LinearSolver(_check_levels(grid), a.to(torch.float64), B.to(torch.float64))
        if tuple(solver.a.shape) != (len(grid),) or tuple(solver.B.shape) != (len(grid), len(grid) - 1):
            raise ValueError(f"coefficients {tuple(solver.a.shape)}, {tuple(solver.B.shape)} do not fit "
                             f"{len(grid) - 1} calls")
        if not bool(torch.isfinite(solver.a).all() and torch.isfinite(solver.B).all()):
            raise ValueError("has non-finite coefficients")
    except ValueError as exc:
        raise UserError(f"{path}: entry {key} {exc}") from None
    return grid, solver
