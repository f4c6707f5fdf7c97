"""Every bad input of every command, one table: exit code 2, exactly one stderr line `error: …` naming the
problem, no traceback, and nothing written (the whole workspace — inputs, outputs, cwd, the cache — is
compared file by file before and after each case).

Each case runs in its own process. Starting Python + torch costs 3–6 s on the project machines, so by default
a case runs in a child forked from the test process (torch already imported) that enters `diffcli.cli.main`
with argv exactly as the `diffcli` console script does, with its own stdout/stderr file descriptors and exit
status. The cases marked EXEC (one or more per command) run the real `python -m diffcli` instead, and
`test_every_case_through_the_real_executable` (slow) runs the whole table that way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import run_cli

TRAIN_OVER = ["--set", "train.sample_grid=4"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_forked(argv: list[str], cwd: Path, env: dict[str, str]) -> Result:
    """`diffcli ARGV` in a forked child: own fds 1/2, own exit status, the console script's entry point."""
    with tempfile.TemporaryDirectory() as d:
        out_p, err_p = os.path.join(d, "out"), os.path.join(d, "err")
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            rc = 1
            try:
                os.chdir(cwd)
                os.environ.update(env)
                for fd, p in ((1, out_p), (2, err_p)):
                    f = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(f, fd)
                    os.close(f)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                sys.argv = ["diffcli", *argv]
                from diffcli.cli import main

                try:
                    rc = main(argv)
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:  # what the interpreter would do with an uncaught exception
                    traceback.print_exc()
                    rc = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc if isinstance(rc, int) else 1)
        _, status = os.waitpid(pid, 0)
        return Result(os.waitstatus_to_exitcode(status), Path(out_p).read_text(), Path(err_p).read_text())


def run_exec(argv: list[str], cwd: Path, env: dict[str, str]) -> Result:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        r = run_cli(*argv, cwd=cwd)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return Result(r.returncode, r.stdout, r.stderr)


