"""Nothing a user made is lost: saves cut short (kill -9, an exception, a full disk), lost or corrupt training
state on --resume, leftover temporaries, and the signal handler's second signal.

Every test starts from a copy of one 3-step run (checkpoint at step 3) and compares its files byte for byte
after the failure; resumed runs are compared with a straight 6-step run (training is seeded per step).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffcli.checkpoint as ckpt_mod
import diffcli.train as train_mod
from diffcli.errors import Interrupted, UserError
from diffcli.recipes import load_recipe
from diffcli.train import prepare_run_folder, train

QUIET = dict(log=lambda *a, **k: None, show_progress=False)
OVER = ["train.checkpoint_every=3", "train.sample_every=1000", "train.log_every=1", "train.sample_grid=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_recipe_path):
    """(a run stopped at step 3, the same run trained straight to step 6)."""
    root = tmp_path_factory.mktemp("reliability")
    train(load_recipe(tiny_recipe_path, OVER + ["train.max_steps=3"]), root / "base3", **QUIET)
    train(load_recipe(tiny_recipe_path, OVER + ["train.max_steps=6"]), root / "straight6", **QUIET)
    return root / "base3", root / "straight6"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every checkpoint file's bytes (metrics.csv is rewritten on resume by design, so it is left out)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*.safetensors"))}


def _temporaries(run: Path) -> list[Path]:
    return sorted(run.rglob(".*.tmp"))


def _assert_same_state(a: Path, b: Path, step: int) -> None:
    sa = load_file(str(a / f"checkpoints/step_{step:07d}.state.safetensors"))
    sb = load_file(str(b / f"checkpoints/step_{step:07d}.state.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    from diffcli.checkpoint import read_safetensors

    (ta, ma), (tb, mb) = read_safetensors(a / "last.safetensors"), read_safetensors(b / "last.safetensors")
    assert ma == mb and ta.keys() == tb.keys()  # (safetensors orders metadata at random: compare, not bytes)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# --- kill -9 in the middle of a save (a real subprocess) -------------------------------------------------------
KILLER = r"""
import os, signal, sys
target = sys.argv[1]
real_fsync = os.fsync

def fsync(fd):
    # The temporary file is written and flushed but not yet renamed into place: the worst moment to die.
    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    if name.startswith(target):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)

