"""Distillation: exact-answer checks on the Gaussian-mixture oracle, round bookkeeping, the consistency boundary
condition, the guidance target, reflow pairs and straightness, and the CLI end to end on the tiny teacher."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from torch import nn

from diffcli.cli import main as cli_main
from diffcli.denoiser import Denoiser
from diffcli.errors import UserError
from diffcli.distill.common import ddim_step, heun_step
from diffcli.distill.consistency import consistency_loss, ct_scales, karras_levels, l2, pseudo_huber
from diffcli.distill.guidance import guidance_target
from diffcli.distill.progressive import progressive_loss, progressive_target
from diffcli.distill.reflow import make_pairs, straightness
from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.processes import make_process
from diffcli.samplers import get_sigmas

STEPS = ["train.log_every=1", "train.checkpoint_every=2", "train.sample_every=1000", "train.sample_grid=4",
         "train.batch_size=8", "train.device='cpu'"]


class MLP(nn.Module):
    """A small backbone with the UNet's calling convention (x, c_noise, labels), for oracle experiments."""

    def __init__(self, dim: int, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, dim))
        self.register_buffer("freqs", torch.linspace(0.5, 8, 8))

    def forward(self, x, c_noise, labels=None):
        e = c_noise.float()[:, None] * self.freqs
        h = torch.cat([x.flatten(1), e.sin(), e.cos()], 1)
        return self.net(h).reshape(x.shape)


