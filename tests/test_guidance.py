"""Guidance wrappers against exact answers on the Gaussian-mixture oracle, and classifier guidance end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from diffcli.guidance import ClassifierGuided, Conditioned
from diffcli.oracle import GaussianMixtureDenoiser
from diffcli.samplers import get_sigmas, sample_dpmpp_2m


class ExactClassifier(torch.nn.Module):
    """The oracle's exact p(y | x, σ): logits = log w_k + log N(x; μ_k, (s_k² + σ²) I)."""

    def __init__(self, gm: GaussianMixtureDenoiser) -> None:
        super().__init__()
        self.gm, self.num_classes = gm, gm.num_classes

    def forward(self, x, sigma):
        b = x.shape[0]
        return self.gm._log_joint(x.reshape(b, -1).double(), sigma.double().reshape(-1).expand(b), None)


@pytest.fixture
def mix():
    return GaussianMixtureDenoiser.random(k=3, shape=(1, 1, 2), std=0.15, seed=5, spread=1.0, sigma_max=20.0)


def _x(n=32, sigma=1.0, seed=0):
    return torch.randn(n, 1, 1, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigma


def test_cfg_scale_one_is_the_conditional_denoiser(mix):
    x, s = _x(), torch.full((32,), 0.7, dtype=torch.float64)
    cond = torch.arange(32) % 3
    assert torch.equal(Conditioned(mix, cond, 1.0)(x, s), mix(x, s, cond))
    guided = Conditioned(mix, cond, 0.0)  # s = 0 is the unconditional (null-class) model
    assert torch.allclose(guided(x, s), mix(x, s, torch.full_like(cond, 3)))
    assert guided.network_evaluations == 2


def test_cfg_interval_guides_only_inside(mix):
    x, cond = _x(), torch.arange(32) % 3
    g = Conditioned(mix, cond, 3.0, interval=(0.5, 2.0))
    inside, outside = torch.full((32,), 1.0, dtype=torch.float64), torch.full((32,), 5.0, dtype=torch.float64)
    assert torch.equal(g(x, outside), mix(x, outside, cond))
    plain = Conditioned(mix, cond, 3.0)
    assert torch.allclose(g(x, inside), plain(x, inside))
    assert not torch.allclose(g(x, inside), mix(x, inside, cond))


def test_classifier_guidance_scale_zero_changes_nothing(mix):
    x, s = _x(), torch.full((32,), 0.7, dtype=torch.float64)
    inner = Conditioned(mix, None)
    out = ClassifierGuided(inner, ExactClassifier(mix), torch.zeros(32, dtype=torch.long), 0.0)(x, s)
    assert torch.equal(out, inner(x, s))


@pytest.mark.parametrize("sigma", [0.1, 0.7, 3.0])
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_denoiser(mix, sigma):
    """Bayes: ∇log p(x|y) = ∇log p(x) + ∇log p(y|x), so D + σ²∇log p(y|x,σ) at s = 1 is E[x0 | x, y]."""
    x, s = _x(64, sigma), torch.full((64,), sigma, dtype=torch.float64)
    y = torch.arange(64) % 3
    guided = ClassifierGuided(Conditioned(mix, None), ExactClassifier(mix), y, 1.0)
    # The guided gradient is taken in float32 (as for networks); compare at float32 precision.
    assert torch.allclose(guided(x, s), mix(x, s, y), atol=2e-5 * max(1.0, sigma**2))


def test_classifier_guidance_raises_the_share_of_the_requested_class(mix):
    n = 600
    y = torch.full((n,), 1, dtype=torch.long)
    sig = get_sigmas("karras", 30, 0.002, 20.0)
    shares = []
    for scale in (0.0, 1.0, 3.0):
        den = ClassifierGuided(Conditioned(mix, None), ExactClassifier(mix), y, scale)
        out = sample_dpmpp_2m(den, _x(n, 20.0, seed=3), sig)
        k = torch.cdist(out.reshape(n, -1), mix.means).argmin(1)
        shares.append(float((k == 1).double().mean()))
    assert shares[0] == pytest.approx(float(mix.weights[1]), abs=0.07)
    assert shares[0] < shares[1] < shares[2] and shares[2] > 0.95, shares


class _MLP(torch.nn.Module):
    """A small p(y | x, σ) network for the 2-d mixture: logits from (x / sqrt(σ² + σ_data²), c_noise(σ))."""

    def __init__(self, dim: int, k: int) -> None:
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(dim + 1, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                     torch.nn.SiLU(), torch.nn.Linear(64, k))

    def forward(self, x, c_noise):
        return self.f(torch.cat([x.flatten(1), c_noise[:, None]], 1))


def test_a_trained_noisy_classifier_raises_the_share_of_the_requested_class(mix):
    """NoisyClassifier's own objective (cross-entropy at the process's σ draws), trained on mixture draws, then
    guiding the unconditional oracle: the share of samples from the requested component rises with s."""
    from diffcli.classifier import NoisyClassifier
    from diffcli.processes import make_process

    torch.manual_seed(0)
    clf = NoisyClassifier(_MLP(2, 3), make_process("edm", sigma_max=20.0), 3)
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        y = torch.multinomial(mix.weights, 256, replacement=True, generator=g)
        loss = clf.loss(mix.sample(256, g, cond=y).float(), y, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    n, want = 600, 1
    y = torch.full((n,), want, dtype=torch.long)
    sig = get_sigmas("karras", 30, 0.002, 20.0)
    shares = []
    for scale in (0.0, 1.0, 3.0):
        den = ClassifierGuided(Conditioned(mix, None), clf, y, scale)
        out = sample_dpmpp_2m(den, _x(n, 20.0, seed=3), sig)
        shares.append(float((torch.cdist(out.reshape(n, -1), mix.means).argmin(1) == want).double().mean()))
    assert shares[0] == pytest.approx(float(mix.weights[want]), abs=0.07)
    assert shares[0] < shares[1] < shares[2] and shares[2] > 0.9, shares


CLASSIFIER_RECIPE = """
task = "classifier"
name = "clf"
[data]
name = "digits"
[model]
channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
[diffusion]
process = "edm"
parameterization = "edm"
[train]
batch_size = 64
lr = 2e-3
max_steps = 30
log_every = 10
checkpoint_every = 15
device = "cpu"
"""


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("clf")
    (d / "clf.toml").write_text(CLASSIFIER_RECIPE)
    r = run_cli("train", d / "clf.toml", "--out", d / "run")
    assert r.returncode == 0, r.stderr
    return d


def test_train_classifier_writes_a_classifier_run(classifier_run):
    from diffcli.checkpoint import read_header

    run = classifier_run / "run"
    _, meta = read_header(run / "last.safetensors")
    assert meta["kind"] == "classifier" and meta["num_classes"] == "10" and meta["process"] == "edm"
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    # header + steps 10, 15 (a checkpoint cuts a row, as in a denoiser run: a resume logs the same windows), 20, 30
    assert [r.split(",")[0] for r in rows[1:]] == ["10", "15", "20", "30"]
    first, last = float(rows[1].split(",")[1]), float(rows[-1].split(",")[1])
    assert last < first  # cross-entropy falls from log 10 ≈ 2.30
    assert sorted(p.name for p in (run / "checkpoints").glob("*.state.safetensors"))


def test_sample_with_classifier_guidance(classifier_run, tiny_ckpt, tmp_path):
    clf = classifier_run / "run" / "last.safetensors"
    r = run_cli("sample", tiny_ckpt, "--classifier", clf, "--classifier-scale", "2", "--n", "4", "--steps", "3",
                "--sampler", "dpmpp_2m", "--out", tmp_path / "s", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert meta["settings"]["classifier_scale"] == 2.0 and meta["nfe"] == 3


def test_classifier_picks_the_class_of_an_unconditional_model(classifier_run, tiny_recipe_path, tmp_path, capsys):
    """An unconditional model has no classes of its own: with a classifier, --class names one of the
    classifier's, and the labels it guided towards are recorded; without one, --class is refused."""
    from conftest import TINY_RECIPE
    from diffcli.cli import main
    from diffcli.recipes import load_recipe
    from diffcli.train import train

    recipe = tmp_path / "uncond.toml"
    recipe.write_text(TINY_RECIPE.replace('name = "digits"', 'name = "digits"\nclass_conditional = false')
                      .replace("p_uncond = 0.1", "p_uncond = 0.0").replace("max_steps = 20", "max_steps = 2"))
    train(load_recipe(recipe), tmp_path / "u", log=lambda *a, **k: None, show_progress=False)
    ckpt, clf = tmp_path / "u" / "last.safetensors", classifier_run / "run" / "last.safetensors"
    common = ["--n", "3", "--steps", "2", "--sampler", "euler", "--device", "cpu"]
    assert main(["sample", str(ckpt), "--classifier", str(clf), "--classifier-scale", "1", "--class", "7",
                 *common, "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["labels"] == [7, 7, 7]
    capsys.readouterr()
    for args, needle in [(["--class", "7"], "--classifier CKPT"),
                         (["--classifier", str(clf), "--classifier-scale", "1", "--class", "10"],
                          "the classifier has classes 0..9")]:
        assert main(["sample", str(ckpt), *args, *common, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_eval_fid_generates_with_classifier_guidance(classifier_run, tiny_ckpt, digits_cache, tmp_path, capsys):
    """eval-fid on a checkpoint guides its generation as `sample` does and records it; the sample folder of a
    guided run carries its guidance into the record; a folder takes no --classifier."""
    from diffcli.cli import main

    clf = classifier_run / "run" / "last.safetensors"
    common = ["--n", "10", "--steps", "2", "--sampler", "euler", "--metrics", "fid", "--device", "cpu"]
    assert main(["eval-fid", str(tiny_ckpt), "--classifier", str(clf), "--classifier-scale", "2", *common,
                 "--json", str(tmp_path / "g.json")]) == 0
    rec = json.loads((tmp_path / "g.json").read_text())
    assert rec["classifier"] == str(clf) and rec["classifier_scale"] == 2.0 and rec["class_accuracy"] is not None
    assert main(["eval-fid", str(tiny_ckpt), *common, "--json", str(tmp_path / "u.json")]) == 0
    plain = json.loads((tmp_path / "u.json").read_text())
    # a second run never overwrites the record silently; --force replaces diffcli's record, never a user's file
    assert main(["eval-fid", str(tiny_ckpt), *common, "--json", str(tmp_path / "u.json")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["eval-fid", str(tiny_ckpt), *common, "--json", str(tmp_path / "u.json"), "--force"]) == 0
    (tmp_path / "mine.json").write_text('{"mine": 1}')
    assert main(["eval-fid", str(tiny_ckpt), *common, "--json", str(tmp_path / "mine.json"), "--force"]) == 2
    assert "not an eval-fid record" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"mine": 1}'
    assert plain["classifier"] is None and plain["metrics"]["fid"] != rec["metrics"]["fid"]  # it did guide
    assert main(["sample", str(tiny_ckpt), "--classifier", str(clf), "--classifier-scale", "2", "--n", "10",
                 "--steps", "2", "--sampler", "euler", "--out", str(tmp_path / "s")]) == 0
    assert main(["eval-fid", str(tmp_path / "s"), "--metrics", "fid", "--json", str(tmp_path / "f.json")]) == 0
    folder = json.loads((tmp_path / "f.json").read_text())
    assert folder["classifier_scale"] == 2.0 and folder["metrics"]["fid"] == pytest.approx(rec["metrics"]["fid"])
    capsys.readouterr()
    for args, needle in [([str(tmp_path / "s"), "--classifier", str(clf), "--classifier-scale", "1"],
                          "need a checkpoint"),
                         ([str(tiny_ckpt), "--classifier-scale", "1"], "needs --classifier"),
                         ([str(tiny_ckpt), "--classifier", str(tiny_ckpt), "--classifier-scale", "1"],
                          "not a classifier")]:
        assert main(["eval-fid", *args, "--n", "4"]) == 2, args
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_classifier_mismatch_and_bad_guidance_options_exit_2(classifier_run, tiny_ckpt, tmp_path, capsys):
    d = classifier_run
    (d / "ve.toml").write_text(CLASSIFIER_RECIPE.replace('process = "edm"', 'process = "ve"').replace(
        "max_steps = 30", "max_steps = 1"))
    from diffcli.recipes import load_recipe
    from diffcli.train import train

    train(load_recipe(d / "ve.toml"), d / "ve", log=lambda *a, **k: None, show_progress=False)
    cases = [
        (["--classifier", d / "ve" / "last.safetensors", "--classifier-scale", "1"], "process"),
        (["--classifier", tiny_ckpt, "--classifier-scale", "1"], "not a classifier"),
        (["--classifier-scale", "1"], "--classifier"),
        (["--classifier", d / "run" / "last.safetensors", "--classifier-scale", "-1"], "--classifier-scale"),
        (["--cfg", "2", "--cfg-interval", "3,1"], "--cfg-interval"),
        (["--cfg-interval", "abc"], "--cfg-interval"),
    ]
    from diffcli.cli import main

    for args, needle in cases:  # in-process: the same entry point as the console script, without the start-up cost
        rc = main(["sample", str(tiny_ckpt), *map(str, args), "--n", "2", "--steps", "2", "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_classifier_force_with_a_broken_dataset_keeps_the_old_run(classifier_run, tmp_path):
    """As for a denoiser run: the dataset is loaded before --force empties the run folder."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(classifier_run / "run", run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = run_cli("train", classifier_run / "clf.toml", "--out", run, "--force", "--set", 'data.name="imagefolder"',
                "--set", f'data.path="{tmp_path / "nowhere"}"')
    assert r.returncode == 2 and "data.path" in r.stderr, r.stderr
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
