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


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to see the process at work")
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_during_sampling_says_interrupted_and_writes_nothing(tiny_ckpt, tmp_path, sig, code):
    """Outside a training loop SIGTERM takes Ctrl-C's path too (its default killed the process silently)."""
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "diffcli", "sample", str(tiny_ckpt), "--n", "200000", "--nfe", "50",
                          "--device", "cpu", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and _cpu_seconds(p.pid) < 6:  # imports done, sampling
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1]
    os.kill(p.pid, sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code and err.strip().splitlines() == ["error: interrupted"], err
    assert not out.exists()


def test_second_signal_during_a_save_waits_for_it(tiny_recipe_path, tmp_path, monkeypatch):
    """Two quick Ctrl-Cs: the first asks for a checkpoint, the second lands while it is written. The save
    finishes (state and model file), then the run stops with a message naming the step — nothing is lost."""
    from diffcli import train as T
    from diffcli.errors import Interrupted
    from diffcli.recipes import load_recipe

    real = T.save_state

    def save_then_signal_twice(*a, **k):  # both signals arrive inside the save
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        real(*a, **k)

    monkeypatch.setattr(T, "save_state", save_then_signal_twice)
    out = tmp_path / "run"
    rec = load_recipe(tiny_recipe_path, ["train.max_steps=20", "train.checkpoint_every=3", "train.sample_grid=4"])
    with pytest.raises(Interrupted, match="interrupted again at step 3, after its checkpoint") as e:
        T.train(rec, out, log=lambda *a, **k: None, show_progress=False)
    assert e.value.exit_code == 130
    assert (out / "checkpoints/step_0000003.safetensors").exists()
    assert (out / "checkpoints/step_0000003.state.safetensors").exists()
    assert T.latest_state(out)[0] == 3


def test_second_signal_outside_a_save_stops_at_once_with_a_message():
    from diffcli.errors import Interrupted
    from diffcli.train import _Signals

    s = _Signals()
    s._handle(signal.SIGINT, None)
    assert s.received == signal.SIGINT
    with pytest.raises(Interrupted, match="without a checkpoint") as e:
        s._handle(signal.SIGTERM, None)
    assert e.value.exit_code == 143