# --- the workspace every case runs in ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_recipe_path, tiny_ckpt) -> Path:
    """Inputs for every case, and the cwd and cache of every run (so stray writes show up)."""
    from PIL import Image

    from diffcli.checkpoint import read_safetensors, save_safetensors
    from diffcli.recipes import load_recipe
    from diffcli.train import train

    w = tmp_path_factory.mktemp("cli_errors")
    shutil.copy(tiny_recipe_path, w / "tiny.toml")
    shutil.copy(tiny_ckpt, w / "ckpt.safetensors")
    # an unconditional checkpoint (for the CFG/class errors)
    train(load_recipe(w / "tiny.toml", ["data.class_conditional=false", "train.p_uncond=0", "train.max_steps=1",
                                        "train.sample_grid=4"]), w / "uncond_run", log=lambda *a, **k: None,
          show_progress=False)
    shutil.copy(w / "uncond_run" / "last.safetensors", w / "uncond.safetensors")
    shutil.rmtree(w / "uncond_run")
    # recipes
    (w / "unknown.toml").write_text("[train]\nlrr = 1\n")
    (w / "wrong.toml").write_text('[train]\nbatch_size = "big"\n')
    (w / "broken.toml").write_text("[train\nlr = 1\n")
    (w / "recipe_dir.toml").mkdir()
    base = (w / "tiny.toml").read_text()
    (w / "escape.toml").write_text(base.replace('name = "tiny"', 'name = "../escaped"'))
    (w / "absolute.toml").write_text(base.replace('name = "tiny"', f'name = "{w / "abs_run"}"'))
    # run folders: one holding a run, one without a run, one whose newest training state is corrupt
    (w / "held" / "checkpoints").mkdir(parents=True)
    (w / "held" / "recipe.toml").write_text("")
    (w / "norun").mkdir()
    train(load_recipe(w / "tiny.toml", ["train.max_steps=2", "train.checkpoint_every=2", "train.sample_grid=4"]),
          w / "corrupt_run", log=lambda *a, **k: None, show_progress=False)
    st = w / "corrupt_run" / "checkpoints" / "step_0000002.state.safetensors"
    st.write_bytes(st.read_bytes()[:500])
    # image folders
    (w / "empty_imgs").mkdir()
    for d in ("bad_imgs", "mixed_imgs", "good_imgs"):
        (w / d).mkdir()
    for i in range(3):
        Image.new("L", (8, 8), color=40 * i).save(w / "good_imgs" / f"{i}.png")
        Image.new("L", (8, 8), color=40 * i).save(w / "bad_imgs" / f"{i}.png")
        Image.new("L", (8, 8), color=40 * i).save(w / "mixed_imgs" / f"{i}.png")
    (w / "bad_imgs" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (8, 8)).save(w / "mixed_imgs" / "zz.png")
    (w / "sizes_imgs").mkdir()
    Image.new("L", (8, 8)).save(w / "sizes_imgs" / "a.png")
    Image.new("L", (9, 9)).save(w / "sizes_imgs" / "b.png")
    (w / "one_img").mkdir()
    Image.new("L", (8, 8)).save(w / "one_img" / "a.png")
    Image.new("RGB", (8, 8)).save(w / "rgb.png")
    (w / "notes.txt").write_text("hello")
    (w / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    # hostile and broken checkpoints
    (w / "garbage.safetensors").write_bytes(b"garbage that is not a safetensors file")
    (w / "model.pt").write_bytes(b"\x80\x04K\x01.")
    data = (w / "ckpt.safetensors").read_bytes()
    (w / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    t, meta = read_safetensors(w / "ckpt.safetensors")
    t["conv_in.bias"][0] = float("nan")
    save_safetensors(w / "nan.safetensors", t, meta)
    t, meta = read_safetensors(w / "ckpt.safetensors")
    save_safetensors(w / "badstep.safetensors", t, {**meta, "step": "abc"})
    save_safetensors(w / "fake_latents.safetensors", {"latents": torch.zeros(1, 1, 8, 8)}, {"kind": "other"})
    # output folders that already exist
    (w / "a_file").write_text("x")
    (w / "full_out").mkdir()
    (w / "full_out" / "keep.txt").write_text("x")
    (w / "outside").mkdir()
    (w / "linked_out").mkdir()
    (w / "linked_out" / "images").symlink_to(w / "outside", target_is_directory=True)
    (w / "file_out").mkdir()
    (w / "file_out" / "images").write_text("x")  # where sample writes its images: a file
    (w / "rgb_imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), color=(40 * i, 0, 0)).save(w / "rgb_imgs" / f"{i}.png")
    (w / "foreign_out" / "images").mkdir(parents=True)  # a user's own numbered PNGs, no diffcli record beside
    Image.new("L", (8, 8)).save(w / "foreign_out" / "images" / "000000.png")
    # run folders whose entries are of the wrong kind: a metrics.csv that is a folder, checkpoints that is a file
    for name, odd in (("mdir_run", "metrics.csv"), ("ckfile_run", "checkpoints")):
        (w / name).mkdir()
        shutil.copy(w / "corrupt_run" / "recipe.toml", w / name / "recipe.toml")
        (w / name / odd).mkdir() if odd.endswith(".csv") else (w / name / odd).write_text("x")
    (w / "cache").mkdir()
    (w / "guidance.toml").write_text('method = "guidance"\n[guidance]\nsteps = 99999999999\n')
    (w / "reflow.toml").write_text('method = "reflow"\n[reflow]\npair_steps = 99999999999\n')
    return w


# --- the table: (id, argv, needles) — "{w}" is the workspace; EXEC marks real-executable cases -------------------
EXEC = {"train: unknown key", "sample: pickle", "eval-fid: unknown metric", "encode: broken image",
        "distill: teacher steps beyond any grid"}

CASES: list[tuple[str, list[str], list[str]]] = [
    # train — recipe, options, run folder, dataset
    ("train: missing recipe", ["train", "{w}/missing.toml", "--out", "{w}/o"], ["missing.toml", "does not exist"]),
    ("train: recipe is a folder", ["train", "{w}/recipe_dir.toml", "--out", "{w}/o"], ["recipe_dir.toml", "folder"]),
    ("train: not TOML", ["train", "{w}/broken.toml", "--out", "{w}/o"], ["broken.toml", "not valid TOML"]),
    ("train: unknown key", ["train", "{w}/unknown.toml", "--out", "{w}/o"], ["unknown key train.lrr"]),
    ("train: wrong type", ["train", "{w}/wrong.toml", "--out", "{w}/o"], ["train.batch_size", '"big"']),
    ("train: lr 0", ["train", "{w}/tiny.toml", "--set", "train.lr=0", "--out", "{w}/o"], ["train.lr = 0"]),
    ("train: lr negative", ["train", "{w}/tiny.toml", "--set", "train.lr=-1e-3", "--out", "{w}/o"], ["train.lr"]),
    ("train: batch size 0", ["train", "{w}/tiny.toml", "--set", "train.batch_size=0", "--out", "{w}/o"],
     ["train.batch_size = 0"]),
    ("train: --set without =", ["train", "{w}/tiny.toml", "--set", "trainlr", "--out", "{w}/o"],
     ["--set 'trainlr'", "section.key=value"]),
    ("train: --set into a value", ["train", "{w}/tiny.toml", "--set", "train.lr.x=1", "--out", "{w}/o"],
     ["--set", "not a section"]),
    ("train: device from the recipe", ["train", "{w}/tiny.toml", "--set", "train.device='tpu'", "--out", "{w}/o"],
     ["train.device 'tpu'", "not a device"]),
    ("train: metrics.csv is a folder", ["train", "--out", "{w}/mdir_run", "--resume"],
     ["metrics.csv is a folder", "move it away"]),
    ("train: checkpoints is a file", ["train", "--out", "{w}/ckfile_run", "--resume"], ["checkpoints is a file"]),
    ("train: batch size beyond int64", ["train", "{w}/tiny.toml", "--set", "train.batch_size=99999999999999999999",
                                        "--out", "{w}/o"], ["train.batch_size", "out of range"]),
    ("train: batch size too large", ["train", "{w}/tiny.toml", "--set", "train.batch_size=9999999", "--out",
                                     "{w}/o"], ["train.batch_size = 9999999"]),
    ("train: --out cannot be created", ["train", "{w}/tiny.toml", "--out", "/proc/diffcli_no_such/run"],
     ["cannot create the run folder"]),
    ("train: empty --out", ["train", "{w}/tiny.toml", "--out", ""], ["--out ''", "empty path"]),
    ("train: --max-steps 0", ["train", "{w}/tiny.toml", "--max-steps", "0", "--out", "{w}/o"], ["--max-steps 0"]),
    ("train: --max-steps not a number", ["train", "{w}/tiny.toml", "--max-steps", "many", "--out", "{w}/o"],
     ["--max-steps"]),
    ("train: unknown option", ["train", "{w}/tiny.toml", "--learning-rate", "1", "--out", "{w}/o"],
     ["--learning-rate"]),
    ("train: no recipe", ["train"], ["needs a RECIPE"]),
    ("train: run folder held", ["train", "{w}/tiny.toml", "--out", "{w}/held"],
     ["already holds a run", "--resume", "--force"]),
    ("train: --out is a file", ["train", "{w}/tiny.toml", "--out", "{w}/a_file"], ["a_file", "is a file"]),
    ("train: resume without a run", ["train", "{w}/tiny.toml", "--out", "{w}/norun", "--resume"], ["holds no run"]),
    ("train: resume with another recipe", ["train", "{w}/tiny.toml", "--set", "train.lr=1e-4", "--out",
                                           "{w}/corrupt_run", "--resume"], ["differs", "train.lr"]),
    ("train: corrupt training state", ["train", "--out", "{w}/corrupt_run", "--resume", "--max-steps", "4"],
     ["step_0000002.state.safetensors", "delete"]),
    ("train: name escapes runs/", ["train", "{w}/escape.toml"], ["'../escaped'", "plain folder name"]),
    ("train: absolute name", ["train", "{w}/absolute.toml"], ["abs_run", "plain folder name"]),
    ("train: CFG dropout without labels", ["train", "{w}/tiny.toml", "--set", "data.name=celeba", "--out", "{w}/o"],
     ["p_uncond"]),
    ("train: dataset not there", ["train", "{w}/tiny.toml", "--set", "data.name=celeba", "--set", "train.p_uncond=0",
                                  "--set", "data.root={w}/nodata", "--set", "data.resolution=8", "--out", "{w}/o"], ["celeba", "img_align_celeba"]),
    ("train: consistency parameterization", ["train", "{w}/tiny.toml", "--set", "diffusion.parameterization=consistency",
                                             "--out", "{w}/o"], ["consistency", "diffcli distill"]),
    ("train: imagefolder without path", ["train", "{w}/tiny.toml", "--set", "data.name=imagefolder", "--out",
                                         "{w}/o"], ["data.path"]),
    ("train: imagefolder missing", ["train", "{w}/tiny.toml", "--set", "data.name=imagefolder", "--set",
                                    "data.path={w}/nope", "--out", "{w}/o"], ["data.path", "not a folder"]),
    ("train: imagefolder empty", ["train", "{w}/tiny.toml", "--set", "data.name=imagefolder", "--set",
                                  "data.path={w}/empty_imgs", "--out", "{w}/o"], ["empty_imgs", "no images"]),
    ("train: imagefolder broken image", ["train", "{w}/tiny.toml", "--set", "data.name=imagefolder", "--set",
                                         "data.path={w}/bad_imgs", "--out", "{w}/o"], ["zz.png", "not a readable"]),
    ("train: imagefolder mixed channels", ["train", "{w}/tiny.toml", "--set", "data.name=imagefolder", "--set",
                                           "data.path={w}/mixed_imgs", "--out", "{w}/o"], ["zz.png", "channel"]),
    ("train: bad --device", ["train", "{w}/tiny.toml", "--device", "tpu:9", "--out", "{w}/o"], ["--device"]),
    ("train: --force keeps the run when the data is bad",
     ["train", "{w}/tiny.toml", "--force", "--set", "data.name=imagefolder", "--set", "data.path={w}/nope",
      "--out", "{w}/corrupt_run"], ["data.path"]),
    ("train: sigma_min below float32", ["train", "{w}/tiny.toml", "--set", "diffusion.sigma_min=1e-300", "--out",
                                         "{w}/o"], ["sigma_min = 1e-300", "float32"]),
    ("train: sigma_max beyond float32", ["train", "{w}/tiny.toml", "--set", "diffusion.sigma_max=1e300", "--out",
                                         "{w}/o"], ["sigma_max = 1e+300", "float32"]),
    ("train: sample.steps huge", ["train", "{w}/tiny.toml", "--set", "sample.steps=99999999999", "--out", "{w}/o"],
     ["sample.steps = 99999999999"]),
    # distill — recipe values that reach a sampler
    ("distill: teacher steps beyond any grid", ["distill", "{w}/guidance.toml", "--teacher", "{w}/ckpt.safetensors",
                                                "--out", "{w}/o"], ["guidance.steps = 99999999999"]),
    ("distill: reflow pair steps huge", ["distill", "{w}/reflow.toml", "--teacher", "{w}/ckpt.safetensors", "--out",
                                         "{w}/o"], ["reflow.pair_steps = 99999999999"]),
    # sample — checkpoint file, options, output folder
    ("sample: n beyond int64", ["sample", "{w}/ckpt.safetensors", "--n", "99999999999999999999", "--out", "{w}/s"],
     ["--n 99999999999999999999", "at most"]),
    ("sample: n past memory", ["sample", "{w}/ckpt.safetensors", "--n", "999999999999", "--out", "{w}/s"],
     ["--n 999999999999", "at most"]),
    ("sample: steps huge", ["sample", "{w}/ckpt.safetensors", "--steps", "99999999999", "--out", "{w}/s"],
     ["--steps 99999999999", "at most"]),
    ("sample: nfe huge", ["sample", "{w}/ckpt.safetensors", "--sampler", "euler", "--nfe", "99999999999", "--out",
                          "{w}/s"], ["--nfe 99999999999"]),
    ("eval-fid: n huge", ["eval-fid", "{w}/ckpt.safetensors", "--n", "99999999999999999999"], ["--n", "at most"]),
    ("eval-fid: nfe huge in a list", ["eval-fid", "{w}/ckpt.safetensors", "--nfe", "5,99999999999"],
     ["--nfe '5,99999999999'", "at most"]),
    ("encode: nfe huge", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--nfe", "99999999999999999999",
                          "--out", "{w}/e"], ["--nfe 99999999999999999999"]),
    ("encode: probes huge", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--nll", "--probes",
                             "99999999999", "--out", "{w}/e"], ["--probes 99999999999"]),
    ("encode: frames huge", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "{w}/good_imgs/1.png",
                             "--interpolate", "--frames", "99999999999", "--out", "{w}/e"], ["--frames 99999999999"]),
    ("sample: no checkpoint", ["sample", "--out", "{w}/s"], ["needs a CHECKPOINT"]),
    ("sample: missing checkpoint", ["sample", "{w}/nope.safetensors", "--out", "{w}/s"],
     ["nope.safetensors", "does not exist"]),
    ("sample: checkpoint is a folder", ["sample", "{w}/empty_imgs", "--out", "{w}/s"], ["empty_imgs", "folder"]),
    ("sample: not safetensors", ["sample", "{w}/garbage.safetensors", "--out", "{w}/s"], ["garbage.safetensors"]),
    ("sample: pickle", ["sample", "{w}/model.pt", "--out", "{w}/s"], ["model.pt", "pickle"]),
    ("sample: truncated checkpoint", ["sample", "{w}/truncated.safetensors", "--out", "{w}/s"],
     ["truncated.safetensors"]),
    ("sample: non-finite weights", ["sample", "{w}/nan.safetensors", "--out", "{w}/s"],
     ["nan.safetensors", "conv_in.bias", "non-finite"]),
    ("sample: steps 0", ["sample", "{w}/ckpt.safetensors", "--steps", "0", "--out", "{w}/s"], ["--steps 0"]),
    ("sample: steps not a number", ["sample", "{w}/ckpt.safetensors", "--steps", "x", "--out", "{w}/s"], ["--steps"]),
    ("sample: eta negative", ["sample", "{w}/ckpt.safetensors", "--eta", "-0.5", "--out", "{w}/s"], ["--eta -0.5"]),
    ("sample: cfg negative", ["sample", "{w}/ckpt.safetensors", "--cfg", "-1", "--out", "{w}/s"], ["--cfg -1"]),
    ("sample: cfg nan", ["sample", "{w}/ckpt.safetensors", "--cfg", "nan", "--out", "{w}/s"], ["--cfg nan", "finite"]),
    ("sample: classifier scale inf", ["sample", "{w}/ckpt.safetensors", "--classifier-scale", "inf", "--out", "{w}/s"],
     ["--classifier-scale inf"]),
    ("sample: batch size 0", ["sample", "{w}/ckpt.safetensors", "--batch-size", "0", "--out", "{w}/s"],
     ["--batch-size 0"]),
    ("sample: n 0", ["sample", "{w}/ckpt.safetensors", "--n", "0", "--out", "{w}/s"], ["--n 0"]),
    ("sample: class out of range", ["sample", "{w}/ckpt.safetensors", "--class", "10", "--out", "{w}/s"],
     ["--class 10", "0..9"]),
    ("sample: unknown sampler", ["sample", "{w}/ckpt.safetensors", "--sampler", "magic", "--out", "{w}/s"],
     ["magic", "ddim"]),
    ("sample: unknown schedule", ["sample", "{w}/ckpt.safetensors", "--schedule", "wavy", "--out", "{w}/s"],
     ["--schedule 'wavy'"]),
    ("sample: steps and nfe", ["sample", "{w}/ckpt.safetensors", "--steps", "4", "--nfe", "8", "--out", "{w}/s"],
     ["--steps or --nfe"]),
    ("sample: out under a file", ["sample", "{w}/ckpt.safetensors", "--n", "2", "--out", "{w}/a_file/sub"],
     ["--out", "a_file", "is a file"]),
    ("eval-fid: ref-split with a folder", ["eval-fid", "{w}/good_imgs", "--ref", "{w}/good_imgs", "--ref-split",
                                          "test"], ["--ref-split 'test'", "no splits"]),
    ("eval-fid: out under a file", ["eval-fid", "{w}/ckpt.safetensors", "--n", "4", "--nfe", "2", "--sampler",
                                    "ddim,euler", "--out", "{w}/a_file/ev"], ["--out", "a_file", "is a file"]),
    ("train: out under a file", ["train", "{w}/tiny.toml", "--out", "{w}/a_file/run"], ["--out", "a_file"]),
    ("encode: out under a file", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs", "--out", "{w}/a_file/e"],
     ["--out", "a_file"]),
    ("sample: metadata step not an integer", ["sample", "{w}/badstep.safetensors", "--n", "4", "--out", "{w}/s"],
     ["badstep.safetensors", "step = 'abc'"]),
    ("encode: metadata step not an integer", ["encode", "{w}/badstep.safetensors", "{w}/good_imgs", "--out",
                                              "{w}/e"], ["badstep.safetensors", "step = 'abc'"]),
    ("sample: steps not an integer", ["sample", "{w}/ckpt.safetensors", "--steps", "1.5", "--out", "{w}/s"],
     ["--steps", "'1.5'"]),
    ("sample: cfg not a number (= form)", ["sample", "{w}/ckpt.safetensors", "--cfg=x", "--out", "{w}/s"],
     ["--cfg", "'x'"]),
    ("sample: cfg-interval not numbers", ["sample", "{w}/ckpt.safetensors", "--cfg-interval", "abc", "--out",
                                          "{w}/s"], ["--cfg-interval 'abc'"]),
    ("sample: classifier-scale without classifier", ["sample", "{w}/ckpt.safetensors", "--classifier-scale", "1",
                                                     "--out", "{w}/s"], ["--classifier"]),
    ("sample: classifier without a scale", ["sample", "{w}/ckpt.safetensors", "--classifier", "{w}/ckpt.safetensors",
                                            "--out", "{w}/s"], ["--classifier", "--classifier-scale"]),
    ("sample: classifier is a denoiser", ["sample", "{w}/ckpt.safetensors", "--classifier", "{w}/ckpt.safetensors",
                                          "--classifier-scale", "1", "--out", "{w}/s"], ["classifier"]),
    ("sample: cfg on unconditional", ["sample", "{w}/uncond.safetensors", "--cfg", "3", "--out", "{w}/s"],
     ["--cfg 3", "unconditional"]),
    ("sample: class on unconditional", ["sample", "{w}/uncond.safetensors", "--class", "1", "--out", "{w}/s"],
     ["--class 1", "unconditional"]),
    ("sample: --out is a file", ["sample", "{w}/ckpt.safetensors", "--out", "{w}/a_file"], ["a_file", "is a file"]),
    ("sample: --out not empty", ["sample", "{w}/ckpt.safetensors", "--out", "{w}/full_out"], ["not empty", "--force"]),
    ("sample: symlinked images folder", ["sample", "{w}/ckpt.safetensors", "--n", "2", "--steps", "2", "--force",
                                         "--out", "{w}/linked_out"], ["images", "symbolic link"]),
    ("sample: images is a file", ["sample", "{w}/ckpt.safetensors", "--n", "2", "--steps", "2", "--force", "--out",
                                  "{w}/file_out"], ["file_out", "images is a file"]),
    ("sample: --steps for an adaptive solver", ["sample", "{w}/ckpt.safetensors", "--sampler", "rk45", "--steps", "50",
                                               "--out", "{w}/s"], ["--steps 50", "adaptive", "--rtol"]),
    ("sample: --force over images diffcli did not write", ["sample", "{w}/ckpt.safetensors", "--n", "2", "--steps",
                                                           "2", "--force", "--out", "{w}/foreign_out"],
     ["foreign_out", "000000.png", "sample.json"]),
    ("sample: bad --device", ["sample", "{w}/ckpt.safetensors", "--device", "cuda:7", "--out", "{w}/s"],
     ["--device"]),
    # eval-fid — the failures that come before any feature extractor runs
    ("eval-fid: RGB images against digits", ["eval-fid", "{w}/rgb_imgs", "--ref", "digits"],
     ["rgb_imgs", "3 channel(s)", "reference 1"]),  # said before Inception's weights are fetched
    ("eval-fid: missing generated", ["eval-fid", "{w}/nope", "--ref", "digits"], ["nope", "does not exist"]),
    ("eval-fid: not a checkpoint nor folder", ["eval-fid", "{w}/notes.txt", "--ref", "digits"], ["notes.txt"]),
    ("eval-fid: pickle", ["eval-fid", "{w}/model.pt", "--ref", "digits"], ["model.pt"]),
    ("eval-fid: empty folder", ["eval-fid", "{w}/empty_imgs", "--ref", "digits"], ["holds no images"]),
    ("eval-fid: broken image", ["eval-fid", "{w}/bad_imgs", "--ref", "digits"], ["zz.png"]),
    ("eval-fid: mixed sizes", ["eval-fid", "{w}/sizes_imgs", "--ref", "digits"], ["mixed sizes"]),
    ("eval-fid: mixed channels", ["eval-fid", "{w}/mixed_imgs", "--ref", "digits"], ["mixed sizes or channels"]),
    ("eval-fid: one image", ["eval-fid", "{w}/one_img", "--ref", "digits"], ["at least 2"]),
    ("eval-fid: unknown metric", ["eval-fid", "{w}/good_imgs", "--ref", "digits", "--metrics", "fid,fvd"],
     ["--metrics"]),
    ("eval-fid: n below 2", ["eval-fid", "{w}/good_imgs", "--ref", "digits", "--n", "1"], ["--n 1"]),
    ("eval-fid: batch size 0", ["eval-fid", "{w}/good_imgs", "--ref", "digits", "--batch-size", "0"],
     ["--batch-size 0"]),
    ("eval-fid: seed negative", ["eval-fid", "{w}/good_imgs", "--ref", "digits", "--seed", "-1"], ["--seed -1"]),
    ("eval-fid: missing inception weights", ["eval-fid", "{w}/good_imgs", "--ref", "digits", "--extractor",
                                             "inception", "--inception-weights", "{w}/none.pth"],
     ["--inception-weights"]),
    ("eval-fid: sampler with a folder", ["eval-fid", "{w}/good_imgs", "--ref", "digits", "--nfe", "5"],
     ["need a checkpoint"]),
    ("eval-fid: empty sampler name", ["eval-fid", "{w}/ckpt.safetensors", "--sampler", "ddim,"],
     ["--sampler 'ddim,'", "empty name"]),
    ("eval-fid: unknown sampler", ["eval-fid", "{w}/ckpt.safetensors", "--sampler", "magic"], ["magic"]),
    ("eval-fid: steps and nfe", ["eval-fid", "{w}/ckpt.safetensors", "--steps", "4", "--nfe", "8"],
     ["--steps or --nfe"]),
    ("eval-fid: nfe for an adaptive solver alone", ["eval-fid", "{w}/ckpt.safetensors", "--sampler", "rk45", "--nfe",
                                                    "8"], ["--nfe 8", "rk45 is adaptive", "tolerance"]),
    ("eval-fid: nfe not a number", ["eval-fid", "{w}/ckpt.safetensors", "--nfe", "5,x"], ["--nfe", "'x'"]),
    ("eval-fid: truncated checkpoint", ["eval-fid", "{w}/truncated.safetensors"], ["truncated.safetensors"]),
    # encode — checkpoint, inputs, options, output folder
    ("encode: pickle", ["encode", "{w}/model.pt", "{w}/good_imgs/0.png", "--out", "{w}/e"], ["model.pt", "pickle"]),
    ("encode: broken image", ["encode", "{w}/ckpt.safetensors", "{w}/broken.png", "--out", "{w}/e"], ["broken.png"]),
    ("encode: not an image", ["encode", "{w}/ckpt.safetensors", "{w}/notes.txt", "--out", "{w}/e"], ["notes.txt"]),
    ("encode: wrong channels", ["encode", "{w}/ckpt.safetensors", "{w}/rgb.png", "--out", "{w}/e"], ["channel"]),
    ("encode: missing input", ["encode", "{w}/ckpt.safetensors", "{w}/missing.png", "--out", "{w}/e"],
     ["missing.png"]),
    ("encode: empty input folder", ["encode", "{w}/ckpt.safetensors", "{w}/empty_imgs", "--out", "{w}/e"],
     ["empty_imgs"]),
    ("encode: no inputs", ["encode", "{w}/ckpt.safetensors", "--out", "{w}/e"], ["INPUTS"]),
    ("encode: interpolate one image", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--interpolate",
                                       "--out", "{w}/e"], ["--interpolate"]),
    ("encode: frames 1", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "{w}/good_imgs/1.png",
                          "--interpolate", "--frames", "1", "--out", "{w}/e"], ["--frames"]),
    ("encode: probes without nll", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--probes", "8",
                                    "--out", "{w}/e"], ["--probes 8", "--nll"]),
    ("encode: probes with exact divergence", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--nll",
                                              "--exact-divergence", "--probes", "4", "--out", "{w}/e"],
     ["--probes 4", "--exact-divergence"]),
    ("encode: frames without interpolate", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--frames",
                                            "5", "--out", "{w}/e"], ["--frames 5", "--interpolate"]),
    ("encode: nfe too small", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--solver", "heun", "--nfe",
                               "2", "--out", "{w}/e"], ["--nfe 2"]),
    ("encode: stochastic solver", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--solver", "ddpm",
                                   "--out", "{w}/e"], ["ddpm"]),
    ("encode: rk45 with nfe", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--solver", "rk45", "--nfe",
                               "20", "--out", "{w}/e"], ["--rtol"]),
    ("encode: heun with rtol", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--solver", "heun",
                                "--rtol", "1e-4", "--out", "{w}/e"], ["--rtol"]),
    ("encode: exact divergence without nll", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png",
                                              "--exact-divergence", "--out", "{w}/e"], ["--nll"]),
    ("encode: nll with guidance", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--nll", "--cfg", "2",
                                   "--class", "1", "--out", "{w}/e"], ["--cfg"]),
    ("encode: class out of range", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--class", "10",
                                    "--out", "{w}/e"], ["--class 10"]),
    ("encode: decode a non-latents file", ["encode", "{w}/ckpt.safetensors", "--decode",
                                           "{w}/fake_latents.safetensors", "--out", "{w}/e"],
     ["fake_latents.safetensors", "not a diffcli latents file"]),
    ("encode: decode an image", ["encode", "{w}/ckpt.safetensors", "--decode", "{w}/good_imgs/0.png", "--out",
                                 "{w}/e"], ["0.png"]),
    ("encode: decode with inputs", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--decode",
                                    "{w}/fake_latents.safetensors", "--out", "{w}/e"], ["takes no INPUTS"]),
    ("encode: --out not empty", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--out", "{w}/full_out"],
     ["not empty"]),
    ("encode: symlinked images folder", ["encode", "{w}/ckpt.safetensors", "{w}/good_imgs/0.png", "--force",
                                         "--out", "{w}/linked_out"], ["images", "symbolic link"]),
]


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, size and mtime (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns)
    return out


