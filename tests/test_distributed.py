"""torch.distributed on the CPU (gloo, 2 processes through torchrun): training, sampling, resume, eval-fid."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli


def torchrun(*args, nproc: int = 2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "diffcli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def _losses(run):
    with open(run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_processes_train_like_one(tiny_recipe_path, tmp_path):
    """Global batch B on 2 ranks = batch B on 1: the same samples, noise and σ per step; only the order of the
    floating-point sums (gradient all-reduce) differs, so weights agree to ~1e-6, not bit for bit."""
    over = ["--max-steps", "4", "--set", "train.log_every=1", "--set", "train.sample_grid=4",
            "--set", "train.checkpoint_every=2", "--set", "train.batch_size=30"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli("train", tiny_recipe_path, "--out", one, *over)
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun("train", tiny_recipe_path, "--out", two, *over)
    assert r2.returncode == 0, r2.stderr
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-4)
    a = load_file(str(one / "checkpoints/step_0000004.state.safetensors"))
    b = load_file(str(two / "checkpoints/step_0000004.state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    # only rank 0 wrote: one metrics file with one row per step, no stray files
    assert len(_losses(two)) == 4
    # a 2-process run resumes in 1 process
    r = run_cli("train", "--out", two, "--resume", "--max-steps", "6")
    assert r.returncode == 0, r.stderr
    assert (two / "checkpoints/step_0000006.safetensors").exists()


def test_two_process_sampling_is_byte_identical(tiny_ckpt, tmp_path):
    args = ["--sampler", "ddpm", "--steps", "5", "-n", "7", "--batch-size", "3", "--seed", "11", "--cfg", "1.5"]
    r1 = run_cli("sample", tiny_ckpt, *args, "--out", tmp_path / "one")
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun("sample", tiny_ckpt, *args, "--out", tmp_path / "two")
    assert r2.returncode == 0, r2.stderr
    names = sorted(p.name for p in (tmp_path / "one/images").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two/images").iterdir()) and len(names) == 7
    for n in names:
        assert (tmp_path / "one/images" / n).read_bytes() == (tmp_path / "two/images" / n).read_bytes(), n
    # the shortcut `--nproc 2` (it launches torchrun itself; --n spelled out, which torchrun's own parser would
    # take for an abbreviation of its options) gives the same images
    r3 = run_cli("sample", tiny_ckpt, *[a if a != "-n" else "--n" for a in args], "--nproc", "2",
                 "--out", tmp_path / "three")
    assert r3.returncode == 0, r3.stderr
    for n in names:
        assert (tmp_path / "one/images" / n).read_bytes() == (tmp_path / "three/images" / n).read_bytes(), n
    assert json.loads((tmp_path / "three/sample.json").read_text())["n"] == 7
    recs = [json.loads((tmp_path / f / "sample.json").read_text()) for f in ("one", "two", "three")]
    assert len({(r["nfe"], r["network_evaluations"]) for r in recs}) == 1 and recs[0]["nfe"] == 5  # every rank's cost


EVAL_ARGS = ["-n", "21", "--batch-size", "4", "--sampler", "ddpm,euler", "--nfe", "3", "--device", "cpu"]


def test_two_process_eval_fid_gives_one_process_numbers(digits_cache, tiny_ckpt, tmp_path):
    """`eval-fid CKPT --nproc 2`: a sweep (a stochastic and a deterministic sampler) with both generations
    sharded (batches 0-2 on rank 0, 3-5 on rank 1) gives exactly the numbers of one process; only rank 0
    prints and writes."""
    from diffcli.metrics import EvalOptions, evaluate

    one = evaluate(EvalOptions(generated=tiny_ckpt, n=21, batch_size=4, sampler="ddpm,euler", nfe="3",
                               device="cpu", out=tmp_path / "one")).records
    out = tmp_path / "two"
    r = run_cli("eval-fid", tiny_ckpt, *EVAL_ARGS, "--out", out, "--json", tmp_path / "two.json", "--nproc", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((out / "eval_fid.json").read_text())["sweep"]
    assert json.loads((tmp_path / "two.json").read_text()) == {"sweep": two}
    assert [(x["sampler"], x["n_generated"], x["processes"]) for x in two] == [("ddpm", 21, 2), ("euler", 21, 2)]
    for a, b in zip(one, two):
        assert a["metrics"] == b["metrics"] and a["class_accuracy"] == b["class_accuracy"], (a["sampler"], a, b)
        assert a["nfe"] == b["nfe"] and a["processes"] == 1
    # rank 0 alone reports and writes
    assert r.stderr.count("diffcli eval-fid sweep") == 1 and r.stderr.count("generating 21 images") == 2
    assert r.stderr.count("eval_fid.csv") == 1
    assert sorted(f.name for f in out.iterdir()) == ["eval_fid.csv", "eval_fid.json", "eval_fid.png"]


def test_eval_fid_bad_input_reported_once(digits_cache, tiny_ckpt, tmp_path):
    """Bad input exits 2 with one line: under --nproc the launcher checks it before any worker starts; under
    torchrun itself rank 0 reports it and the other ranks exit quietly (torchrun adds its own summary)."""
    r = run_cli("eval-fid", tiny_ckpt, *EVAL_ARGS, "--nproc", "2")  # a sweep needs --out
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: a sweep"), r.stderr[-3000:]
    r = torchrun("eval-fid", tiny_ckpt, *EVAL_ARGS, "--metrics", "fid,bogus")
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: --metrics 'fid,bogus': unknown metric 'bogus'; choose from fid, kid, is, pr"], r.stderr


def test_train_bad_data_under_two_processes_is_reported_once(tiny_recipe_path, tmp_path):
    """Every rank meets the same missing image folder; only rank 0 says so (exit 2), and no run folder is left."""
    r = run_cli("train", tiny_recipe_path, "--out", tmp_path / "run", "--nproc", "2", "--set",
                'data.name="imagefolder"', "--set", f'data.path="{tmp_path / "nowhere"}"', "--set", "train.p_uncond=0")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "data.path" in errors[0], r.stderr[-3000:]
    assert not (tmp_path / "run").exists()