def _fit(student, loss_fn, steps: int, lr: float = 3e-3):
    torch.manual_seed(0)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for i in range(steps):
        loss = loss_fn(torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()


# --- progressive --------------------------------------------------------------------------------------------
def test_progressive_target_is_exactly_two_teacher_steps(gm):
    """One DDIM step with the target x̃ lands exactly where two teacher DDIM steps land (also onto σ'' = 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, *gm.shape, generator=g, dtype=torch.float64) * 3
    for s, m, n in ((3.0, 1.0, 0.3), (1.0, 0.3, 0.0)):
        sig = lambda v: torch.full((64,), v, dtype=torch.float64)
        xt = progressive_target(gm, x, sig(s), sig(m), sig(n))
        one = ddim_step(lambda x_, s_, c_: xt, x, sig(s), sig(n), None)
        two = ddim_step(gm, ddim_step(gm, x, sig(s), sig(m), None), sig(m), sig(n), None)
        assert torch.allclose(one, two, atol=1e-12)


def test_progressive_student_matches_two_teacher_steps_on_held_out_points():
    """Distil the analytic mixture teacher (4 DDIM steps) into a 2-step MLP student: on held-out points one
    student step matches two teacher steps far better than one teacher step does."""
    gm = GaussianMixtureDenoiser.random(k=3, shape=(1, 1, 2), std=0.15, seed=1, spread=0.7)
    proc = make_process("edm", sigma_min=0.02, sigma_max=5.0)
    student = Denoiser(MLP(2, 64), proc, "edm")
    teacher_grid = get_sigmas("karras", 4, 0.02, 5.0)
    oracle = lambda x, s, c=None: gm(x.double(), s.double()).float()

    def loss_fn(g):
        return progressive_loss(student, oracle, gm.sample(128, g).float(), None, teacher_grid, g)

    _fit(student, loss_fn, 400, lr=5e-3)
    g = torch.Generator().manual_seed(999)
    errs, naive = [], []
    for i in range(2):  # the two student steps: σ_0 → σ_2 and σ_2 → σ_4 = 0
        s, m, n = (teacher_grid[2 * i + j].float().expand(512) for j in range(3))
        x = gm.sample(512, g).float() + s[0] * torch.randn(512, *gm.shape, generator=g)
        two = ddim_step(oracle, ddim_step(oracle, x, s, m, None), m, n, None)
        with torch.no_grad():
            one_student = ddim_step(student, x, s, n, None)
        one_teacher = ddim_step(oracle, x, s, n, None)
        errs.append((one_student - two).square().mean().sqrt())
        naive.append((one_teacher - two).square().mean().sqrt())
    # The high-noise step is where two teacher steps differ most from one; the last step (to σ = 0, nearly the
    # posterior mean already) only needs to stay small in absolute terms.
    assert errs[0] < 0.3 * naive[0] and errs[0] < 0.02, (errs, naive)
    assert errs[1] < 0.05, (errs, naive)


def test_progressive_round_bookkeeping(tiny_ckpt):
    from diffcli.checkpoint import load_checkpoint
    from diffcli.distill.progressive import Progressive
    from diffcli.recipes import DistillRecipe

    rec = DistillRecipe.model_validate({"method": "progressive", "train": {"max_steps": 7},
                                        "progressive": {"teacher_steps": 16, "target_steps": 2}})
    m = Progressive(rec, load_checkpoint(tiny_ckpt))
    assert m.rounds == 3 and m.per_round == 3 and m.total_steps() == 9
    assert m.finished_students() == {3: 8, 6: 4, 9: 2}
    notes = []  # 7 steps asked, 9 run: the run says so (it rounded up silently)

    class Eng:
        log = staticmethod(notes.append)

        def load_data(self):
            pass

    m.prepare(Eng())
    assert len(notes) == 1 and "max_steps = 7" in notes[0] and "3 steps a round, 9 in all" in notes[0]
    base = m.base
    for steps in (8, 4, 2):
        sampler, n, grid = m.student_sampling(steps)
        assert sampler == "ddim" and n == steps and len(grid) == steps + 1 and grid[-1] == 0.0
        assert grid == [float(v) for v in base[:: 16 // steps]]  # every other level of the previous teacher


@pytest.mark.parametrize("n,k", [(24, 5), (16, 16), (12, 2), (8, 3)])
def test_progressive_unreachable_target_is_refused(n, k):
    from pydantic import ValidationError

    from diffcli.recipes import ProgressiveConfig

    with pytest.raises(ValidationError, match="not reachable"):
        ProgressiveConfig(teacher_steps=n, target_steps=k)


# --- consistency -----------------------------------------------------------------------------------------------
def test_consistency_boundary_condition_is_exact(tiny_ckpt):
    """f(x, σ_min) = x bit for bit, whatever the (here: perturbed) weights."""
    from diffcli.checkpoint import load_checkpoint
    from diffcli.distill.common import init_student, student_recipe

    ck = load_checkpoint(tiny_ckpt)
    f = init_student(student_recipe(ck.recipe, sampler="consistency", steps=1, parameterization="consistency",
                                    sigma_min=0.002), ck, torch.device("cpu"))
    with torch.no_grad():
        for p in f.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(5, 1, 8, 8) * 0.7
    with torch.no_grad():
        out = f(x, torch.full((5,), f.sigma_min), torch.arange(5))
        assert torch.equal(out, x)
        assert not torch.allclose(f(x, torch.full((5,), 0.01), torch.arange(5)), x, atol=1e-4)


def _gaussian_flow_map(mu: torch.Tensor, s: float, sigma_min: float):
    """Data N(μ, s²I): the probability-flow ODE is x(σ) - μ ∝ sqrt(s² + σ²), so its flow map to σ_min and its
    exact step between two levels are closed forms."""
    def f(x, sigma, cond=None):
        r = ((s**2 + sigma_min**2) / (s**2 + sigma.double() ** 2)).sqrt().reshape(-1, 1, 1, 1)
        return mu + (x - mu) * r

    def step(x, sigma, sigma_next, cond=None):
        r = ((s**2 + sigma_next.double() ** 2) / (s**2 + sigma.double() ** 2)).sqrt().reshape(-1, 1, 1, 1)
        return mu + (x - mu) * r

    def denoiser(x, sigma, cond=None):
        return mu + s**2 / (s**2 + sigma.double().reshape(-1, 1, 1, 1) ** 2) * (x - mu)

    return f, step, denoiser


def test_consistency_distillation_loss_is_zero_for_the_exact_flow_map():
    mu, s, smin = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64).reshape(1, 1, 2, 2), 0.4, 0.002
    f, exact_step, den = _gaussian_flow_map(mu, s, smin)
    g = torch.Generator().manual_seed(0)
    levels = karras_levels(18, smin, 80.0)
    n = torch.randint(0, 17, (256,), generator=g)
    x0 = mu + s * torch.randn(256, 1, 2, 2, generator=g, dtype=torch.float64)
    z = torch.randn(256, 1, 2, 2, generator=g, dtype=torch.float64)
    metric = lambda a, b: pseudo_huber(a, b, 1e-3)
    exact = consistency_loss(f, f, x0, z, levels[n], levels[n + 1], teacher_step=exact_step, metric=metric)
    assert float(exact) < 1e-12
    # With the Heun teacher the loss is the teacher's one-step error: small, and shrinking as the grid refines.
    heun = lambda N: float(consistency_loss(
        f, f, x0, z, karras_levels(N, smin, 80.0)[n % (N - 1)], karras_levels(N, smin, 80.0)[n % (N - 1) + 1],
        teacher_step=lambda x, a, b, c: heun_step(den, x, a, b, c), metric=l2))
    assert heun(80) < heun(18) / 10 and heun(18) < 1e-3
    # A map that is not the flow map has a loss far from zero.
    wrong = lambda x, sigma, cond=None: f(x, sigma) + 0.05 * sigma.double().log().reshape(-1, 1, 1, 1)
    assert float(consistency_loss(wrong, wrong, x0, z, levels[n], levels[n + 1], teacher_step=exact_step,
                                  metric=metric)) > 1e-3


def test_ct_curriculum_doubles_to_the_final_scale():
    ns = [ct_scales(k, 600, 10, 80) for k in range(0, 600, 50)]
    assert ns[0] == 11 and ns[-1] == 81 and ns == sorted(ns)
    assert set(ns) == {11, 21, 41, 81}


def test_ct_lognormal_levels_follow_the_log_normal_mass():
    from diffcli.distill.consistency import karras_levels, level_probabilities

    levels = karras_levels(81, 0.002, 80.0)
    p = level_probabilities(levels, "lognormal", -1.1, 2.0)
    assert float(p.sum()) == pytest.approx(1.0) and bool((p >= 0).all())
    # the mass of log σ ~ N(-1.1, 2²) inside [σ_min, σ_max], split by interval: its mode sits around σ = e^-1.1
    density = p / (levels[1:].log() - levels[:-1].log())
    peak = float(levels[int(density.argmax())])
    assert 0.1 < peak < 1.0
    # the half of the normal above the mean, measured on the grid, is about half of the (truncated) mass
    above = float(p[levels[:-1] >= math.exp(-1.1)].sum())
    assert 0.4 < above < 0.6
    u = level_probabilities(levels, "uniform")
    assert torch.allclose(u, torch.full_like(u, 1 / 80))
    # drawing with torch.multinomial reproduces the probabilities
    n = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(n, minlength=80).double() / 200_000
    assert float((freq - p).abs().max()) < 0.005


# --- guidance ----------------------------------------------------------------------------------------------------
def test_guidance_target_at_w1_is_the_conditional_teacher(gm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, *gm.shape, generator=g, dtype=torch.float64)
    sigma = torch.rand(32, generator=g, dtype=torch.float64) * 2 + 0.05
    y = torch.arange(32) % gm.num_classes
    one = torch.ones(32, dtype=torch.float64)
    assert torch.equal(guidance_target(gm, x, sigma, y, one), gm(x, sigma, y))
    zero = torch.zeros(32, dtype=torch.float64)
    assert torch.allclose(guidance_target(gm, x, sigma, y, zero), gm(x, sigma, None))
    w = torch.full((32,), 3.0, dtype=torch.float64)
    expected = gm(x, sigma, None) + 3 * (gm(x, sigma, y) - gm(x, sigma, None))
    assert torch.allclose(guidance_target(gm, x, sigma, y, w), expected)


def test_guidance_student_starts_as_the_conditional_teacher(tiny_ckpt):
    """The w embedding is zero-initialised: before training the student is the conditional teacher at any w."""
    from diffcli.checkpoint import load_checkpoint
    from diffcli.distill.common import init_student, student_recipe

    ck = load_checkpoint(tiny_ckpt)
    st = init_student(student_recipe(ck.recipe, sampler="heun", steps=4, guidance_embedding=True), ck,
                      torch.device("cpu")).eval()
    x, s, y = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0, 40.0]), torch.arange(4)
    with torch.no_grad():
        assert torch.allclose(st(x, s, y, guidance=torch.full((4,), 3.0)), ck.denoiser(x, s, y), atol=1e-6)


# --- reflow ------------------------------------------------------------------------------------------------------
def test_reflow_pairs_are_reproducible_and_resumable(tiny_ckpt, tmp_path):
    from diffcli.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_ckpt)
    kw = dict(n=6, chunk=4, seed=3, sampler="euler", steps=2, cfg=1.0, device=torch.device("cpu"),
              log=lambda *a: None)
    a = make_pairs(ck.denoiser, 1, 8, folder=tmp_path / "a", **kw)
    b = make_pairs(ck.denoiser, 1, 8, folder=tmp_path / "b", **kw)
    (tmp_path / "b" / "chunk_000004.safetensors").unlink()  # an interrupted run: the last chunk is missing
    c = make_pairs(ck.denoiser, 1, 8, folder=tmp_path / "b", **kw)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)
    assert a[0].shape == (6, 1, 8, 8) and a[2].tolist() == [0, 1, 2, 3, 4, 5]
    other = make_pairs(ck.denoiser, 1, 8, folder=tmp_path / "c", **{**kw, "seed": 4})
    assert not torch.equal(other[0], a[0])


def test_a_reflow_stopped_while_making_pairs_resumes_with_its_own_teacher(tiny_ckpt, tmp_path):
    """Ctrl-C during pair generation left no student, so `--resume` without --teacher had no teacher to name,
    though --help says it defaults to the run's own; and pairs of another teacher would have been reused."""
    from diffcli.checkpoint import file_hash, load_checkpoint
    from diffcli.distill.common import recorded_teacher
    from diffcli.errors import UserError

    ck = load_checkpoint(tiny_ckpt)
    run = tmp_path / "run"
    source = {"teacher": str(tiny_ckpt.resolve()), "teacher_sha256": file_hash(tiny_ckpt)}
    kw = dict(n=4, chunk=4, seed=3, sampler="euler", steps=2, cfg=1.0, device=torch.device("cpu"),
              log=lambda *a: None)
    assert recorded_teacher(run) is None
    make_pairs(ck.denoiser, 1, 8, folder=run / "pairs", source=source, **kw)
    assert recorded_teacher(run) == tiny_ckpt.resolve()
    make_pairs(ck.denoiser, 1, 8, folder=run / "pairs", source=source, **kw)  # same teacher: reused
    with pytest.raises(UserError, match="pairs were made by a teacher with sha256"):
        make_pairs(ck.denoiser, 1, 8, folder=run / "pairs", source={**source, "teacher_sha256": "0" * 64}, **kw)


def test_reflow_straightens_the_oracle_flow():
    """One reflow on pairs from the exact mixture ODE gives trajectories that are much straighter."""
    from diffcli.samplers import SAMPLERS, exact_denoiser_calls

    gm = GaussianMixtureDenoiser.random(k=4, shape=(1, 1, 2), std=0.1, seed=2, spread=0.8)
    smax = 20.0
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2048, 1, 1, 2, generator=g, dtype=torch.float64)
    with exact_denoiser_calls():
        x1 = SAMPLERS["heun"](gm, z * smax, get_sigmas("karras", 40, 0.002, smax))
    proc = make_process("edm", sigma_min=0.002, sigma_max=smax)
    student = Denoiser(MLP(2, 64), proc, "edm", weighting="edm")

    def loss_fn(gen):
        i = torch.randint(0, 2048, (128,), generator=gen)
        return student.loss(x1[i].float(), None, generator=gen, noise=z[i].float()).mean()

    _fit(student, loss_fn, 400, lr=5e-3)
    z_eval = torch.randn(256, 1, 1, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with exact_denoiser_calls():
        before = straightness(gm, z_eval, smax)
    with torch.no_grad():
        after = straightness(student, z_eval.float(), smax)
    assert after < 0.5 * before, (before, after)

    # k-step distillation after the reflow (Liu et al. 2023, Sec. 2.3): pairs from the reflowed flow itself, the
    # student trained only at σ_max; its one Euler step lands closer to the flow's own ODE end than the flow's
    from diffcli.distill.reflow import flow_time_grid

    with torch.no_grad():
        x_flow = SAMPLERS["heun"](student, z.float() * smax, get_sigmas("karras", 40, 0.002, smax)).float()
        x_eval = SAMPLERS["heun"](student, z_eval.float() * smax, get_sigmas("karras", 40, 0.002, smax)).float()
        one_step_flow = SAMPLERS["euler"](student, z_eval.float() * smax, flow_time_grid(1, smax))
    distilled = copy.deepcopy(student)
    level = torch.full((128,), smax)

    def loss_k(gen):
        i = torch.randint(0, 2048, (128,), generator=gen)
        return distilled.loss(x_flow[i], None, generator=gen, noise=z[i].float(), sigma=level).mean()

    _fit(distilled, loss_k, 300, lr=2e-3)
    with torch.no_grad():
        one_step = SAMPLERS["euler"](distilled, z_eval.float() * smax, flow_time_grid(1, smax))
    err_flow = float((one_step_flow - x_eval).square().mean().sqrt())
    err_distilled = float((one_step - x_eval).square().mean().sqrt())
    assert err_distilled < 0.6 * err_flow, (err_flow, err_distilled)


# --- the command line ------------------------------------------------------------------------------------------
def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


RECIPES = {
    "progressive": 'method = "progressive"\n[progressive]\nteacher_steps = 8\ntarget_steps = 2\n',
    "consistency": 'method = "consistency"\n[consistency]\nnum_scales = 6\n',
    "consistency-ct": 'method = "consistency"\n[consistency]\nmode = "ct"\nnum_scales = 12\nct_initial_scales = 3\n',
    "guidance": 'method = "guidance"\n[guidance]\nsteps = 3\nsampler = "euler"\n',
    "reflow": 'method = "reflow"\n[reflow]\nnum_pairs = 12\npair_steps = 2\npair_sampler = "euler"\n'
              'chunk_size = 8\nstraightness_samples = 4\n',
    "reflow-distill": 'method = "reflow"\n[reflow]\nnum_pairs = 12\npair_steps = 2\npair_sampler = "euler"\n'
                      'chunk_size = 8\nstraightness_samples = 4\ndistill_steps = 2\n',
}


@pytest.mark.parametrize("variant", list(RECIPES))
def test_cli_distill_end_to_end(variant, tiny_ckpt, tmp_path, capsys):
    method = variant.split("-")[0]
    rec = _write(tmp_path, f"{variant}.toml", RECIPES[variant])
    out = tmp_path / "run"
    args = ["distill", str(rec), "--teacher", str(tiny_ckpt), "--out", str(out), "--set", "train.max_steps=4"]
    for o in STEPS:
        args += ["--set", o]
    assert cli_main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "distill.json").read_text())
    assert summary["method"] == method and summary["steps"] == 4
    students = sorted((out / "students").glob("steps_*.safetensors"))
    expected = {"progressive": ["steps_002", "steps_004"], "consistency": ["steps_001"], "guidance": ["steps_003"],
                "reflow": ["steps_001"], "reflow-distill": ["steps_002"]}
    expected = expected.get(variant, expected[method])
    assert [p.stem for p in students] == expected
    assert (out / "last.safetensors").exists() and (out / "metrics.csv").exists()
    if method == "reflow":
        assert len(list((out / "pairs").glob("chunk_*.safetensors"))) == 2
        assert summary["straightness_teacher"] > 0 and summary["straightness_flow"] > 0
    if variant == "reflow-distill":  # the flow is kept; its own pairs fed the 2-step distillation
        assert (out / "students" / "flow.safetensors").exists()
        assert len(list((out / "pairs_flow").glob("chunk_*.safetensors"))) == 2
        assert summary["distill_steps"] == 2 and summary["reflow_optimizer_steps"] == 2
    if method == "progressive":  # --resume finds the run's own teacher and recipe (a finished run: nothing to do,
        before = (out / "distill.json").read_bytes()  # and its summary is kept, not replaced by the no-op's)
        assert cli_main(["distill", "--out", str(out), "--resume", "--device", "cpu"]) == 0
        assert (out / "distill.json").read_bytes() == before
    student = students[0]
    sample_out = tmp_path / "samples"
    assert cli_main(["sample", str(student), "--n", "4", "--out", str(sample_out), "--device", "cpu"]) == 0
    info = json.loads((sample_out / "sample.json").read_text())
    meta_grid = json.loads(__import__("diffcli.checkpoint", fromlist=["x"]).read_header(student)[1]["student_sigmas"])
    assert info["sigmas"] == pytest.approx(meta_grid) and info["kind"] == "student"
    assert info["schedule"] == "student"  # the student's own grid, not a named schedule
    nfe = {"progressive": 2, "consistency": 1, "guidance": 3, "reflow": 1, "reflow-distill": 2}
    assert info["nfe"] == nfe.get(variant, nfe[method])
    if method == "progressive":  # off its own grid a progressive student warns (it learned those steps only)
        capsys.readouterr()
        assert cli_main(["sample", str(student), "--n", "2", "--steps", "5", "--out", str(tmp_path / "off"),
                         "--device", "cpu"]) == 0
        assert "progressive student was distilled for 2 ddim steps" in capsys.readouterr().err.replace("\n", " ")
    if method == "consistency":  # the consistency sampler on a model that is not one warns
        capsys.readouterr()
        assert cli_main(["sample", str(tiny_ckpt), "--sampler", "consistency", "--steps", "1", "--n", "2", "--out",
                         str(tmp_path / "cs"), "--device", "cpu"]) == 0
        assert "is for consistency models" in capsys.readouterr().err
    if method == "progressive":  # the student's own sampler and steps, spelled out, keep its grid (eval-fid does so)
        from diffcli.checkpoint import load_checkpoint
        from diffcli.generate import SampleSettings, sigma_grid

        d = load_checkpoint(student).denoiser
        assert sigma_grid(d, SampleSettings(sampler="ddim", steps=2)).tolist() == pytest.approx(meta_grid)
        assert sigma_grid(d, SampleSettings(sampler="ddim", steps=2, schedule="karras")).tolist() != \
            pytest.approx(meta_grid)
    if method == "guidance":  # without --cfg the student samples at the w its recipe records (mid-range)
        from diffcli.checkpoint import load_checkpoint

        w = load_checkpoint(student).recipe.sample.cfg
        assert w != 1.0 and info["cfg"] == w
    if method == "guidance":  # --cfg w on the student: one forward per step
        g_out = tmp_path / "guided"
        assert cli_main(["sample", str(student), "--n", "4", "--cfg", "3", "--out", str(g_out), "--device", "cpu"]) == 0
        info = json.loads((g_out / "sample.json").read_text())
        assert info["network_evaluations"] == info["nfe"] == 3 and info["cfg"] == 3
    if method == "consistency":  # multistep consistency sampling
        m_out = tmp_path / "multi"
        assert cli_main(["sample", str(student), "--sampler", "consistency", "--steps", "2", "--n", "4",
                         "--out", str(m_out), "--device", "cpu"]) == 0
        info = json.loads((m_out / "sample.json").read_text())
        assert info["nfe"] == 2 and len(info["sigmas"]) == 3 and info["sigmas"][1] > 0.002


