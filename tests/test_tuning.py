"""Learned (BNS-style) solvers: exact linear form of every deterministic sampler, held-out gains on the analytic
oracle, and the sidecar round trip through `diffcli sample --tune-schedule` / `--schedule tuned`."""

from __future__ import annotations

import json

import pytest
import torch

from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.samplers import SAMPLERS, exact_denoiser_calls, get_sigmas, sample_rk45
from diffcli.tuning import load_tuned_solver, sample_linear_solver, solver_coefficients, tune_solver


@pytest.fixture(scope="module")
def gm():
    return GaussianMixtureDenoiser.random(k=8, shape=(1, 2, 2), std=0.05, seed=2)


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"])
@pytest.mark.parametrize("schedule", ["logsnr", "karras"])
def test_solver_coefficients_reproduce_the_sampler(name, schedule, gm):
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    g = get_sigmas(schedule, 6, 0.002, 80.0)
    lin = solver_coefficients(name, g)
    assert float(lin.a[0]) == 1.0 and bool((lin.B.triu() == 0).all())
    with exact_denoiser_calls():
        want = SAMPLERS[name](gm, x, g)
        got = sample_linear_solver(gm, x, lin.sigmas, a=lin.a, B=lin.B)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)


def test_tuned_solver_beats_its_start_on_held_out_noise(gm):
    solver, rec = tune_solver(gm, "dpmpp_2m", 5, 0.002, 80.0, (1, 2, 2), draws=256, seed=3, schedule="logsnr",
                              iters=60, reference_rtol=1e-8, exact=True)
    assert rec["rms_after"] < rec["rms_before"]
    assert solver.nfe == 5 and float(solver.sigmas[0]) == pytest.approx(80.0) and float(solver.sigmas[-1]) == 0.0
    x = torch.randn(128, 1, 2, 2, generator=torch.Generator().manual_seed(99), dtype=torch.float64) * 80
    with exact_denoiser_calls():
        ref = sample_rk45(gm, x, get_sigmas("karras", 2, 0.002, 80.0), rtol=1e-9, atol=1e-9)
        base = SAMPLERS["dpmpp_2m"](gm, x, get_sigmas("logsnr", 5, 0.002, 80.0))
        tuned = sample_linear_solver(gm, x, solver.sigmas, a=solver.a, B=solver.B)

    def rms(o):
        return float((o - ref).pow(2).mean().sqrt())

    assert rms(tuned) < 0.9 * rms(base), (rms(tuned), rms(base))