os.fsync = fsync
from diffcli.cli import main
sys.exit(main(["train", "--out", sys.argv[2], "--resume", "--max-steps", "6"]))
"""


@pytest.mark.parametrize("target, resumes_at", [
    (".step_0000006.safetensors.", 3),  # state of step 6 complete, its model checkpoint cut: resume from 3
    (".last.safetensors.", 6),          # both files of step 6 complete, last.safetensors cut: resume from 6
])
def test_kill_9_mid_save_keeps_previous_checkpoint_and_resumes(runs, tmp_path, target, resumes_at):
    base3, straight6 = runs
    run = _copy(base3, tmp_path / "run")
    before = _snapshot(run)
    r = subprocess.run([sys.executable, "-c", KILLER, target, str(run)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    leftovers = _temporaries(run)
    assert len(leftovers) == 1 and leftovers[0].name.startswith(target), leftovers  # it died mid-save
    after = _snapshot(run)
    for name, data in before.items():  # the previous checkpoint (and last.safetensors) are byte-identical
        assert after[name] == data, name
    logs = []
    res = train(load_recipe(run / "recipe.toml", ["train.max_steps=6"]), run, resume=True,
                log=logs.append, show_progress=False)
    assert f"resumed {run} at step {resumes_at}" in logs and res.step == 6
    assert _temporaries(run) == []  # cleaned up on the next start
    _assert_same_state(run, straight6, 6)  # and the crash cost nothing: bit-exact with the straight run


# --- an exception in the middle of a save (in-process) -----------------------------------------------------------
@pytest.mark.parametrize("exc", [RuntimeError("injected failure"), KeyboardInterrupt()])
def test_exception_mid_save_leaves_previous_checkpoint(runs, tmp_path, monkeypatch, exc):
    base3, straight6 = runs
    run = _copy(base3, tmp_path / "run")
    before = _snapshot(run)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("step_0000006.safetensors"):  # the state of step 6 is already written
            raise exc
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(type(exc)):
        train(load_recipe(run / "recipe.toml", ["train.max_steps=6"]), run, resume=True, **QUIET)
    monkeypatch.undo()
    after = _snapshot(run)
    assert {k: after[k] for k in before} == before
    assert _temporaries(run) == []  # the failed write removed its own temporary
    assert not (run / "checkpoints/step_0000006.safetensors").exists()
    train(load_recipe(run / "recipe.toml", ["train.max_steps=6"]), run, resume=True, **QUIET)
    _assert_same_state(run, straight6, 6)


# --- out of disk through the real training path ------------------------------------------------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_out_of_disk_at_a_checkpoint_exits_1_and_keeps_last_good(runs, tmp_path, monkeypatch, capsys):
    from diffcli.cli import main

    base3, straight6 = runs
    run = _copy(base3, tmp_path / "run")
    before = _snapshot(run)
    real_fsync = os.fsync

    def fsync(fd):
        if "step_0000006" in os.readlink(f"/proc/self/fd/{fd}"):
            _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(ckpt_mod.os, "fsync", fsync)
    rc = main(["train", "--out", str(run), "--resume", "--max-steps", "6"])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 1 and len(lines) == 1, err
    assert "No space left on device" in lines[0] and "step_0000006" in lines[0] and "intact" in lines[0]
    assert err.strip().splitlines()[-1] == lines[0]
    monkeypatch.undo()
    after = _snapshot(run)
    assert {k: after[k] for k in before} == before and _temporaries(run) == []
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "6"]) == 0  # space freed: carry on
    _assert_same_state(run, straight6, 6)


def test_out_of_disk_in_metrics_csv_exits_1(runs, tmp_path, monkeypatch, capsys):
    from diffcli.cli import main

    base3, _ = runs
    run = _copy(base3, tmp_path / "run")
    before = _snapshot(run)

    def full_open(path, mode="r", *a, **k):
        if "a" in mode:
            _enospc()
        return open(path, mode, *a, **k)

    monkeypatch.setattr(train_mod, "open", full_open, raising=False)
    rc = main(["train", "--out", str(run), "--resume", "--max-steps", "6"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 1 and len(lines) == 1 and "metrics.csv" in lines[0] and "No space left" in lines[0]
    assert _snapshot(run) == before


def test_out_of_disk_anywhere_else_is_one_line_exit_1(monkeypatch, capsys, tmp_path):
    """An OSError from a write no engine wraps still gives one line and exit 1 (main's last resort)."""
    from diffcli import cli

    def fail(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.png"))

    monkeypatch.setattr(cli, "app", fail)
    rc = cli.main(["sample", "whatever"])
    lines = _error_lines(capsys.readouterr().err)
    assert rc == 1 and lines == [f"error: {tmp_path / 'x.png'}: No space left on device"]


# --- lost or corrupt training state on --resume ------------------------------------------------------------------
def _resume(run: Path, steps: int = 9):
    return train(load_recipe(run / "recipe.toml", [f"train.max_steps={steps}"]), run, resume=True, **QUIET)


@pytest.mark.parametrize("damage, needle", [
    ("truncate_state", "step_0000006.state.safetensors"),
    ("garbage_state", "step_0000006.state.safetensors"),
    ("delete_state", "has no training state"),
    ("truncate_model", "step_0000006.safetensors"),
    ("wrong_step", "holds step '3'"),
    ("nan_state", "non-finite"),
    ("no_checkpoints", "no checkpoint with training state"),
])
def test_missing_or_corrupt_state_is_an_error(runs, tmp_path, damage, needle):
    _, straight6 = runs
    run = _copy(straight6, tmp_path / "run")
    ck = run / "checkpoints"
    state, model = ck / "step_0000006.state.safetensors", ck / "step_0000006.safetensors"
    if damage == "truncate_state":
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "garbage_state":
        state.write_bytes(b"\0" * 64)
    elif damage == "delete_state":
        state.unlink()
    elif damage == "truncate_model":
        model.write_bytes(model.read_bytes()[:-10])
    elif damage == "wrong_step":
        shutil.copy(ck / "step_0000003.state.safetensors", state)
    elif damage == "nan_state":
        from diffcli.checkpoint import read_safetensors, save_safetensors

        t, meta = read_safetensors(state)
        k = next(k for k in t if k.startswith("optim.") and t[k].is_floating_point() and t[k].numel() > 1)
        t[k].view(-1)[0] = float("nan")
        save_safetensors(state, t, meta)
    elif damage == "no_checkpoints":
        shutil.rmtree(ck)
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as e:
        _resume(run)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    after = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # refused before anything was touched, metrics.csv included


def test_state_without_its_model_file_is_an_unfinished_save(runs, tmp_path):
    """The state is written before the model checkpoint: a lone newest state is a save cut short, passed over."""
    _, straight6 = runs
    run = _copy(straight6, tmp_path / "run")
    (run / "checkpoints/step_0000006.safetensors").unlink()
    assert train_mod.latest_state(run) == (3, run / "checkpoints/step_0000003.state.safetensors")


# --- leftover temporaries are cleaned on every start, and only diffcli's own ------------------------------------
@pytest.mark.parametrize("mode", ["fresh", "force", "resume"])
def test_temporaries_cleaned_on_every_start(runs, tmp_path, tiny_recipe_path, mode):
    base3, _ = runs
    run = tmp_path / "run"
    if mode == "fresh":
        run.mkdir()
    else:
        _copy(base3, run)
    (run / "mine").mkdir()
    junk = [run / ".last.safetensors.k3j_9xq2.tmp", run / ".recipe.toml.zz00zz00.tmp"]
    if mode != "fresh":  # (a fresh folder with checkpoints/ already holds a run)
        junk.append(run / "checkpoints" / ".step_0000006.safetensors.abcd1234.tmp")
    keep = [run / ".notes.tmp", run / "mine" / ".last.safetensors.k3j_9xq2.tmp", run / "data.tmp"]
    for p in junk + keep:
        p.write_bytes(b"x")
    rec = load_recipe(tiny_recipe_path if mode != "resume" else run / "recipe.toml")
    prepare_run_folder(run, rec, resume=mode == "resume", force=mode == "force")
    assert [p for p in junk if p.exists()] == []
    assert all(p.exists() for p in keep)  # not diffcli's, or not in a folder diffcli writes to


# --- signals: the second one exits at once ----------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_second_signal_exits_at_once(sig, code):
    with train_mod._Signals() as s:
        os.kill(os.getpid(), sig)
        assert s.received == sig  # the first one only sets the flag
        with pytest.raises(Interrupted, match="interrupted again") as e:  # with a message, not a bare exit
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        assert e.value.exit_code == code
    assert signal.getsignal(sig) is not s._handle  # the previous handler is back


def test_force_removes_the_run_and_keeps_what_a_user_put_in_its_folders(runs, tmp_path, tiny_recipe_path):
    """`train --force` starts over: the run's checkpoints, samples and files go; a user's own file inside
    checkpoints/ or samples/ (a copied best checkpoint, a picked grid) stays, with the folder around it."""
    base3, _ = runs
    run = _copy(base3, tmp_path / "run")
    mine = [run / "checkpoints" / "best.safetensors", run / "samples" / "keep_me.png", run / "notes.txt"]
    for p in mine:
        p.write_bytes(b"mine")
    assert list((run / "checkpoints").glob("step_*"))
    prepare_run_folder(run, load_recipe(tiny_recipe_path), resume=False, force=True)
    assert all(p.read_bytes() == b"mine" for p in mine)
    assert not list((run / "checkpoints").glob("step_*")) and not list((run / "samples").glob("step_*"))
    assert not (run / "last.safetensors").exists() and not (run / "recipe.toml").exists()
    run2 = _copy(base3, tmp_path / "run2")  # nothing of the user's: the folders go entirely, as before
    prepare_run_folder(run2, load_recipe(tiny_recipe_path), resume=False, force=True)
    assert sorted(p.name for p in run2.iterdir()) == []
