"""RMS error of each sampler's final sample against a tight reference solve, on a hard Gaussian-mixture oracle.

    OMP_NUM_THREADS=1 .venv/bin/python bench/samplers_accuracy.py [--draws 4096] [--no-diffusers]

Oracle: D = 64 (1×8×8), 32 components, component std 0.02 (narrow), means in [-0.6, 0.6]^64, σ ∈ [0.002, 80].
Every sampler starts from the same 4096 noise draws ε (seed 0); the reference is diffcli's rk45 at rtol = atol = 1e-9
with float64 denoiser calls, from x = 80·ε down to σ = 0.002, then a final denoise. Every row counts its true
NFE with a wrapper around the oracle.

Peers (bench extras only):
- k-diffusion's euler, heun, lms, dpmpp_2m on its Karras and exponential schedules;
- diffusers' DDIM, Euler, Heun, LMS, DEIS, UniPC, DPM-Solver++ 2M/3M (discrete-VP schedulers) and the EDM-native
  EDMEuler / EDMDPMSolverMultistep, each swept over its spacing/σ options (see DIFFUSERS below) on 512 *other*
  draws (seed 1); per scheduler and NFE the configuration best on those is run on the evaluation draws and
  reported, and every configuration tried is kept in the JSON with its selection-draw error. (The error on a
  narrow mixture is dominated by the few samples whose trajectory switches component; choosing among ~200
  configurations on the evaluation draws themselves would reward that luck, not the solver.)
  The discrete VP schedulers get a 1000-step training schedule passed as `trained_betas`, chosen so that
  σ_t = sqrt((1-ᾱ_t)/ᾱ_t) is geometric from σ_0 = 0.002 to σ_999 = 80: the table covers exactly the oracle's σ
  range, log σ is linear in t so diffusers' log-σ interpolation (`_sigma_to_t`) is exact, and "linspace" spacing
  on it is uniform in log-SNR. The oracle is wrapped as the network a user would have trained on that table:
  it sees (scaled input, timestep), maps t → σ through the scheduler's own ᾱ table (interpolating log σ for
  fractional t), x = x_vp·sqrt(1+σ²), and returns ε = (x - D)/σ or D ("sample"), as configured. EDM schedulers:
  c_in, c_noise = log(σ)/4, output F = (D - c_skip·x)/c_out.
  Initial state: the same ε, as the probability-flow ODE state at the scheduler's first σ (x = σ·ε in VE units,
  x_vp = σ·ε/sqrt(1+σ²)) — the exact start of the reference solve when that σ is 80. (Starting from
  ε·init_noise_sigma instead scales the start by sqrt(1+σ⁻²), ≤ 1.00008 at σ = 80.) States stay in float32 as in
  a diffusers pipeline.

diffcli: every deterministic sampler on its default schedule, on logsnr, karras, logsnr_leading, logsnr_leading_ms and
logsnr_linspace (diffusers' "leading" spacings of DDIM and of its multistep schedulers, and "linspace", in log-SNR),
dpmpp_3m without lower_order_final, plus
- "peer grid (X)": the diffcli sampler that runs peer X's algorithm on exactly the call levels X's chosen
  configuration used (then the final denoise), in X's variant (DPM-Solver++ solver_type, UniPC B(h)), so that
  only the implementation differs;
- "tuned grid (Nelder–Mead)": `diffcli.tuning.tune_grid` — the sampler's σ grid fitted by Nelder–Mead on the
  end-point RMS from `logsnr_leading_ms` on --train-draws training draws (seed 2, their own rk45 reference at
  1e-9, a quarter held out), never on the evaluation draws;
- "tuned solver (BNS)": `diffcli.tuning.tune_solver` — the grid and the step coefficients learned by Adam
  (Shaul et al. 2024's non-stationary solvers) on the same training draws, never on the evaluation draws;
- "tuned grid (Adam)": the same with the sampler's own coefficients (only the grid learned).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings

import numpy as np
import torch
from torch import Tensor

from samplers_table import NFES, SAME_ALGORITHM, untuned

from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.samplers import SAMPLER_INFO, NFECounter, exact_denoiser_calls, get_sigmas, sample_rk45
from diffcli.tuning import sample_linear_solver, tune_grid, tune_solver

SMIN, SMAX = 0.002, 80.0
T_TRAIN = 1000


# --- diffusers ----------------------------------------------------------------------------------------------
def vp_betas(smin: float = SMIN, smax: float = SMAX, T: int = T_TRAIN) -> np.ndarray:
    """β_t (t = 0…T-1) of a discrete VP process with σ_t geometric from smin to smax (module docstring)."""
    t = np.arange(T, dtype=np.float64)
    abar = 1.0 / (1.0 + (smin * (smax / smin) ** (t / (T - 1))) ** 2)
    return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])


_SPACING = [{"timestep_spacing": s} for s in ("leading", "trailing", "linspace")]
_SIGMAS = [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
_PRED = [{"prediction_type": "epsilon"}, {"prediction_type": "sample"}]


def _grid(*axes) -> list[dict]:
    return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in itertools.product(*axes)]


def _axis(key, values) -> list[dict]:
    return [{key: v} for v in values]


# scheduler label → (class name, kind, option grid). kind: "vp" (sample is x_vp, model sees x_vp), "ve" (sample is
# VE x, scale_model_input gives x_vp), "edm" (EDM preconditioning). Spacing matters only on the default σ's of the
# table, so the alternative σ families are crossed with "linspace" only (diffusers derives them from the whole
# table, except Euler/Heun/LMS, which take the range of the spaced grid — there all spacings are crossed).
_VP_SIG = _SPACING + [dict(timestep_spacing="linspace", **s) for s in _SIGMAS]
_VE_SIG = _SPACING + _grid(_SPACING, _SIGMAS)
DIFFUSERS = {
    "DDIM": ("DDIMScheduler", "vp", _grid(_SPACING, _axis("set_alpha_to_one", [True, False]), _PRED,
                                          [{"clip_sample": False}])),
    "Euler": ("EulerDiscreteScheduler", "ve", _grid(_VE_SIG, _axis("final_sigmas_type", ["zero", "sigma_min"]))),
    "Heun": ("HeunDiscreteScheduler", "ve", _VE_SIG),
    "LMS": ("LMSDiscreteScheduler", "ve", _VE_SIG),
    "DEIS": ("DEISMultistepScheduler", "vp", _grid(_VP_SIG, _axis("solver_order", [2, 3]),
                                                   _axis("lower_order_final", [True, False]), _PRED)),
    "UniPC": ("UniPCMultistepScheduler", "vp", _grid(_VP_SIG, _axis("solver_order", [2, 3]),
                                                     _axis("solver_type", ["bh1", "bh2"]),
                                                     _axis("lower_order_final", [True, False]),
                                                     _axis("final_sigmas_type", ["zero", "sigma_min"]), _PRED)),
    **{f"DPM-Solver++ {o}M": ("DPMSolverMultistepScheduler", "vp",
                              _grid(_VP_SIG + [{"timestep_spacing": "linspace", "use_lu_lambdas": True}],
                                    [{"solver_order": o}], _axis("solver_type", ["midpoint", "heun"]),
                                    _axis("lower_order_final", [True, False]), _axis("euler_at_final", [False, True]),
                                    _axis("final_sigmas_type", ["zero", "sigma_min"]), _PRED))
       for o in (2, 3)},
    "EDMEuler": ("EDMEulerScheduler", "edm", _grid(_axis("sigma_schedule", ["karras", "exponential"]),
                                                   _axis("final_sigmas_type", ["zero", "sigma_min"]))),
    **{f"EDM DPM-Solver++ {o}M": ("EDMDPMSolverMultistepScheduler", "edm",
                                  _grid(_axis("sigma_schedule", ["karras", "exponential"]), [{"solver_order": o}],
                                        _axis("solver_type", ["midpoint", "heun"]),
                                        _axis("lower_order_final", [True, False]),
                                        _axis("euler_at_final", [False, True]),
                                        _axis("final_sigmas_type", ["zero", "sigma_min"])))
       for o in (2, 3)},
}


# diffusers scheduler → the diffcli sampler that runs the same algorithm
PEER_SAMPLER = {peer: name for name, peers in SAME_ALGORITHM.items() for peer in peers if peer in DIFFUSERS}


class _DiffusersNet:
    """The oracle as the network a diffusers user would call: model(scaled_input, t) → ε, x0 or EDM's F."""

    def __init__(self, gm, sched, kind: str, prediction: str) -> None:
        self.gm, self.kind, self.prediction, self.nfe = gm, kind, prediction, 0
        self.called: list[float] = []  # σ of every call, in order: the grid the scheduler ran on
        if kind != "edm":
            abar = sched.alphas_cumprod.to(torch.float64)
            self.log_sigma = ((1 - abar) / abar).sqrt().log().numpy()
        else:
            self.sigma_data = float(sched.config.sigma_data)

    def sigma_of(self, t) -> float:
        t = float(t)
        if self.kind == "edm":
            return math.exp(4.0 * t)  # c_noise = log(σ)/4
        return math.exp(float(np.interp(t, np.arange(len(self.log_sigma)), self.log_sigma)))

    def __call__(self, inp: torch.Tensor, t) -> torch.Tensor:
        self.nfe += 1
        s = self.sigma_of(t)
        self.called.append(s)
        inp = inp.to(torch.float64)
        if self.kind == "edm":
            sd = self.sigma_data
            x = inp * math.sqrt(s**2 + sd**2)
            d = self.gm(x.float(), torch.full((len(x),), s)).to(torch.float64)
            out = (d - sd**2 / (s**2 + sd**2) * x) / (s * sd / math.sqrt(s**2 + sd**2))
        else:
            x = inp * math.sqrt(1 + s**2)
            d = self.gm(x.float(), torch.full((len(x),), s)).to(torch.float64)
            out = d if self.prediction == "sample" else (x - d) / s
        return out.float()


