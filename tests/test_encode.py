"""diffcli.encode: ODE inversion, latents, likelihood — against the Gaussian-mixture oracle's exact answers —
and `diffcli encode` end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from diffcli.encode import (LOG2_BIN, ODESpec, bits_per_dim, decode, dequantize, encode, gaussian_log_prob,
                            invert_final_step, log_likelihood, slerp)
from diffcli.oracle import GaussianMixtureDenoiser

from conftest import run_cli


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt())


def _samples(gm, n: int, seed: int = 1) -> torch.Tensor:
    return gm.sample(n, torch.Generator().manual_seed(seed))


# --- round trip ---------------------------------------------------------------------------------------------
def test_final_step_inverts_the_decoders_last_step(gm):
    """The encoder's start x(σ_min) is what the decoder's last step D(·, σ_min) maps back onto the input."""
    x0 = _samples(gm, 32)
    x, calls, res = invert_final_step(lambda x, s: gm(x, s), x0, gm.sigma_min)
    assert res < 1e-6 and calls <= 4
    assert _rms(gm(x, torch.full((32,), gm.sigma_min)), x0) < 1e-6
    assert _rms(x, x0) > 1e-7  # it did move: x(σ_min) ≠ x0


@pytest.mark.parametrize("solver,steps", [("unipc", 50), ("heun", 80)])
def test_round_trip_rms_below_1e_4(gm, solver, steps):
    x0 = _samples(gm, 64)
    spec = ODESpec(solver=solver, steps=steps, schedule="logsnr" if solver == "unipc" else "karras")
    e = encode(gm, x0, spec)
    y, nfe = decode(gm, e.latents, spec)
    assert _rms(y, x0) < 1e-4
    assert nfe == {"unipc": 50, "heun": 159}[solver]


def test_round_trip_error_falls_with_order_and_nfe(gm):
    x0 = _samples(gm, 64)
    errs = {}
    for solver in ("ddim", "heun"):
        for steps in (10, 20, 40, 80):
            spec = ODESpec(solver=solver, steps=steps)
            y, _ = decode(gm, encode(gm, x0, spec).latents, spec)
            errs[solver, steps] = _rms(y, x0)
    for solver, rate in (("ddim", 1.6), ("heun", 3.0)):  # order 1 halves the error per doubling, order 2 quarters
        assert errs[solver, 10] / errs[solver, 20] > rate
        assert errs[solver, 20] / errs[solver, 40] > rate
    for steps in (10, 20, 40):  # at equal NFE (heun pays 2 per level) the 2nd-order solver still wins
        assert errs["heun", steps] < errs["ddim", 2 * steps]


def test_rk45_tolerance_controls_the_round_trip(gm):
    x0 = _samples(gm, 32)
    out = []
    for rtol in (1e-3, 1e-6):
        spec = ODESpec(solver="rk45", steps=2, options={"rtol": rtol, "atol": rtol})
        y, _ = decode(gm, encode(gm, x0, spec).latents, spec)
        out.append(_rms(y, x0))
    assert out[1] < 1e-4 and out[1] < out[0] / 10


def test_rk45_latents_do_not_depend_on_the_batch(gm):
    """An adaptive solve steps by the error of what it integrates, so each image is solved alone."""
    x0 = _samples(gm, 3)
    spec = ODESpec(solver="rk45", steps=2, options={"rtol": 1e-4, "atol": 1e-4})
    together = encode(gm, x0, spec).latents
    alone = torch.cat([encode(gm, x0[i:i + 1], spec).latents for i in range(3)])
    assert torch.equal(together, alone)
    assert torch.equal(decode(gm, together, spec)[0], torch.cat([decode(gm, alone[i:i + 1], spec)[0] for i in range(3)]))


def test_latents_of_mixture_samples_are_standard_normal(gm):
    from scipy import stats

    n = 2000
    x0 = _samples(gm, n, seed=7)
    e = encode(gm, x0, ODESpec(solver="unipc", steps=25, schedule="logsnr"))
    eps = (e.latents / gm.sigma_max).flatten(1)
    d = eps.shape[1]
    assert eps.mean(0).abs().max() < 4 / math.sqrt(n)
    cov = torch.cov(eps.T)
    assert (cov - torch.eye(d, dtype=cov.dtype)).abs().max() < 5 * math.sqrt(2 / n)
    for j in range(d):
        assert stats.kstest(eps[:, j].numpy(), "norm").pvalue > 1e-3
    # and the data themselves are far from N(0, I): the test can tell
    assert (torch.cov(x0.flatten(1).T) - torch.eye(d, dtype=torch.float64)).abs().max() > 0.5


def test_class_conditional_round_trip(gm):
    cond = torch.full((32,), 2, dtype=torch.long)
    x0 = gm.sample(32, torch.Generator().manual_seed(3), cond=cond)
    spec = ODESpec(solver="unipc", steps=50, schedule="logsnr")
    e = encode(gm, x0, spec, cond=cond)
    y, _ = decode(gm, e.latents, spec, cond=cond)
    assert _rms(y, x0) < 1e-4
    e0 = encode(gm, x0, spec)  # the unconditional path is another bijection
    assert _rms(e0.latents, e.latents) > 1e-2


def test_slerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a.double()) and torch.allclose(slerp(a, b, 1.0), b.double())
    u = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([[0.0, 1.0]])
    mid = slerp(u, v, 0.5)
    assert torch.allclose(mid, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]], dtype=torch.float64))
    assert torch.allclose(slerp(u, u, 0.3), u.double())  # parallel: no division by zero


# --- likelihood ---------------------------------------------------------------------------------------------
def test_nll_exact_divergence_matches_the_mixture_density():
    gm = GaussianMixtureDenoiser.random(k=4, shape=(1, 4, 4), std=0.1, seed=0)
    x0 = _samples(gm, 16)
    exact = gm.log_prob(x0, 0.0)
    assert exact.abs().min() > 1.0  # so that "within 1%" means something
    L = log_likelihood(gm, x0, ODESpec(solver="unipc", steps=80, schedule="logsnr"), exact=True)
    assert ((L.log_prob - exact).abs() / exact.abs()).max() < 0.01
    # like with like: the ODE part alone, with the exact density at σ_max in place of the N(0, σ_max² I) prior,
    # must give the exact log p_σmin at the start of the path (a tight tolerance needs a tight solver)
    spec = ODESpec(solver="rk45", steps=2, options={"rtol": 1e-7, "atol": 1e-7})
    R = log_likelihood(gm, x0[:4], spec, exact=True)
    e = encode(gm, x0[:4], spec)
    ode_part = R.log_prob_sigma_min - gaussian_log_prob(R.latents, gm.sigma_max) + gm.log_prob(R.latents, gm.sigma_max)
    assert (ode_part - gm.log_prob(e.x_sigma_min, gm.sigma_min)).abs().max() < 1e-4
    assert (L.se == 0).all() and L.exact


def test_rk45_likelihood_does_not_depend_on_the_batch(gm):
    """As for the latents: each image's augmented ODE is solved alone, so bits/dim do not move with --batch-size."""
    x0 = _samples(gm, 3)
    spec = ODESpec(solver="rk45", steps=2, options={"rtol": 1e-4, "atol": 1e-4})
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731 — fresh per call
    together = log_likelihood(gm, x0, spec, probes=2, generators=gens())
    alone = [log_likelihood(gm, x0[i:i + 1], spec, probes=2, generators=gens()[i:i + 1]) for i in range(3)]
    assert torch.equal(together.log_prob, torch.cat([a.log_prob for a in alone]))
    assert torch.equal(together.per_probe, torch.cat([a.per_probe for a in alone]))
    assert together.nfe == max(a.nfe for a in alone)