def test_tune_schedule_cli_stores_a_solver_and_schedule_tuned_reuses_it(tiny_ckpt, tmp_path, capsys):
    import shutil

    from diffcli.cli import main
    from diffcli.samplers import tuned_schedule_path
    from diffcli.tuning import save_tuned_solver

    ck = tmp_path / "model.safetensors"
    shutil.copy(tiny_ckpt, ck)
    common = ["--sampler", "unipc", "--nfe", "4", "--n", "3", "--device", "cpu"]
    assert main(["sample", str(ck), *common, "--tune-schedule", "--tune-method", "bns", "--tune-draws", "16",
                 "--tune-iters", "3", "--out", str(tmp_path / "a")]) == 0
    side = tuned_schedule_path(ck)
    grid, solver = load_tuned_solver(side, "unipc", 4)
    assert solver is not None and tuple(solver.B.shape) == (5, 4)
    assert main(["sample", str(ck), *common, "--schedule", "tuned", "--out", str(tmp_path / "b")]) == 0
    rec_a = json.loads((tmp_path / "a" / "sample.json").read_text())
    rec_b = json.loads((tmp_path / "b" / "sample.json").read_text())
    assert rec_b["schedule"] == "tuned" and rec_b["tuned_solver"] is True and rec_b["nfe"] == 4
    assert rec_a["sigmas"] == rec_b["sigmas"] == [float(v) for v in grid]
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    # a grid-only entry (older diffcli) still loads and runs the sampler's own rule on it
    save_tuned_solver(side, "dpmpp_2m", 4, get_sigmas("karras", 4, 0.002, 80.0), {"rms_after": 0.1})
    assert main(["sample", str(ck), "--sampler", "dpmpp_2m", "--nfe", "4", "--schedule", "tuned", "--n", "2",
                 "--device", "cpu", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "sample.json").read_text())["tuned_solver"] is False
    # the default method fits the grid alone and replaces the learned solver stored under the same key
    assert main(["sample", str(ck), *common, "--tune-schedule", "--tune-draws", "16", "--tune-iters", "8",
                 "--out", str(tmp_path / "d")]) == 0
    said = capsys.readouterr()
    said = said.out + said.err  # a long fit says what it does and how long it will take, then how it goes
    assert "reference solve of 16 draws" in said and "8 grid evaluations" in said and "evaluation 8/8" in said
    grid_d, solver_d = load_tuned_solver(side, "unipc", 4)
    rec_d = json.loads((tmp_path / "d" / "sample.json").read_text())
    assert solver_d is None and rec_d["tuned_solver"] is False and rec_d["nfe"] == 4
    assert rec_d["sigmas"] == [float(v) for v in grid_d]
    assert main(["sample", str(ck), *common, "--schedule", "tuned", "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "d" / "grid.png").read_bytes() == (tmp_path / "e" / "grid.png").read_bytes()
    # a quick re-fit (one evaluation: the start grid) does not replace the better grid stored before
    capsys.readouterr()
    kept = side.read_bytes()
    assert main(["sample", str(ck), *common, "--tune-schedule", "--tune-draws", "16", "--tune-iters", "1",
                 "--out", str(tmp_path / "f")]) == 0
    said = capsys.readouterr()
    assert side.read_bytes() == kept and "stored before is better" in said.out + said.err
    assert json.loads((tmp_path / "f" / "sample.json").read_text())["sigmas"] == rec_d["sigmas"]
    capsys.readouterr()


def test_tune_schedule_bad_input_exits_2_with_one_line(tiny_ckpt, tmp_path, capsys):
    import shutil

    from diffcli.checkpoint import read_safetensors, save_safetensors
    from diffcli.cli import main
    from diffcli.samplers import tuned_schedule_path

    ck = tmp_path / "model.safetensors"
    shutil.copy(tiny_ckpt, ck)
    base = ["sample", str(ck), "--sampler", "unipc", "--nfe", "4", "--n", "2", "--device", "cpu"]
    cases = [(["--tune-schedule", "--tune-draws", "4"], "--tune-draws"),
             (["--tune-schedule", "--tune-method", "adam"], "--tune-method 'adam'"),
             (["--tune-schedule", "--tune-iters", "0"], "--tune-iters")]
    side = tuned_schedule_path(ck)
    for args, needle in cases:
        rc = main([*base, *args, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    # a damaged sidecar entry: coefficients that do not fit the grid
    save_safetensors(side, {"unipc/steps4": get_sigmas("logsnr", 4, 0.002, 80.0),
                            "unipc/steps4/a": torch.ones(3, dtype=torch.float64),
                            "unipc/steps4/B": torch.zeros(5, 4, dtype=torch.float64)}, {"kind": "schedules"})
    assert read_safetensors(side)[1]["kind"] == "schedules"
    rc = main([*base, "--schedule", "tuned", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "unipc/steps4" in err and len(err.strip().splitlines()) == 1, err


def test_a_tuned_grid_serves_only_its_checkpoint_and_guidance_scale(tiny_ckpt, tmp_path, capsys):
    """A retrained or replaced checkpoint keeps its file name and so its sidecar; the grid fitted to the old
    weights (or at another --cfg) was reused without a word. Now exit 2, one line, naming what differs."""
    import shutil

    from diffcli.checkpoint import read_safetensors, save_safetensors
    from diffcli.cli import main
    from diffcli.samplers import tuned_schedule_path

    ck = tmp_path / "model.safetensors"
    shutil.copy(tiny_ckpt, ck)
    common = ["--sampler", "unipc", "--nfe", "4", "--n", "2", "--device", "cpu"]
    assert main(["sample", str(ck), *common, "--tune-schedule", "--tune-draws", "8", "--tune-iters", "4",
                 "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    side = tuned_schedule_path(ck)
    tensors, meta = read_safetensors(side)
    # another guidance scale
    rc = main(["sample", str(ck), *common, "--schedule", "tuned", "--cfg", "2", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "tuned at --cfg 1, not 2" in err, err
    # other weights under the same name: the recorded hash no longer matches
    save_safetensors(side, tensors, {**meta, "unipc/steps4:checkpoint_sha256": "0" * 64})
    rc = main(["sample", str(ck), *common, "--schedule", "tuned", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "another checkpoint" in err and "--tune-schedule" in err
    assert not (tmp_path / "c" / "sample.json").exists()