def test_cli_distill_resume_finds_the_teacher_of_an_interrupted_run(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """An interrupted run has checkpoints but no last.safetensors yet: --resume without --teacher still finds the
    teacher (recorded as an absolute path in every student file), from any working directory."""
    rec = _write(tmp_path, "pd.toml", RECIPES["progressive"])
    (tmp_path / "work").mkdir()
    shutil.copy(tiny_ckpt, tmp_path / "work" / "teacher.safetensors")
    monkeypatch.chdir(tmp_path / "work")
    run = tmp_path / "run"
    sets = [a for o in ["train.checkpoint_every=1"] + STEPS for a in ("--set", o)]
    assert cli_main(["distill", str(rec), "--teacher", "teacher.safetensors", "--out", str(run), "--device", "cpu",
                     "--max-steps", "4", "--set", "train.max_minutes=1e-9", *sets]) == 0, capsys.readouterr().err
    assert "max_steps = 4" in (run / "recipe.toml").read_text()  # --max-steps, as train takes it
    (run / "last.safetensors").unlink()  # what SIGINT leaves: the checkpoint and its state, no final files
    (run / "distill.json").unlink()
    (run / "recipe.toml").write_text((run / "recipe.toml").read_text().replace("max_minutes = 1e-09\n", ""))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["distill", "--out", str(run), "--resume", "--device", "cpu"]) == 0, capsys.readouterr().err
    summary = json.loads((run / "distill.json").read_text())
    assert summary["steps"] == 4 and summary["teacher"] == str((tmp_path / "work" / "teacher.safetensors"))
    assert summary["last_loss"] is not None and summary["seconds"] > 0