def _make(cls, kind: str, opts: dict):
    if kind == "edm":
        return cls(sigma_min=SMIN, sigma_max=SMAX, **opts)
    return cls(num_train_timesteps=T_TRAIN, trained_betas=vp_betas(), **opts)


def _steps_for(cls, kind, opts, budget: int) -> tuple[int, int]:
    """Most inference steps whose number of model calls (= len(timesteps)) fits the budget."""
    for n in range(budget, 0, -1):
        s = _make(cls, kind, opts)
        s.set_timesteps(n)
        if len(s.timesteps) <= budget:
            return n, len(s.timesteps)
    return 0, 0


def _first_last_sigma(s, net, kind: str) -> tuple[float, float]:
    if hasattr(s, "sigmas") and s.sigmas is not None and len(s.sigmas) > 0:
        return float(s.sigmas[0]), float(s.sigmas[-1])
    a_end = float(s.final_alpha_cumprod)  # DDIM
    return net.sigma_of(s.timesteps[0]), math.sqrt((1 - a_end) / a_end)


def run_diffusers(cls, kind: str, opts: dict, gm, eps: torch.Tensor, steps: int) -> tuple[torch.Tensor, int, list]:
    """Sample with a diffusers scheduler from the noise draws eps; returns (final x0 in VE units, true NFE, the σ of
    every model call in order)."""
    s = _make(cls, kind, opts)
    s.set_timesteps(steps)
    net = _DiffusersNet(gm, s, kind, opts.get("prediction_type", "epsilon"))
    s_first, s_last = _first_last_sigma(s, net, kind)
    x = eps.float() * s_first
    if kind == "vp":
        x = x / math.sqrt(1 + s_first**2)
    for t in s.timesteps:
        out = net(s.scale_model_input(x, t), t)
        x = s.step(out, t, x).prev_sample
    x = x.to(torch.float64)
    if kind == "vp":
        x = x * math.sqrt(1 + s_last**2)
    return x, net.nfe, net.called


