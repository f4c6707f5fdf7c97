"""The CLI as a user runs it: a real `diffcli` subprocess, files written, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_train_then_sample_end_to_end(tiny_recipe_path, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", tiny_recipe_path, "--out", run, "--max-steps", "6", "--set", "train.checkpoint_every=3",
                "--set", "train.sample_grid=4")
    assert r.returncode == 0, r.stderr
    for f in ("recipe.toml", "last.safetensors", "metrics.csv", "checkpoints/step_0000006.safetensors",
              "checkpoints/step_0000003.state.safetensors", "samples/step_0000006.png"):
        assert (run / f).exists(), f
    out = tmp_path / "samples"
    r = run_cli("sample", run / "last.safetensors", "--sampler", "ddim", "--steps", "4", "--cfg", "2",
                "--n", "5", "--batch-size", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    meta = json.loads((out / "sample.json").read_text())
    assert meta["nfe"] == 4 and meta["network_evaluations"] == 8 and meta["labels"] == [0, 1, 2, 3, 4]
    assert meta["sampler"] == "ddim" and meta["cfg"] == 2.0 and meta["n"] == 5 and meta["seconds"] > 0
    from PIL import Image

    with Image.open(out / "images/000000.png") as im:
        assert im.mode == "L" and im.size == (8, 8)
    assert (out / "grid.png").exists()
    # a second run into the same folder is refused; --force overwrites
    _one_line_error(run_cli("sample", run / "last.safetensors", "--n", "2", "--out", out), "not empty")
    assert run_cli("sample", run / "last.safetensors", "--n", "2", "--steps", "2", "--out", out,
                   "--force").returncode == 0
    # resume continues the run from its own recipe
    r = run_cli("train", "--out", run, "--resume", "--max-steps", "8")
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints/step_0000008.safetensors").exists()


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout
    for cmd in ("train", "sample"):
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "Examples" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("diffcli ")
    r = run_cli("sample", "--list")
    assert r.returncode == 0 and "ddpm" in r.stdout and "ddim" in r.stdout


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory, tiny_recipe_path):
    from diffcli.recipes import load_recipe
    from diffcli.train import train

    out = tmp_path_factory.mktemp("uncond") / "run"
    rec = load_recipe(tiny_recipe_path, ["data.class_conditional=false", "train.p_uncond=0", "train.max_steps=1",
                                         "train.sample_grid=4"])
    train(rec, out, log=lambda *a, **k: None, show_progress=False)
    return out / "last.safetensors"


def _bad_train_cases(tmp: Path, recipe: Path):
    unknown = tmp / "unknown.toml"
    unknown.write_text('[train]\nlrr = 1\n')
    wrong = tmp / "wrong.toml"
    wrong.write_text('[train]\nbatch_size = "big"\n')
    held = tmp / "held"
    (held / "checkpoints").mkdir(parents=True)
    (held / "recipe.toml").write_text("")
    return [
        (["train", tmp / "missing.toml"], ["missing.toml", "does not exist"]),
        (["train", unknown], ["unknown key train.lrr"]),
        (["train", wrong], ["train.batch_size", "'big'"]),
        (["train", recipe, "--set", "train.lr=0"], ["train.lr = 0"]),
        (["train", recipe, "--set", "train.lr=-1e-3"], ["train.lr"]),
        (["train", recipe, "--set", "train.batch_size=0"], ["train.batch_size = 0"]),
        (["train", recipe, "--max-steps", "0"], ["--max-steps 0"]),
        (["train", recipe, "--out", held], ["already holds a run", "--resume", "--force"]),
        (["train", recipe, "--set", "data.name=celeba", "--out", tmp / "c"], ["p_uncond"]),
    ]


def test_bad_train_inputs(tmp_path, tiny_recipe_path):
    for args, needles in _bad_train_cases(tmp_path, tiny_recipe_path):
        r = run_cli(*args)
        _one_line_error(r, *needles)


def test_bad_sample_inputs(tmp_path, tiny_ckpt, uncond_ckpt):
    out = tmp_path / "s"
    notst = tmp_path / "weights.safetensors"
    notst.write_bytes(b"garbage that is not a safetensors file")
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x04K\x01.")
    cases = [
        (["sample", tmp_path / "nope.safetensors"], ["nope.safetensors", "does not exist"]),
        (["sample", notst], ["weights.safetensors"]),
        (["sample", pt], ["model.pt", "pickle"]),
        (["sample", tiny_ckpt, "--steps", "0"], ["--steps 0"]),
        (["sample", tiny_ckpt, "--eta", "-0.5"], ["--eta -0.5"]),
        (["sample", tiny_ckpt, "--cfg", "-1"], ["--cfg -1"]),
        (["sample", tiny_ckpt, "--batch-size", "0"], ["--batch-size 0"]),
        (["sample", tiny_ckpt, "--n", "0"], ["--n 0"]),
        (["sample", tiny_ckpt, "--class", "10"], ["--class 10", "0..9"]),
        (["sample", tiny_ckpt, "--sampler", "magic"], ["magic", "ddim"]),
        (["sample", tiny_ckpt, "--steps", "x"], ["--steps"]),
        (["sample", uncond_ckpt, "--cfg", "3"], ["--cfg 3", "unconditional"]),
        (["sample", uncond_ckpt, "--class", "1"], ["--class 1", "unconditional"]),
    ]
    for args, needles in cases:
        r = run_cli(*args, "--out", out)
        _one_line_error(r, *needles)
        assert not out.exists(), args  # nothing written on bad input