def _check(case_id: str, argv: list[str], needles: list[str], w: Path, runner) -> None:
    args = [a.replace("{w}", str(w)) for a in argv]
    if args[0] != "train" and "--device" not in args:
        args += ["--device", "cpu"]
    before = _tree(w)
    r = runner(args, w, {"XDG_CACHE_HOME": str(w / "cache"), "OMP_NUM_THREADS": "1"})
    err = r.stderr
    assert "Traceback" not in err, (case_id, err)
    assert r.returncode == 2, (case_id, r.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case_id, err)
    for n in needles:
        assert n.replace("{w}", str(w)) in lines[0], (case_id, n, lines[0])
    after = _tree(w)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (case_id, "wrote", changed)


@pytest.mark.parametrize("case_id, argv, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ws, case_id, argv, needles):
    _check(case_id, argv, needles, ws, run_exec if case_id in EXEC else run_forked)


@pytest.mark.slow
def test_every_case_through_the_real_executable(ws):
    failures = []
    for case_id, argv, needles in CASES:
        try:
            _check(case_id, argv, needles, ws, run_exec)
        except AssertionError as e:
            failures.append(str(e))
    assert not failures, "\n".join(failures)


def test_table_covers_every_command():
    from diffcli.cli import app

    commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    covered = {c[0].split(":")[0] for c in CASES}
    assert {"train", "sample", "eval-fid", "encode"} <= commands & covered, (commands, covered)
    assert {c.split(":")[0] for c in EXEC} == {c[0].split(":")[0] for c in CASES}  # a real exec per command