def _label(opts: dict) -> str:
    short = {"timestep_spacing": "", "use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
             "use_beta_sigmas": "beta", "use_lu_lambdas": "lu_lambdas", "prediction_type": "pred=",
             "set_alpha_to_one": "alpha_to_one=", "final_sigmas_type": "final=", "solver_type": "",
             "lower_order_final": "lower_order_final=", "euler_at_final": "euler_at_final=",
             "sigma_schedule": "", "solver_order": "order="}
    parts = []
    for k, v in opts.items():
        if k == "clip_sample" or (isinstance(v, bool) and k.startswith("use_")):
            if v is True:
                parts.append(short[k])
            continue
        parts.append(f"{short.get(k, k + '=')}{v}")
    return ",".join(parts)


def diffusers_peers(gm, eps_sel, rms_sel, eps, record, sweep: list, grids: list) -> None:
    """Sweep every scheduler's options on the *selection* draws (eps_sel, scored by rms_sel); the configuration
    that wins there is then run on the evaluation draws `eps` and recorded. Choosing on the draws a row is
    scored on would let the luck of which few samples switch mixture component pick the winner."""
    import diffusers

    for label, (clsname, kind, grid) in DIFFUSERS.items():
        cls = getattr(diffusers, clsname, None)
        if cls is None:
            print(f"diffusers {diffusers.__version__} has no {clsname}; skipped")
            continue
        for nfe in NFES:
            best, seen = None, set()
            for opts in grid:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        n, _ = _steps_for(cls, kind, opts, nfe)
                        if n == 0:
                            continue
                        probe = _make(cls, kind, opts)
                        probe.set_timesteps(n)
                        key = (tuple(np.asarray(probe.timesteps, dtype=np.float64).round(6)),
                               tuple(np.asarray(getattr(probe, "sigmas", []), dtype=np.float64).round(9)),
                               tuple(sorted((k, v) for k, v in opts.items() if k not in (
                                   "timestep_spacing", "use_karras_sigmas", "use_exponential_sigmas",
                                   "use_beta_sigmas", "use_lu_lambdas"))))
                        if key in seen:  # same grid and solver as a configuration already run
                            continue
                        seen.add(key)
                        out, true_nfe, _ = run_diffusers(cls, kind, opts, gm, eps_sel, n)
                    e = rms_sel(out)
                except Exception as exc:  # an option combination diffusers refuses
                    sweep.append({"scheduler": label, "nfe_budget": nfe, "config": _label(opts),
                                  "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                    continue
                if not math.isfinite(e):
                    e = float("inf")
                sweep.append({"scheduler": label, "nfe_budget": nfe, "config": _label(opts), "steps": n,
                              "nfe": true_nfe, "rms_selection_draws": e})
                if best is None or e < best[0]:
                    best = (e, n, opts)
            if best is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out, true_nfe, called = run_diffusers(cls, kind, best[2], gm, eps, best[1])
                record("diffusers", label, _label(best[2]), nfe, out, true_nfe)
                grids.append((label, nfe, called, best[2]))


def ratio_intervals(rows: list[dict], per_draw_sq: list[Tensor], resamples: int, seed: int = 0) -> None:
    """Put into every diffcli row the ratio of its RMS to the best peer's at the same NFE, and to the best
    same-algorithm peer's, each with a paired-bootstrap 95% interval (the evaluation draws resampled with
    replacement, the same resample for both rows). On a narrow mixture a row's RMS is carried by the few draws
    that end on another component, so a ratio of two rows moves by several percent from one set of draws to the
    next; the interval says which differences the draws can tell apart."""
    g = torch.Generator().manual_seed(seed)
    n = len(per_draw_sq[0])
    idx = torch.randint(0, n, (resamples, n), generator=g)
    peers = [i for i, r in enumerate(rows) if r["family"] != "diffcli"]

    def best_of(cands: list[int]) -> int | None:
        return min(cands, key=lambda i: rows[i]["rms"]) if cands else None

    def interval(i: int, j: int) -> list[float]:
        a = per_draw_sq[i][idx].mean(1).sqrt()
        b = per_draw_sq[j][idx].mean(1).sqrt()
        q = torch.quantile((a / b).float(), torch.tensor([0.025, 0.975]))
        return [round(float(v), 4) for v in q]

    for i, r in enumerate(rows):
        if r["family"] != "diffcli":
            continue
        same_nfe = [j for j in peers if rows[j]["nfe_budget"] == r["nfe_budget"]]
        j = best_of(same_nfe)
        if j is not None:
            r["best_peer"] = f"{rows[j]['family']} {rows[j]['sampler']} {rows[j]['schedule']}"
            r["ratio_to_best_peer"] = round(r["rms"] / rows[j]["rms"], 4)
            r["ratio_to_best_peer_ci95"] = interval(i, j)
        k = best_of([j for j in same_nfe if rows[j]["sampler"] in SAME_ALGORITHM.get(r["sampler"], [])])
        if k is not None and untuned(r):
            r["same_algorithm_peer"] = f"{rows[k]['family']} {rows[k]['sampler']} {rows[k]['schedule']}"
            r["ratio_to_same_algorithm"] = round(r["rms"] / rows[k]["rms"], 4)
            r["ratio_to_same_algorithm_ci95"] = interval(i, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=4096, help="evaluation draws (seed 0)")
    ap.add_argument("--select-draws", type=int, default=512, help="draws (seed 1) that pick each peer's options "
                    "and diffcli's tuned grids")
    ap.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples of the evaluation "
                    "draws for the 95%% intervals of the target ratios")
    ap.add_argument("--tune-evals", type=int, default=300, help="Nelder–Mead evaluations of the tuned grids")
    ap.add_argument("--train-draws", type=int, default=4096, help="draws (seed 2) the tuned grids and BNS-style "
                    "solvers learn on (a quarter held out)")
    ap.add_argument("--tune-iters", type=int, default=400)
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--out", default="bench/samplers_accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gm = GaussianMixtureDenoiser.random(k=32, shape=(1, 8, 8), std=0.02, seed=0)
    shape = (1, 8, 8)
    eps = torch.randn(args.draws, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = eps * SMAX
    t0 = time.time()
    with exact_denoiser_calls():
        ref = sample_rk45(gm, x, get_sigmas("karras", 2, SMIN, SMAX), rtol=1e-9, atol=1e-9)
    eps_sel = torch.randn(args.select_draws, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with exact_denoiser_calls():
        ref_sel = sample_rk45(gm, eps_sel * SMAX, get_sigmas("karras", 2, SMIN, SMAX), rtol=1e-9, atol=1e-9)
    print(f"references solved in {time.time() - t0:.1f} s")

    def rms(out) -> float:
        return float((out.double() - ref).pow(2).mean().sqrt())

    def rms_sel(out) -> float:
        return float((out.double() - ref_sel).pow(2).mean().sqrt())

    rows: list[dict] = []
    per_draw_sq: list[Tensor] = []  # row i's per-draw mean squared error (draws,), for the paired bootstrap

    def record(family, name, schedule, nfe, out, true_nfe):
        # per-draw RMS: the row's RMS is carried by the few draws that end on another mixture component (error
        # ~0.5, the distance between components); the median and the count of such draws separate that from
        # the accuracy on the typical draw
        per_draw = (out.double() - ref).pow(2).flatten(1).mean(1).sqrt()
        per_draw_sq.append(per_draw.pow(2))
        rows.append({"family": family, "sampler": name, "schedule": schedule, "nfe_budget": nfe,
                     "nfe": true_nfe, "rms": rms(out), "median_draw_rms": float(per_draw.median()),
                     "draws_off_component": int((per_draw > 0.1).sum())})
        print(f"{family:9s} {name:20s} {schedule:40s} NFE {nfe:3d} ({true_nfe:3d})  RMS {rows[-1]['rms']:.4e}"
              f"  median {rows[-1]['median_draw_rms']:.3e}  off {rows[-1]['draws_off_component']}", flush=True)

    # --- k-diffusion ----------------------------------------------------------------------------------------
    import sys
    import types

    # k_diffusion/__init__ imports its CLIP-based evaluation code, which needs pkg_resources (gone from recent
    # setuptools); the samplers do not use it, so a placeholder module stands in for `clip` here.
    sys.modules.setdefault("clip", types.ModuleType("clip"))
    import k_diffusion.sampling as K

    def kmodel(counter):
        def f(xx, sigma, **kw):
            counter[0] += 1
            return gm(xx.float(), sigma.float()).to(xx.dtype)
        return f

    kcost = {"euler": (lambda n: n, lambda b: b), "heun": (lambda n: 2 * n - 1, lambda b: (b + 1) // 2),
             "lms": (lambda n: n, lambda b: b), "dpmpp_2m": (lambda n: n, lambda b: b)}
    for name, (cost, steps_for) in kcost.items():
        for sched in ("karras", "exponential"):
            for nfe in NFES:
                n = steps_for(nfe)
                sig = (K.get_sigmas_karras(n, SMIN, SMAX, rho=7.0) if sched == "karras"
                       else K.get_sigmas_exponential(n, SMIN, SMAX)).float()
                c = [0]
                out = getattr(K, f"sample_{name}")(kmodel(c), x.float(), sig, disable=True)
                record("k-diff", name, sched, nfe, out, c[0])

    # --- diffusers --------------------------------------------------------------------------------------------
    sweep: list[dict] = []
    peer_grids: list[tuple[str, int, list, dict]] = []
    if not args.no_diffusers:
        t0 = time.time()
        diffusers_peers(gm, eps_sel, rms_sel, eps, record, sweep, peer_grids)
        print(f"diffusers sweep: {len(sweep)} runs in {time.time() - t0:.0f} s")

    # --- diffcli ----------------------------------------------------------------------------------------------
    for name, info in SAMPLER_INFO.items():
        if info.stochastic or info.adaptive:
            continue
        default = info.default_schedule if info.default_schedule != "uniform" else "karras"
        for sched in dict.fromkeys((default, "logsnr", "karras", "logsnr_leading", "logsnr_leading_ms", "logsnr_linspace")):
            for nfe in NFES:
                n = info.steps_for_nfe(nfe)
                c = NFECounter(gm)
                g = get_sigmas(sched, n, SMIN, SMAX)
                out = info.fn(c, eps * g[0], g)  # x = ε·σ_0 (σ_0 < σmax on a leading grid, as in diffusers)
                record("diffcli", name, sched + (" (default)" if sched == default else ""), nfe, out, c.nfe)
    # the same algorithm on the very grid the peer's chosen configuration ran on (its call levels, then the final
    # denoise): what is left between the two is the implementation, not the spacing
    for label, nfe, called, opts in peer_grids:
        name = PEER_SAMPLER.get(label)
        if name is None:
            continue
        g = torch.unique_consecutive(torch.tensor(called, dtype=torch.float64))
        g = torch.cat([g, g.new_zeros(1)])
        variant = {}  # the peer's form of the same method: DPM-Solver++'s solver_type, UniPC's B(h)
        if name in ("dpmpp_2m", "dpmpp_3m"):
            variant = {"solver_type": opts.get("solver_type", "midpoint")}
        elif name == "unipc":
            variant = {"variant": opts.get("solver_type", "bh2")}
        c = NFECounter(gm)
        out = SAMPLER_INFO[name].fn(c, eps * g[0], g, **variant)
        record("diffcli", name, f"peer grid ({label})", nfe, out, c.nfe)
    # ablation: dpmpp_3m without lower_order_final (the step before the final denoise at order 3)
    for nfe in NFES:
        c = NFECounter(gm)
        out = SAMPLER_INFO["dpmpp_3m"].fn(c, x, get_sigmas("logsnr", nfe, SMIN, SMAX), lower_order_final=False)
        record("diffcli", "dpmpp_3m", "logsnr, lower_order_final=False", nfe, out, c.nfe)
    tuned = []
    for name in ("unipc", "dpmpp_3m", "dpmpp_2m"):
        for nfe in (5, 10):
            t0 = time.time()
            sig, rec = tune_grid(gm, name, nfe, SMIN, SMAX, shape, draws=args.train_draws, seed=2,
                                 evals=args.tune_evals, reference_rtol=1e-9, exact=True)
            c = NFECounter(gm)
            out = SAMPLER_INFO[name].fn(c, eps * sig[0], sig)
            record("diffcli", name, "tuned grid (Nelder–Mead)", nfe, out, c.nfe)
            tuned.append({"sampler": name, "label": "tuned grid (Nelder–Mead)", "nfe": nfe,
                          "seconds": round(time.time() - t0, 1), "sigmas": sig.tolist(), **rec})
    for name, coefficients in (("unipc", True), ("unipc", False), ("dpmpp_2m", True)):
        for nfe in (5, 10):
            t0 = time.time()
            solver, rec = tune_solver(gm, name, nfe, SMIN, SMAX, shape, draws=args.train_draws, seed=2,
                                      schedule="logsnr", iters=args.tune_iters, coefficients=coefficients,
                                      reference_rtol=1e-9, exact=True)
            c = NFECounter(gm)
            out = sample_linear_solver(c, x, solver.sigmas, a=solver.a, B=solver.B)
            label = "tuned solver (BNS)" if coefficients else "tuned grid (Adam)"
            record("diffcli", name, label, nfe, out, c.nfe)
            tuned.append({"sampler": name, "label": label, "nfe": nfe, "seconds": round(time.time() - t0, 1),
                          "sigmas": solver.sigmas.tolist(), **rec})
    ratio_intervals(rows, per_draw_sq, args.bootstrap)
    options_tried = {label: sorted({_label(o) for o in grid}) for label, (_, _, grid) in DIFFUSERS.items()}
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "tuned": tuned, "diffusers_options_tried": options_tried, "diffusers_sweep": sweep}, f, indent=0)


if __name__ == "__main__":
    main()
