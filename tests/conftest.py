"""Shared fixtures: a tiny recipe, a tiny trained checkpoint (session-scoped), the Gaussian-mixture oracle."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# One thread: the tensors here are tiny, and OpenMP threads that spin on a busy 2-core machine cost far more
# than they give. Subprocesses (the CLI tests) inherit the setting through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

TINY_RECIPE = """
name = "tiny"
[data]
name = "digits"
[model]
channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
attention_resolutions = [4]
head_channels = 8
[diffusion]
process = "edm"
parameterization = "edm"
[train]
batch_size = 32
lr = 2e-3
max_steps = 20
log_every = 5
checkpoint_every = 10
sample_every = 20
sample_grid = 16
p_uncond = 0.1
device = "cpu"
[sample]
sampler = "ddim"
steps = 8
"""


@pytest.fixture(scope="session")
def tiny_recipe_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    p.write_text(TINY_RECIPE)
    return p


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_recipe_path) -> Path:
    """A run folder trained for 20 steps on digits (class-conditional, CFG dropout)."""
    from diffcli.recipes import load_recipe
    from diffcli.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(load_recipe(tiny_recipe_path), out, log=lambda *a, **k: None, show_progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run) -> Path:
    return tiny_run / "last.safetensors"


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """Point the user cache at a temporary folder (subprocesses inherit it) and train the digits classifier
    once for the whole session (eval-fid tests: test_metrics, test_distributed)."""
    old = os.environ.get("XDG_CACHE_HOME")
    root = tmp_path_factory.mktemp("xdg_cache")
    os.environ["XDG_CACHE_HOME"] = str(root)
    from diffcli import features

    features._LOADED.clear()
    clf = features.load_digits_classifier(0)
    yield clf
    features._LOADED.clear()
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture
def gm():
    from diffcli.oracle import GaussianMixtureDenoiser

    return GaussianMixtureDenoiser.random(k=4, shape=(1, 2, 2), std=0.3, seed=0)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `diffcli` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "diffcli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