def test_progressive_resume_is_bit_exact_across_a_round(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file

    from diffcli.distill.common import distill
    from diffcli.recipes import load_distill_recipe

    rec = _write(tmp_path, "pd.toml", RECIPES["progressive"])
    over = ["train.max_steps=4"] + STEPS
    quiet = dict(log=lambda *a, **k: None, show_progress=False)
    distill(load_distill_recipe(rec, over), tiny_ckpt, tmp_path / "straight", **quiet)
    distill(load_distill_recipe(rec, over + ["train.max_minutes=1e-9"]), tiny_ckpt, tmp_path / "resumed", **quiet)
    assert not (tmp_path / "resumed" / "students" / "steps_002.safetensors").exists()
    distill(load_distill_recipe(rec, over), tiny_ckpt, tmp_path / "resumed", resume=True, **quiet)
    other = tmp_path / "other_teacher.safetensors"  # same weights, other file contents: a different teacher
    from diffcli.checkpoint import read_safetensors, save_safetensors

    tensors, meta = read_safetensors(tiny_ckpt)
    save_safetensors(other, tensors, {**meta, "step": "999"})
    with pytest.raises(UserError, match="resume with the run's own teacher"):
        distill(load_distill_recipe(rec, over), other, tmp_path / "resumed", resume=True, **quiet)
    a = load_file(str(tmp_path / "straight" / "students" / "steps_002.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "students" / "steps_002.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_keeps_the_run_and_its_teacher(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """--force never deletes the teacher it is about to read; a progressive resume keeps the budget its rounds
    were cut from; a run stopped before its first checkpoint (recipe.toml and teacher.json only) resumes
    without --teacher."""
    rec = _write(tmp_path, "pd.toml", RECIPES["progressive"])
    run = tmp_path / "pd"
    base = ["--out", str(run), "--device", "cpu", *[a for o in STEPS for a in ("--set", o)]]
    assert cli_main(["distill", str(rec), "--teacher", str(tiny_ckpt), "--max-steps", "4", *base]) == 0
    capsys.readouterr()
    students = sorted((run / "students").iterdir())
    assert cli_main(["distill", str(rec), "--teacher", str(run / "last.safetensors"), "--force", *base]) == 2
    err = capsys.readouterr().err
    assert "inside --out" in err and len(err.strip().splitlines()) == 1
    assert sorted((run / "students").iterdir()) == students and (run / "last.safetensors").is_file()
    # a budget of 6 would cut the 2 rounds 3 + 3 where the run trained 2 + 2
    assert cli_main(["distill", "--out", str(run), "--resume", "--max-steps", "6", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps = 4" in err and "(given 6)" in err
    for f in ("checkpoints", "students", "samples", "last.safetensors", "distill.json", "metrics.csv"):
        p = run / f
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    monkeypatch.chdir(tmp_path)
    assert cli_main(["distill", "--out", str(run), "--resume", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert json.loads((run / "distill.json").read_text())["teacher"] == str(tiny_ckpt)


def test_reflow_distillation_resumes_bit_exact_from_the_phase_boundary(tiny_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from diffcli.distill.common import distill
    from diffcli.recipes import load_distill_recipe

    rec = _write(tmp_path, "rf.toml", RECIPES["reflow-distill"])
    over = ["train.max_steps=4"] + STEPS
    quiet = dict(log=lambda *a, **k: None, show_progress=False)
    distill(load_distill_recipe(rec, over), tiny_ckpt, tmp_path / "straight", **quiet)
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", run)
    # as if killed right after the reflow phase's last checkpoint: later states, students and a pair chunk gone
    for p in list((run / "checkpoints").glob("step_0000004*")) + [run / "last.safetensors",
                                                                   run / "students" / "steps_002.safetensors",
                                                                   run / "pairs_flow" / "chunk_000008.safetensors"]:
        p.unlink()
    distill(load_distill_recipe(rec, over), tiny_ckpt, run, resume=True, **quiet)
    for name in ("students/steps_002.safetensors", "students/flow.safetensors", "pairs_flow/chunk_000008.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(run / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_progressive_stage_two_on_a_guidance_distilled_teacher(tiny_ckpt, tmp_path, capsys):
    """Meng et al. 2023, stage two: progressive distillation of a w-conditioned student keeps the w input, and
    the few-step student samples at any --cfg w with one forward per step."""
    from diffcli.checkpoint import load_checkpoint
    from diffcli.distill.common import distill
    from diffcli.distill.progressive import progressive_target
    from diffcli.recipes import load_distill_recipe

    quiet = dict(log=lambda *a, **k: None, show_progress=False)
    g_rec = _write(tmp_path, "g.toml", RECIPES["guidance"] + "w_min = 1.5\nw_max = 3.0\n")
    distill(load_distill_recipe(g_rec, ["train.max_steps=2"] + STEPS), tiny_ckpt, tmp_path / "g", **quiet)
    guided = tmp_path / "g" / "last.safetensors"
    p_rec = _write(tmp_path, "p.toml", RECIPES["progressive"])
    summary = distill(load_distill_recipe(p_rec, ["train.max_steps=4"] + STEPS), guided, tmp_path / "p", **quiet)
    assert summary["w_range"] == [1.5, 3.0]
    student = load_checkpoint(tmp_path / "p" / "last.safetensors")
    assert student.denoiser.guidance_input
    # w reaches the teacher: the target at w = 3 differs from the one at w = 1.5
    t = load_checkpoint(guided).denoiser
    with torch.no_grad():  # make the (zero-initialised) w embedding matter
        for p in t.net.map_guidance.parameters():
            p.add_(0.1)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([2.0, 2.0])
    targets = [progressive_target(lambda a, b, c=None: t(a, b, c, guidance=torch.full((2,), w)), x, s, s / 2,
                                  s / 4, torch.tensor([1, 2])) for w in (1.5, 3.0)]
    assert not torch.allclose(*targets)
    out = tmp_path / "samples"
    assert cli_main(["sample", str(tmp_path / "p" / "last.safetensors"), "--n", "2", "--cfg", "2.5", "--out",
                     str(out), "--device", "cpu"]) == 0
    info = json.loads((out / "sample.json").read_text())
    assert info["network_evaluations"] == info["nfe"] == 2
    # both students record the w range; --cfg outside it warns, --cfg-interval (two-pass CFG only) is refused
    from diffcli.checkpoint import read_header

    for ck in (guided, tmp_path / "p" / "last.safetensors"):
        assert json.loads(read_header(ck)[1]["guidance_w_range"]) == [1.5, 3.0]
    capsys.readouterr()
    assert cli_main(["sample", str(tmp_path / "p" / "last.safetensors"), "--n", "2", "--cfg", "6", "--out",
                     str(tmp_path / "far"), "--device", "cpu"]) == 0
    assert "outside the w range [1.5, 3]" in capsys.readouterr().err.replace("\n", " ")
    assert cli_main(["sample", str(guided), "--n", "2", "--cfg", "2", "--cfg-interval", "0,1", "--out",
                     str(tmp_path / "interval"), "--device", "cpu"]) == 2
    assert "--cfg-interval 0,1" in capsys.readouterr().err and not (tmp_path / "interval").exists()
    with pytest.raises(UserError, match="takes no guidance scale"):
        distill(load_distill_recipe(p_rec, ["train.max_steps=4", "progressive.w_min=1"] + STEPS), tiny_ckpt,
                tmp_path / "bad", **quiet)


def _unconditional_teacher(tmp_path, tiny_recipe_path):
    from diffcli.checkpoint import build_denoiser, save_denoiser
    from diffcli.recipes import load_recipe

    r = load_recipe(tiny_recipe_path, ["data.class_conditional=false", "train.p_uncond=0"])
    d = build_denoiser(r, 1, 8, 0)
    p = tmp_path / "uncond.safetensors"
    save_denoiser(p, d, r, step=0, channels=1, resolution=8)
    return p


def test_cli_distill_bad_input_exits_2(tiny_run, tiny_ckpt, tiny_recipe_path, tmp_path, capsys):
    def run(recipe_text, teacher=tiny_ckpt, name="r.toml"):
        rec = _write(tmp_path, name, recipe_text)
        rc = cli_main(["distill", str(rec), "--teacher", str(teacher), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        return rc, err

    state = next((tiny_run / "checkpoints").glob("*.state.safetensors"))
    cases = [
        (RECIPES["consistency"], state, "a denoiser or student is needed"),
        (RECIPES["guidance"], _unconditional_teacher(tmp_path, tiny_recipe_path), "class-conditional teacher"),
        ('method = "progressive"\n[progressive]\nteacher_steps = 12\ntarget_steps = 1\n', tiny_ckpt, "not reachable"),
        ('method = "progressive"\n[consistency]\nnum_scales = 6\n', tiny_ckpt, "keys of method 'consistency'"),
        ('method = "reflow"\n[reflow]\nnum_scales = 6\n', tiny_ckpt, "unknown key reflow.num_scales"),
        ('method = "guidance"\n[guidance]\nw_min = 3\nw_max = 1\n', tiny_ckpt, "w_min"),
    ]
    for text, teacher, msg in cases:
        rc, err = run(text, teacher)
        assert rc == 2 and err.startswith("error:") and msg in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing written on bad input
    rc = cli_main(["train", str(_write(tmp_path, "d.toml", RECIPES["progressive"]))])
    assert rc == 2 and "diffcli distill" in capsys.readouterr().err


def test_ctrl_c_while_reflow_makes_its_pairs_says_how_to_resume(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Before the first training step (reflow's pair generation) Ctrl-C printed a bare `error: interrupted`;
    now exit 130 with the resume command, and the resume without --teacher finds the pairs' teacher."""
    from diffcli.distill import reflow

    rec = _write(tmp_path, "rf.toml", RECIPES["reflow"])
    run = tmp_path / "run"
    sets = [a for o in ["train.max_steps=2"] + STEPS for a in ("--set", o)]
    made = reflow.make_pairs

    def stop_after_the_pairs(*a, **k):
        made(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(reflow, "make_pairs", stop_after_the_pairs)
    rc = cli_main(["distill", str(rec), "--teacher", str(tiny_ckpt), "--out", str(run), *sets])
    err = capsys.readouterr().err
    assert rc == 130 and "while preparing the reflow run" in err and "--resume" in err, err
    assert [ln for ln in err.splitlines() if ln.startswith("error: ")] == [err.strip().splitlines()[-1]]
    monkeypatch.setattr(reflow, "make_pairs", made)
    assert cli_main(["distill", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert json.loads((run / "distill.json").read_text())["teacher"] == str(tiny_ckpt.resolve())


def test_students_are_the_runs_own_and_force_removes_them_all(tiny_ckpt, tmp_path, capsys):
    """distill.json lists the students the run wrote, not a user's files beside them; --force removes every
    student the earlier run made (a reflow's flow.safetensors too) and keeps the user's files."""
    run = tmp_path / "run"
    sets = [a for o in ["train.max_steps=4"] + STEPS for a in ("--set", o)]
    rf = _write(tmp_path, "rf.toml", RECIPES["reflow-distill"])
    assert cli_main(["distill", str(rf), "--teacher", str(tiny_ckpt), "--out", str(run), *sets]) == 0
    assert json.loads((run / "distill.json").read_text())["students"] == ["students/flow.safetensors",
                                                                          "students/steps_002.safetensors"]
    (run / "students" / "my_notes.txt").write_text("mine")
    shutil.copy(run / "students" / "steps_002.safetensors", run / "students" / "keep_me.safetensors")
    pd = _write(tmp_path, "pd.toml", RECIPES["progressive"])
    assert cli_main(["distill", str(pd), "--teacher", str(tiny_ckpt), "--out", str(run), "--force", *sets]) == 0
    summary = json.loads((run / "distill.json").read_text())
    assert summary["students"] == ["students/steps_002.safetensors", "students/steps_004.safetensors"]
    assert sorted(p.name for p in (run / "students").iterdir()) == ["keep_me.safetensors", "my_notes.txt",
                                                                    "steps_002.safetensors", "steps_004.safetensors"]
    table = capsys.readouterr().out
    assert "keep_me" not in table and "flow.safetensors" not in table


@pytest.mark.parametrize("method", ["consistency", "reflow"])
def test_a_guidance_student_as_teacher_is_refused_before_anything_is_written(method, tiny_ckpt, tmp_path, capsys):
    from diffcli.distill.common import distill
    from diffcli.recipes import load_distill_recipe

    g_rec = _write(tmp_path, "g.toml", RECIPES["guidance"])
    distill(load_distill_recipe(g_rec, ["train.max_steps=2"] + STEPS), tiny_ckpt, tmp_path / "g",
            log=lambda *a, **k: None, show_progress=False)
    rec = _write(tmp_path, "m.toml", RECIPES[method])
    out = tmp_path / "o"
    rc = cli_main(["distill", str(rec), "--teacher", str(tmp_path / "g" / "last.safetensors"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "guidance-distilled student" in err and "progressive" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_distill_stopped_between_log_rows_resumes_into_the_same_rows(tiny_ckpt, tmp_path):
    """As for train: the stop's own row is dropped on resume and its loss window goes on."""
    import csv

    from diffcli.distill.common import distill
    from diffcli.recipes import load_distill_recipe

    rec = _write(tmp_path, "cd.toml", RECIPES["consistency"])
    over = STEPS + ["train.max_steps=6", "train.log_every=3", "train.checkpoint_every=6"]
    quiet = dict(log=lambda *a, **k: None, show_progress=False)
    distill(load_distill_recipe(rec, over), tiny_ckpt, tmp_path / "straight", **quiet)
    distill(load_distill_recipe(rec, over + ["train.max_minutes=1e-9"]), tiny_ckpt, tmp_path / "resumed", **quiet)
    distill(load_distill_recipe(rec, over), tiny_ckpt, tmp_path / "resumed", resume=True, **quiet)

    def losses(run):
        with open(run / "metrics.csv") as f:
            return [(r["step"], r["loss"]) for r in csv.DictReader(f)]

    assert [s for s, _ in losses(tmp_path / "straight")] == ["3", "6"]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_sigterm_while_reflow_makes_its_pairs_stops_between_chunks(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """SIGTERM (as SIGINT) during pair generation ends it after the chunk in hand: exit 143 with the resume
    command; the resumed run makes only the missing chunk."""
    import os
    import signal

    from diffcli.distill import reflow

    rec = _write(tmp_path, "rf.toml", RECIPES["reflow"])
    run = tmp_path / "run"
    sets = [a for o in ["train.max_steps=2"] + STEPS for a in ("--set", o)]
    made = reflow.generate

    def then_sigterm(*a, **k):
        out = made(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(reflow, "generate", then_sigterm)
    rc = cli_main(["distill", str(rec), "--teacher", str(tiny_ckpt), "--out", str(run), *sets])
    err = capsys.readouterr().err
    assert rc == 143 and "while preparing the reflow run" in err and "--resume" in err, err
    assert [p.name for p in (run / "pairs").glob("chunk_*.safetensors")] == ["chunk_000000.safetensors"]
    monkeypatch.setattr(reflow, "generate", made)
    assert cli_main(["distill", "--out", str(run), "--resume"]) == 0, capsys.readouterr().err
    assert len(list((run / "pairs").glob("chunk_*.safetensors"))) == 2
