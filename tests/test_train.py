"""The training engine: bit-exact resume, run-folder policy, divergence, EMA and data order."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from diffcli.errors import RunFailure, UserError
from diffcli.recipes import load_recipe
from diffcli.train import BatchOrder, train

QUIET = dict(log=lambda *a, **k: None, show_progress=False)


def _loss_column(run):
    with open(run / "metrics.csv") as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_resume_is_bit_exact(tiny_recipe_path, tmp_path):
    """N steps, stop, resume to 2N equals 2N straight: raw weights, EMA, optimizer state and the loss column."""
    over = ["train.max_steps=12", "train.checkpoint_every=6", "train.sample_every=1000", "train.log_every=3",
            "train.sample_grid=4", "data.hflip=true", "model.dropout=0.1"]
    straight = tmp_path / "straight"
    train(load_recipe(tiny_recipe_path, over), straight, **QUIET)
    resumed = tmp_path / "resumed"
    train(load_recipe(tiny_recipe_path, ["train.max_steps=6"] + over[1:]), resumed, **QUIET)
    train(load_recipe(tiny_recipe_path, over), resumed, resume=True, **QUIET)
    a = load_file(str(straight / "checkpoints/step_0000012.state.safetensors"))
    b = load_file(str(resumed / "checkpoints/step_0000012.state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _loss_column(straight) == _loss_column(resumed)
    assert (load_file(str(straight / "last.safetensors"))["conv_out.weight"]
            == load_file(str(resumed / "last.safetensors"))["conv_out.weight"]).all()


def test_run_folder_is_never_overwritten(tiny_recipe_path, tmp_path):
    out = tmp_path / "run"
    rec = load_recipe(tiny_recipe_path, ["train.max_steps=2", "train.sample_grid=4"])
    train(rec, out, **QUIET)
    before = (out / "last.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(rec, out, **QUIET)
    assert (out / "last.safetensors").read_bytes() == before
    other = load_recipe(tiny_recipe_path, ["train.max_steps=4", "train.lr=1e-4"])
    with pytest.raises(UserError, match="train.lr"):
        train(other, out, resume=True, **QUIET)
    train(rec, out, force=True, **QUIET)  # --force starts over
    assert (out / "last.safetensors").exists()


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tiny_recipe_path, tmp_path):
    out = tmp_path / "run"
    rec = load_recipe(tiny_recipe_path, ["train.max_steps=10", "train.checkpoint_every=3", "train.sample_grid=4"])
    with pytest.raises(RunFailure, match=r"step 4: loss is nan .*last finite loss"):
        train(rec, out, nan_at_step=4, **QUIET)
    good = load_file(str(out / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert (out / "checkpoints/step_0000003.safetensors").exists()
    # skip_nonfinite lets the run go on past one bad step
    rec2 = load_recipe(tiny_recipe_path, ["train.max_steps=6", "train.skip_nonfinite=1", "train.sample_grid=4"])
    res = train(rec2, tmp_path / "run2", nan_at_step=2, **QUIET)
    assert res.step == 6


def test_retention_keeps_newest(tiny_recipe_path, tmp_path):
    out = tmp_path / "run"
    rec = load_recipe(tiny_recipe_path, ["train.max_steps=8", "train.checkpoint_every=2", "train.keep_last=2",
                                         "train.sample_grid=4"])
    train(rec, out, **QUIET)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_0000006.safetensors", "step_0000006.state.safetensors",
                     "step_0000008.safetensors", "step_0000008.state.safetensors"]


def test_batch_order_is_epochs_of_permutations():
    order = BatchOrder(10, 4, seed=3)
    seen = torch.cat([order.indices(s) for s in range(5)])  # 20 indices = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(BatchOrder(10, 4, seed=3).indices(3), order.indices(3))


def test_bf16_autocast_trains_and_saves_float32(tiny_recipe_path, tmp_path):
    """`train.bf16 = true` runs the forward under bf16 autocast (on the CPU too): the losses stay finite and
    close to the float32 run's, and checkpoints keep float32 weights (autocast casts per op). The first step's
    loss is the same in both — the zero-initialised output layer predicts exactly 0 — so steps 2 and 3 tell."""
    over = ["train.max_steps=3", "train.sample_grid=4", "train.log_every=1"]
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    train(load_recipe(tiny_recipe_path, over), fp32, **QUIET)
    train(load_recipe(tiny_recipe_path, over + ["train.bf16=true"]), bf16, **QUIET)
    a = [float(v) for _, v in _loss_column(fp32)]
    b = [float(v) for _, v in _loss_column(bf16)]
    assert len(a) == len(b) == 3
    assert a[1:] != b[1:]  # bf16 really ran
    for la, lb in zip(a, b):
        assert abs(la - lb) < 0.02 * la, (a, b)
    w = load_file(str(bf16 / "last.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values() if v.is_floating_point())


def test_image_folder_size_the_unet_cannot_halve_is_refused_before_the_run_folder(tiny_recipe_path, tmp_path):
    """An image folder without data.resolution has its size known only once read: a UNet whose down-sampling
    does not divide it is bad input then, before anything is written (not a shape error mid-step)."""
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("L", (14, 10), color=40 * i).save(tmp_path / "imgs" / "a" / f"{i}.png")
    rec = load_recipe(tiny_recipe_path, ["data.name=\"imagefolder\"", f"data.path=\"{tmp_path / 'imgs'}\"",
                                         "model.channel_mult=[1,2,2]", "train.p_uncond=0", "train.max_steps=1"])
    with pytest.raises(UserError, match=r"channel_mult = \[1, 2, 2\].*resolution 10"):
        train(rec, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


def test_cfg_dropout_on_a_folder_without_classes_is_refused(tiny_recipe_path, tmp_path):
    """train.p_uncond > 0 on an image folder without class sub-folders would train an unconditional model
    while the recipe asks for CFG: bad input once the folder is read, before the run folder."""
    from PIL import Image

    (tmp_path / "flat").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=40 * i).save(tmp_path / "flat" / f"{i}.png")
    rec = load_recipe(tiny_recipe_path, ["data.name=\"imagefolder\"", f"data.path=\"{tmp_path / 'flat'}\"",
                                         "train.p_uncond=0.1", "train.max_steps=1"])
    with pytest.raises(UserError, match=r"train.p_uncond = 0.1 .*no class sub-folders"):
        train(rec, tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()
