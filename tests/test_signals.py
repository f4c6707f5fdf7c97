"""SIGINT/SIGTERM during training: the step finishes, a checkpoint is written, exit 130/143, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_checkpoint_and_exits(tiny_recipe_path, tmp_path, sig, code):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "diffcli", "train", str(tiny_recipe_path), "--out", str(out),
                          "--max-steps", "100000", "--set", "train.log_every=1", "--set", "train.sample_grid=4",
                          "--set", "train.checkpoint_every=100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way (a metrics row is logged)
        m = out / "metrics.csv"
        if m.exists() and len(m.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("training did not start")
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "--resume" in err and "Traceback" not in err
    cks = sorted((out / "checkpoints").glob("step_*.state.safetensors"))
    assert len(cks) == 1 and (out / "last.safetensors").exists()
    r = subprocess.run([sys.executable, "-m", "diffcli", "train", "--out", str(out), "--resume",
                        "--max-steps", str(int(cks[0].name[5:12]) + 2)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