def test_nll_converges_with_nfe(gm):
    x0 = _samples(gm, 8)
    exact = gm.log_prob(x0, 0.0)
    errs = [float((log_likelihood(gm, x0, ODESpec("heun", n), exact=True).log_prob - exact).abs().max())
            for n in (20, 40)]
    assert errs[1] < errs[0] / 2.5


def test_hutchinson_is_unbiased(gm):
    x0 = _samples(gm, 2, seed=5)
    spec = ODESpec(solver="unipc", steps=40, schedule="logsnr")
    exact = log_likelihood(gm, x0, spec, exact=True).log_prob
    gens = [torch.Generator().manual_seed(100 + i) for i in range(2)]
    H = log_likelihood(gm, x0, spec, probes=256, generators=gens)
    assert H.per_probe.shape == (2, 256)
    assert (H.se > 0).all()
    assert ((H.log_prob - exact).abs() < 3 * H.se).all()
    # the estimator does vary with the probes (else "unbiased" would be trivially true)
    assert (H.per_probe.std(1) > 1e-3).all()


def test_dequantization_and_bits_per_dim():
    x = torch.tensor([[[[-1.0, 1.0], [0.0, 127 / 127.5 - 1]]]])
    gens = [torch.Generator().manual_seed(0)]
    xq = dequantize(x, gens)
    assert ((xq - x.double()).abs() <= 1 / 255 + 1e-12).all() and not torch.equal(xq, x.double())
    # a uniform density on [-1, 1]^D, log p = -D log 2, is 1 bit/dim in [-1, 1] units: 8 bits at 8-bit scale
    # with a bin of 2/255: log2(255) = 1 + log2(127.5)
    d = 4
    assert float(bits_per_dim(torch.tensor([-d * math.log(2)]), d)) == pytest.approx(1 + LOG2_BIN)
    assert 1 + LOG2_BIN == pytest.approx(math.log2(255))


