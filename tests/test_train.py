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


@pytest.mark.parametrize("channels_last", ["true", "false"])
def test_resume_is_bit_exact(tiny_recipe_path, tmp_path, channels_last):
    """N steps, stop, resume to 2N equals 2N straight: raw weights, EMA, optimizer state and the loss column —
    in both memory layouts (a channels_last resume must re-stride the restored Adam moments)."""
    over = [f"train.channels_last={channels_last}", "train.max_steps=12", "train.checkpoint_every=6", "train.sample_every=1000", "train.log_every=3",
            "train.sample_grid=4", "data.hflip=true", "model.dropout=0.1"]
    straight = tmp_path / "straight"
    train(load_recipe(tiny_recipe_path, over), straight, **QUIET)
    resumed = tmp_path / "resumed"
    train(load_recipe(tiny_recipe_path, ["train.max_steps=6"] + over[:1] + over[2:]), resumed, **QUIET)
    train(load_recipe(tiny_recipe_path, over), resumed, resume=True, **QUIET)
    a = load_file(str(straight / "checkpoints/step_0000012.state.safetensors"))
    b = load_file(str(resumed / "checkpoints/step_0000012.state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _loss_column(straight) == _loss_column(resumed)
    assert (load_file(str(straight / "last.safetensors"))["conv_out.weight"]
            == load_file(str(resumed / "last.safetensors"))["conv_out.weight"]).all()


def test_a_stop_between_log_rows_resumes_into_the_same_rows(tiny_recipe_path, tmp_path):
    """A stop between two log rows (here the time budget after step 1; a signal takes the same path) writes a
    row of its own and keeps its loss window in the state: the resumed run drops that row and goes on adding,
    so metrics.csv's loss column and the final state equal an uninterrupted run's."""
    over = ["train.max_steps=9", "train.checkpoint_every=6", "train.sample_every=1000", "train.log_every=3",
            "train.sample_grid=4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(load_recipe(tiny_recipe_path, over), straight, **QUIET)
    res = train(load_recipe(tiny_recipe_path, over + ["train.max_minutes=1e-9"]), resumed, **QUIET)
    assert res.stopped_by == "max_minutes" and res.step == 1
    assert [s for s, _ in _loss_column(resumed)] == ["1"]  # the stop's own row
    assert "window.loss_sum" in load_file(str(resumed / "checkpoints/step_0000001.state.safetensors"))
    train(load_recipe(tiny_recipe_path, over), resumed, resume=True, **QUIET)
    assert _loss_column(resumed) == _loss_column(straight)
    assert [s for s, _ in _loss_column(straight)] == ["3", "6", "9"]
    a = load_file(str(straight / "checkpoints/step_0000009.state.safetensors"))
    b = load_file(str(resumed / "checkpoints/step_0000009.state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_repairs_a_metrics_file_that_lost_its_header(tiny_recipe_path, tmp_path):
    """metrics.csv emptied by a full disk (or a user's edit) comes back on resume with its header and rows;
    lines end in "\n" (no stray "\r" for shell tools)."""
    over = ["train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2", "train.sample_every=1000",
            "train.sample_grid=4"]
    run = tmp_path / "run"
    train(load_recipe(tiny_recipe_path, ["train.max_steps=2"] + over[1:]), run, **QUIET)
    (run / "metrics.csv").write_text("foo\nbar,baz\n")
    train(load_recipe(tiny_recipe_path, over), run, resume=True, **QUIET)
    text = (run / "metrics.csv").read_bytes()
    assert b"\r" not in text and text.decode().splitlines()[0] == "step,loss,lr,images_per_s,seconds"
    assert [s for s, _ in _loss_column(run)] == ["4"]
    (run / "metrics.csv").write_bytes(b"")
    train(load_recipe(tiny_recipe_path, over), tmp_path / "fresh", **QUIET)  # a fresh run writes it whole
    assert (tmp_path / "fresh" / "metrics.csv").read_text().startswith("step,loss")


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


def test_channels_last_changes_the_layout_not_the_training(tiny_recipe_path, tmp_path):
    """Same recipe in both layouts: the loss curve and the weights agree to float32 rounding (the convolution
    kernels sum in a different order), and the checkpoint files hold the same contiguous tensors."""
    over = ["train.max_steps=8", "train.log_every=1", "train.sample_grid=4"]
    runs = {}
    for cl in ("true", "false"):
        runs[cl] = tmp_path / cl
        train(load_recipe(tiny_recipe_path, over + [f"train.channels_last={cl}"]), runs[cl], **QUIET)
    a, b = (load_file(str(runs[cl] / "last.safetensors")) for cl in ("true", "false"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].is_contiguous() and a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
    la, lb = ([float(v) for _, v in _loss_column(runs[cl])] for cl in ("true", "false"))
    assert len(la) == len(lb) == 8
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-4, atol=0)


def test_restored_adam_moments_take_the_parameters_layout():
    """Optimizer.load_state_dict restores moments contiguous; fused AdamW on a channels_last parameter with
    contiguous moments computes wrong updates. After match_state_strides a resumed step equals an unbroken one."""
    from diffcli.train import make_optimizer, match_state_strides

    torch.manual_seed(0)
    w0 = torch.randn(8, 4, 3, 3)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(3)]

    def run(steps, p, opt):
        for gr in steps:
            p.grad = gr.contiguous(memory_format=torch.channels_last)
            opt.step()

    ref = torch.nn.Parameter(w0.clone().contiguous(memory_format=torch.channels_last))
    ref_opt = make_optimizer([ref], lr=0.1)
    run(grads, ref, ref_opt)

    p = torch.nn.Parameter(w0.clone().contiguous(memory_format=torch.channels_last))
    opt = make_optimizer([p], lr=0.1)
    run(grads[:1], p, opt)
    saved = {k: {n: v.contiguous().clone() for n, v in st.items()} for k, st in opt.state_dict()["state"].items()}
    resumed = make_optimizer([p], lr=0.1)
    resumed.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})
    match_state_strides(resumed)
    assert resumed.state[p]["exp_avg"].stride() == p.stride()
    run(grads[1:], p, resumed)
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("setting, dev, bf16, cap, expect", [
    ("auto", "cpu", False, "AVX512", True), ("auto", "cpu", False, "AVX2", False),
    ("auto", "cpu", False, "DEFAULT", False), ("auto", "cpu", True, "AVX512", False), ("auto", "cuda", True, "AVX2", True),
    ("auto", "cuda", False, "AVX512", False), ("auto", "mps", True, "AVX512", False),
    (True, "cpu", False, "AVX2", True), (False, "cpu", False, "AVX512", False)])
def test_channels_last_auto_follows_the_measurements(monkeypatch, setting, dev, bf16, cap, expect):
    from diffcli.runtime import use_channels_last

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    assert use_channels_last(setting, torch.device(dev), bf16) is expect


def test_resume_may_change_how_not_what_it_computes(tiny_recipe_path, tmp_path):
    """A run resumed on another machine may take another layout or compile choice (they change speed, not the
    training); the resumed recipe.toml records the new choice."""
    out = tmp_path / "run"
    over = ["train.checkpoint_every=3", "train.sample_grid=4"]
    train(load_recipe(tiny_recipe_path, over + ["train.max_steps=3", "train.channels_last=true"]), out, **QUIET)
    res = train(load_recipe(tiny_recipe_path, over + ["train.max_steps=6", "train.channels_last=false"]), out,
                resume=True, **QUIET)
    assert res.step == 6
    assert load_recipe(out / "recipe.toml").train.channels_last is False
    with pytest.raises(UserError, match="train.seed"):
        train(load_recipe(tiny_recipe_path, over + ["train.max_steps=9", "train.seed=5"]), out, resume=True, **QUIET)
