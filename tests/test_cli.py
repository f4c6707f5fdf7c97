"""The CLI as a user runs it: a real `diffcli` subprocess, files written, exit codes, one-line errors."""

from __future__ import annotations

import json

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
    import torch

    from diffcli.runtime import use_channels_last

    layout = "channels_last" if use_channels_last("auto", torch.device("cpu")) else "contiguous"
    assert f"cpu, {layout}" in r.stdout + r.stderr  # the summary says what train.channels_last = "auto" chose
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
    (out / "notes.txt").write_text("mine")
    assert run_cli("sample", run / "last.safetensors", "--n", "2", "--steps", "2", "--out", out,
                   "--force").returncode == 0
    # ... and the folder then holds that run alone (an eval-fid of it must not score the first run's images),
    # but what the user put there stays
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert json.loads((out / "sample.json").read_text())["n"] == 2 and (out / "notes.txt").read_text() == "mine"
    # --debug, before or after the command: the traceback, and still exit 2
    missing = tmp_path / "nope.safetensors"
    for argv in (["--debug", "sample", missing], ["sample", "--debug", missing]):
        r = run_cli(*argv, "--out", tmp_path / "x")
        assert r.returncode == 2 and "Traceback" in r.stderr and "nope.safetensors" in r.stderr.splitlines()[-1]
    # resume continues the run from its own recipe; a budget below the run's step, or --force with it, is refused
    _one_line_error(run_cli("train", "--out", run, "--resume", "--max-steps", "3"), "max_steps = 3", "step 6")
    _one_line_error(run_cli("train", "--out", run, "--resume", "--force"), "--resume", "--force")
    r = run_cli("train", "--out", run, "--resume", "--max-steps", "8")
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints/step_0000008.safetensors").exists()
    assert "max_steps = 8" in (run / "recipe.toml").read_text()
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    seconds = [float(r.split(",")[-1]) for r in rows]
    assert [int(r.split(",")[0]) for r in rows][-1] == 8 and seconds == sorted(seconds), rows  # the clock goes on


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


# Bad inputs of every command (train, sample, eval-fid, encode): tests/test_cli_errors.py, one table.


def test_openmp_spin_is_capped_unless_the_user_chose():
    """The CLI caps libgomp's spin-wait (a training beside one busy process was ~6× slower with the default
    spin, bench/omp_wait.py) — before torch loads, as libgomp reads it only then — and leaves a user's own
    OMP_WAIT_POLICY / GOMP_SPINCOUNT alone."""
    import subprocess
    import sys

    from diffcli.cli import openmp_wait_policy

    env = {}
    openmp_wait_policy(env)
    assert env == {"GOMP_SPINCOUNT": "3000"}
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "100000"}):
        env = dict(mine)
        openmp_wait_policy(env)
        assert env == mine
    # the console entry point imports no torch before it sets the policy
    code = ("import sys, diffcli.cli as c; assert 'torch' not in sys.modules, 'torch imported too early'; "
            "import os; os.environ.pop('OMP_WAIT_POLICY', None); os.environ.pop('GOMP_SPINCOUNT', None); "
            "sys.argv = ['diffcli', '--version']; rc = c.main(); print(os.environ['GOMP_SPINCOUNT'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "3000"


def test_out_of_memory_is_one_line_and_exit_1(tiny_ckpt, tmp_path):
    """An allocation the machine cannot make (here: a batch past a 2 GB data limit) is a runtime failure: exit 1,
    one line that says what to lower, no traceback."""
    import resource
    import subprocess
    import sys

    def limit():  # mmap'd allocations count against RLIMIT_DATA (Linux ≥ 4.7)
        resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))

    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "diffcli", "sample", str(tiny_ckpt), "--n", "200000", "--batch-size",
                        "200000", "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600,
                       preexec_fn=limit)
    assert r.returncode == 1, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: out of memory ("), r.stderr
    assert "--batch-size" in lines[0] and "Traceback" not in r.stderr