# --- CLI end to end -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> Path:
    from diffcli.data import digits_arrays
    from diffcli.images import save_png

    folder = tmp_path_factory.mktemp("digits_png")
    x, _ = digits_arrays("test")
    for i in range(3):
        save_png(folder / f"d{i}.png", torch.from_numpy(x[i]))
    return folder


@pytest.fixture(scope="module")
def encoded(tiny_ckpt, digit_pngs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "out"
    r = run_cli("encode", tiny_ckpt, digit_pngs, "--out", out, "--solver", "heun", "--nfe", "11", "--nll",
                "--probes", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out


def test_cli_encode_writes_latents_report_and_grid(encoded, tiny_ckpt):
    from diffcli.checkpoint import file_hash, read_safetensors

    rec = json.loads((encoded / "encode.json").read_text())
    assert rec["solver"] == "heun" and rec["noise_levels"] == 6 and rec["nfe_decode"] == 11
    assert rec["checkpoint_sha256"] == file_hash(tiny_ckpt)
    assert len(rec["images"]) == 3
    for im in rec["images"]:
        assert im["psnr_db"] > 20 and im["max_abs_error"] < 0.5 and 0 < im["bits_per_dim"] < 16
    assert rec["overall"]["psnr_db"] > 20
    assert rec["nll"]["se"] > 0 and rec["nll"]["divergence"].startswith("hutchinson")
    t, meta = read_safetensors(encoded / "latents.safetensors")
    assert t["latents"].shape == (3, 1, 8, 8) and meta["checkpoint_sha256"] == file_hash(tiny_ckpt)
    assert meta["solver"] == "heun" and meta["sigma_min"] and meta["sigma_max"] and meta["nfe_decode"] == "11"
    from PIL import Image

    with Image.open(encoded / "reconstruction.png") as im:
        assert im.size[0] > im.size[1] / 3  # three columns


def test_cli_decode_reproduces_the_reconstruction(encoded, tiny_ckpt, digit_pngs, tmp_path):
    out = tmp_path / "dec"
    r = run_cli("encode", tiny_ckpt, "--decode", encoded / "latents.safetensors", "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "decode.json").read_text())
    assert rec["n"] == 3 and rec["solver"] == "heun" and rec["nfe_decode"] == 11
    import numpy as np

    from diffcli.images import load_png_uint8

    a = np.stack([load_png_uint8(out / "images" / f"{i:06d}.png") for i in range(3)]).astype(float) / 127.5 - 1
    b = np.stack([load_png_uint8(digit_pngs / f"d{i}.png") for i in range(3)]).astype(float) / 127.5 - 1
    psnr_dec = 10 * math.log10(4 / max(float(((a - b) ** 2).mean()), 1e-12))
    psnr_enc = json.loads((encoded / "encode.json").read_text())["overall"]["psnr_db"]
    assert psnr_dec > min(psnr_enc - 1.0, 45.0)  # the same reconstruction, up to 8-bit rounding


def test_cli_interpolate_with_class_and_cfg_warning(tiny_ckpt, digit_pngs, tmp_path):
    out = tmp_path / "walk"
    r = run_cli("encode", tiny_ckpt, digit_pngs / "d0.png", digit_pngs / "d1.png", "--interpolate", "--frames", "5",
                "--nfe", "6", "--solver", "ddim", "--class", "3", "--cfg", "2", "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "invertib" in r.stderr
    from PIL import Image

    with Image.open(out / "interpolation.png") as im:
        w, h = im.size
    assert w > 4 * h  # one row of 5 frames
    rec = json.loads((out / "encode.json").read_text())
    assert rec["interpolation"]["frames"] == 5 and rec["class"] == 3 and rec["warnings"]


def test_cli_bad_inputs_exit_2_with_one_line(tiny_ckpt, digit_pngs, encoded, tmp_path):
    from diffcli.checkpoint import read_safetensors, save_safetensors
    from diffcli.images import save_png

    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "notes.txt").write_text("hello")
    save_png(tmp_path / "rgb.png", torch.zeros(3, 8, 8))
    other = tmp_path / "other.safetensors"  # another checkpoint: same weights, other metadata → other hash
    t, meta = read_safetensors(tiny_ckpt)
    save_safetensors(other, t, {**meta, "step": "999"})
    d0, out = digit_pngs / "d0.png", tmp_path / "o"
    cases = [  # the bad inputs the issue names, through the real command line
        (["encode", tiny_ckpt, tmp_path / "broken.png", "--out", out], "broken.png"),
        (["encode", tiny_ckpt, tmp_path / "notes.txt", "--out", out], "notes.txt"),
        (["encode", tiny_ckpt, tmp_path / "rgb.png", "--out", out], "channel"),
        (["encode", other, "--decode", encoded / "latents.safetensors", "--out", out], "sha256"),
        (["encode", tiny_ckpt, d0, "--interpolate", "--out", out], "--interpolate"),
        (["encode", tiny_ckpt, d0, "--solver", "heun", "--nfe", "2", "--out", out], "--nfe 2"),
    ]
    for args, needle in cases:
        r = run_cli(*args, "--device", "cpu")
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, r.stderr)
    assert not out.exists()  # nothing written for bad input


def test_cli_bad_options_exit_2_in_process(tiny_ckpt, digit_pngs, encoded, tmp_path, capsys):
    """More bad options, through `main()` in-process (same error mapping, no interpreter start-up)."""
    from diffcli.checkpoint import read_safetensors, save_safetensors
    from diffcli.cli import main

    d0, out = digit_pngs / "d0.png", tmp_path / "o"
    t, meta = read_safetensors(encoded / "latents.safetensors")  # a latents file edited by hand: its labels
    bad_labels, more_labels = tmp_path / "bad_labels.safetensors", tmp_path / "more_labels.safetensors"
    save_safetensors(bad_labels, {**t, "labels": torch.full((3,), 42)}, meta)
    save_safetensors(more_labels, {**t, "labels": torch.zeros(7, dtype=torch.long)}, meta)
    cases = [
        (["encode", tiny_ckpt, tmp_path / "missing.png", "--out", out], "missing.png"),
        (["encode", tiny_ckpt, d0, "--solver", "ddpm", "--out", out], "ddpm"),
        (["encode", tiny_ckpt, d0, "--solver", "rk45", "--nfe", "20", "--out", out], "--rtol"),
        (["encode", tiny_ckpt, d0, "--solver", "heun", "--rtol", "1e-4", "--out", out], "--rtol"),
        (["encode", tiny_ckpt, d0, "--exact-divergence", "--out", out], "--nll"),
        (["encode", tiny_ckpt, d0, "--nll", "--cfg", "2", "--class", "1", "--out", out], "--cfg"),
        (["encode", tiny_ckpt, d0, "--class", "10", "--out", out], "--class 10"),
        (["encode", tiny_ckpt, d0, "--frames", "1", "--interpolate", "--out", out], "--frames"),
        (["encode", tiny_ckpt, "--out", out], "INPUTS"),
        (["encode", tiny_ckpt, "--decode", d0, "--out", out], "d0.png"),
        (["encode", tiny_ckpt, d0, "--solver", "ipndm", "--out", out], "not an invertible solver"),
        (["encode", tiny_ckpt, "--decode", bad_labels, "--out", out], "labels' holds 42"),
        (["encode", tiny_ckpt, "--decode", more_labels, "--out", out], "expected 3 integer labels"),
    ]
    for args, needle in cases:
        rc = main([str(a) for a in args] + ["--device", "cpu"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (args, err)
    assert not out.exists()


def test_inputs_of_another_size_are_resized_with_a_note(tmp_path):
    from diffcli.encode import collect_inputs, load_images
    from diffcli.images import save_png

    save_png(tmp_path / "big.png", torch.linspace(-1, 1, 256).reshape(1, 16, 16))
    save_png(tmp_path / "sub" / "small.png", torch.zeros(1, 8, 8))
    notes, recorded = [], []
    x = load_images(collect_inputs([tmp_path]), 1, 8, log=notes.append, warnings=recorded)
    assert x.shape == (2, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert len(notes) == 1 and "big.png (16×16)" in notes[0] and "8×8" in notes[0]
    assert len(recorded) == 1 and "big.png (16×16)" in recorded[0]  # encode.json's warnings record it too


def test_diffcli_never_imports_diffusers():
    import subprocess
    import sys

    code = "import sys, diffcli.cli, diffcli.encode; sys.exit('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sample_and_encode_folders_give_their_images_not_their_grids(tiny_ckpt, encoded, tmp_path):
    """A diffcli sample or decode folder (sample.json / decode.json + images/ + a grid) as input: only images/
    is read — the grid would be encoded as one more (resized) image; an encode folder holds no images."""
    from diffcli.encode import collect_inputs
    from diffcli.errors import UserError

    smp = tmp_path / "smp"
    r = run_cli("sample", tiny_ckpt, "--sampler", "ddim", "--steps", "4", "--n", "5", "--out", smp)
    assert r.returncode == 0, r.stderr
    assert (smp / "grid.png").exists()
    files = collect_inputs([smp])
    assert len(files) == 5 and all(f.parent == smp / "images" for f in files)
    with pytest.raises(UserError, match="encode folder"):
        collect_inputs([encoded])  # it keeps no images: its reconstruction strip is not an input
    dec = tmp_path / "dec"
    r = run_cli("encode", tiny_ckpt, "--decode", encoded / "latents.safetensors", "--out", dec)
    assert r.returncode == 0, r.stderr
    again = collect_inputs([dec])
    assert len(again) == 3 and all(f.parent == dec / "images" for f in again)
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(smp / "grid.png", plain / "grid.png")
    assert collect_inputs([plain]) == [plain / "grid.png"]  # any other folder: every image in it


def test_force_replaces_diffcli_output_and_never_other_images(tiny_ckpt, encoded, tmp_path, capsys):
    """`--force` empties what an earlier sample/decode wrote (the folder never mixes two runs), keeps a sample
    folder's images when encode writes beside them (encode writes none), and refuses numbered PNGs that no
    diffcli record describes — a user's own files are not diffcli's to delete."""
    from types import SimpleNamespace

    from PIL import Image

    from diffcli.cli import main

    def run_cli(*args):  # in-process: the same command line, no interpreter start-up per call
        rc = main([str(a) for a in args])
        return SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)

    smp = tmp_path / "smp"
    assert run_cli("sample", tiny_ckpt, "--steps", "2", "--n", "5", "--out", smp).returncode == 0
    r = run_cli("sample", tiny_ckpt, "--steps", "2", "--n", "3", "--out", smp, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (smp / "images").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    assert json.loads((smp / "sample.json").read_text())["n"] == 3
    r = run_cli("encode", tiny_ckpt, smp / "images", "--out", smp, "--force", "--nfe", "4")
    assert r.returncode == 0, r.stderr
    assert len(list((smp / "images").iterdir())) == 3 and (smp / "encode.json").exists()
    # a decode folder resampled: its record goes with the images it described
    dec = tmp_path / "dec"
    assert run_cli("encode", tiny_ckpt, "--decode", encoded / "latents.safetensors", "--out", dec).returncode == 0
    assert run_cli("sample", tiny_ckpt, "--steps", "2", "--n", "2", "--out", dec, "--force").returncode == 0
    assert not (dec / "decode.json").exists() and len(list((dec / "images").iterdir())) == 2
    # the user's own numbered PNGs: refused for sample and for decode, kept
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    Image.new("L", (8, 8), color=77).save(mine / "images" / "000000.png")
    before = (mine / "images" / "000000.png").read_bytes()
    for argv in (["sample", tiny_ckpt, "--steps", "2", "--n", "2"],
                 ["encode", tiny_ckpt, "--decode", encoded / "latents.safetensors"]):
        r = run_cli(*argv, "--out", mine, "--force")
        assert r.returncode == 2 and "000000.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (mine / "images" / "000000.png").read_bytes() == before
    # a numbered PNG beyond the n its sample.json records, and a sample.json that diffcli did not write: both
    # are the user's, refused and kept
    beyond = tmp_path / "beyond"
    assert run_cli("sample", tiny_ckpt, "--steps", "2", "--n", "2", "--out", beyond).returncode == 0
    shutil.copy(mine / "images" / "000000.png", beyond / "images" / "000007.png")
    r = run_cli("sample", tiny_ckpt, "--steps", "2", "--n", "2", "--out", beyond, "--force")
    assert r.returncode == 2 and "000007.png" in r.stderr, r.stderr
    assert (beyond / "images" / "000007.png").read_bytes() == before
    (mine / "sample.json").write_text('{"note": "my own"}')
    r = run_cli("sample", tiny_ckpt, "--steps", "2", "--n", "2", "--out", mine, "--force")
    assert r.returncode == 2 and "sample.json is not a record diffcli wrote" in r.stderr, r.stderr
    assert (mine / "sample.json").read_text() == '{"note": "my own"}'
    assert (mine / "images" / "000000.png").read_bytes() == before
    # a decode into a sample folder takes the sample's record and grid with the images it replaces
    assert run_cli("encode", tiny_ckpt, "--decode", encoded / "latents.safetensors", "--out", smp,
                   "--force").returncode == 0
    assert not (smp / "sample.json").exists() and not (smp / "grid.png").exists()
    assert len(list((smp / "images").iterdir())) == 3 and (smp / "decode.json").exists()
    # --force never deletes this run's own inputs: a latents file decoded into its encode folder, a decode
    # folder's images encoded into it
    enc, dec2 = tmp_path / "enc", tmp_path / "dec2"
    shutil.copytree(encoded, enc)
    assert run_cli("encode", tiny_ckpt, "--decode", encoded / "latents.safetensors", "--out", dec2).returncode == 0
    for argv, needle in ((["--decode", enc / "latents.safetensors", "--out", enc], "latents.safetensors"),
                         ([dec2 / "images", "--out", dec2], "000000.png")):
        r = run_cli("encode", tiny_ckpt, *argv, "--force")
        assert r.returncode == 2 and needle in r.stderr and "input" in r.stderr, r.stderr
    assert (enc / "latents.safetensors").is_file() and len(list((dec2 / "images").iterdir())) == 3
    # an --out below an input folder: an earlier run's files there are not inputs
    imgs = tmp_path / "imgs"
    shutil.copytree(smp / "images", imgs)
    for extra in ([], ["--force"]):
        r = run_cli("encode", tiny_ckpt, imgs, "--out", imgs / "enc", "--nfe", "4", *extra)
        assert r.returncode == 0, r.stderr
        assert len(json.loads((imgs / "enc" / "encode.json").read_text())["images"]) == 3


def test_a_diverged_inversion_and_a_student_are_flagged(tiny_ckpt, digit_pngs, tmp_path, monkeypatch):
    """Latents far above σ_max (an inversion that blew up) and a few-step student as the ODE denoiser run, but
    the warnings say so — on stderr and in encode.json."""
    import diffcli.encode as E
    from diffcli.checkpoint import load_checkpoint, read_safetensors, save_safetensors

    real = E.encode

    def blown(*a, **k):
        r = real(*a, **k)
        return E.EncodeResult(r.latents * 100, r.x_sigma_min, r.nfe, r.final_step_residual)

    monkeypatch.setattr(E, "encode", blown)
    ck = load_checkpoint(tiny_ckpt, torch.device("cpu"))
    said = []
    rec = E.run_encode(ck, [digit_pngs], tmp_path / "a", E.EncodeSettings(nfe=4), device=torch.device("cpu"),
                       log=said.append)
    assert any("inversion diverged" in w for w in rec["warnings"]) and any("inversion diverged" in m for m in said)
    monkeypatch.setattr(E, "encode", real)
    t, meta = read_safetensors(tiny_ckpt)
    student = tmp_path / "student.safetensors"
    save_safetensors(student, t, {**meta, "distill_method": "consistency", "student_steps": "1"})
    rec = E.run_encode(load_checkpoint(student, torch.device("cpu")), [digit_pngs], tmp_path / "b",
                       E.EncodeSettings(nfe=4), device=torch.device("cpu"), log=said.append)
    assert not any("inversion diverged" in w for w in rec["warnings"]), rec["warnings"]
    assert any("consistency student" in w for w in rec["warnings"])


def test_cli_default_solver_and_a_poor_round_trip_warns(tiny_ckpt, digit_pngs, tmp_path, monkeypatch, capsys):
    """The default inversion is DPM-Solver++(2M); a round trip below POOR_ROUND_TRIP_DB is flagged even when the
    latents look normal (here the threshold is raised so that this short run's round trip counts as poor)."""
    from diffcli import encode as enc
    from diffcli.cli import main

    assert enc.DEFAULT_SOLVER == "dpmpp_2m"
    monkeypatch.setattr(enc, "POOR_ROUND_TRIP_DB", 1e9)
    out = tmp_path / "e"
    assert main(["encode", str(tiny_ckpt), str(digit_pngs / "d0.png"), "--nfe", "6", "--out", str(out),
                 "--device", "cpu"]) == 0
    rec = json.loads((out / "encode.json").read_text())
    assert rec["solver"] == "dpmpp_2m"
    assert any(w.startswith("round-trip PSNR") and "dpmpp_2m on 6 noise levels" in w for w in rec["warnings"])
    assert "warning: round-trip PSNR" in capsys.readouterr().err
