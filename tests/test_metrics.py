"""eval-fid: Fréchet distance oracles, agreement with torch-fidelity, KID/PR sanity, the digits extractor,
the reference statistics cache, the CLI end to end and every bad input (exit 2, one line)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

from diffcli.errors import UserError


@pytest.fixture(scope="session")
def digits_seed1(digits_cache):
    from diffcli import features

    return features.load_digits_classifier(1)


def _digits(split="train"):
    from diffcli.data import digits_arrays

    x, y = digits_arrays(split)
    return torch.from_numpy(x), torch.from_numpy(y)


def _write_pngs(folder: Path, images: torch.Tensor) -> Path:
    from diffcli.images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(folder / f"{i:05d}.png", img)
    return folder


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


# --- Fréchet distance ------------------------------------------------------------------------------------
def test_frechet_distance_closed_form_diagonal():
    from diffcli.features import frechet_distance

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-9)


def test_frechet_distance_closed_form_full_covariance():
    """Against scipy's matrix square root, an independent route to tr((Σ1 Σ2)^½)."""
    import scipy.linalg

    from diffcli.features import frechet_distance

    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = A @ A.T + 0.1 * np.eye(5), B @ B.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-8)
    # the Fréchet distance between N(0, I) and N(m, 4I) in D dims is |m|² + D (1 + 4 − 2·2) = |m|² + D
    m = np.full(3, 0.5)
    assert frechet_distance(np.zeros(3), np.eye(3), m, 4 * np.eye(3)) == pytest.approx(0.75 + 3, rel=1e-10)


def test_frechet_from_samples_approaches_closed_form():
    from diffcli.features import feature_statistics, frechet_distance

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40000, 3, generator=g, dtype=torch.float64)
    y = torch.randn(40000, 3, generator=g, dtype=torch.float64) * 2 + 0.5
    fd = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert fd == pytest.approx(0.75 + 3, abs=0.1)


def test_identical_sets_give_zero(digits_cache):
    from diffcli.features import digits_frechet_distance

    x, _ = _digits("test")
    assert abs(digits_frechet_distance(x, x)) < 1e-6
    # and two different halves of real data are close but not identical
    tr, _ = _digits("train")
    fd = digits_frechet_distance(tr[:700], tr[700:1400])
    assert 0 < fd < 10
    assert digits_frechet_distance(tr[:700], torch.rand(700, 1, 8, 8) * 2 - 1) > 10 * fd


def test_reported_numbers_equal_torch_fidelity(digits_cache, tmp_path):
    """eval-fid on two folders gives torch-fidelity's own calculate_metrics numbers on the same images with
    the same (registered) extractor."""
    import torch_fidelity

    from diffcli.features import DIGITS_EXTRACTOR, UInt8Images, register_extractors
    from diffcli.images import to_uint8
    from diffcli.metrics import EvalOptions, evaluate

    tr, _ = _digits("train")
    a, b = tr[:150], tr[600:900] * 0.9  # b: a different distribution than a
    fa, fb = _write_pngs(tmp_path / "a", a), _write_pngs(tmp_path / "b", b)
    res = evaluate(EvalOptions(generated=fa, ref=str(fb), device="cpu"))
    ours = res.records[0]["metrics"]
    register_extractors()
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(to_uint8(a)), input2=UInt8Images(to_uint8(b)), fid=True, kid=True, isc=True, prc=True,
        feature_extractor=DIGITS_EXTRACTOR, cuda=False, cache=False, verbose=False, save_cpu_ram=True,
        kid_subset_size=150)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["precision"] == pytest.approx(theirs["precision"])
    assert ours["recall"] == pytest.approx(theirs["recall"])
    assert ours["fid"] > 0.1


# --- KID and precision/recall ----------------------------------------------------------------------------
def _ref_from(features: torch.Tensor):
    from diffcli.features import feature_statistics
    from diffcli.metrics import Reference

    mu, sigma = feature_statistics(features)
    return Reference(features.float(), mu, sigma, 1, 8, "test", "0", "features", {})


def test_kid_same_distribution_is_zero_and_unbiased():
    from torch_fidelity.metric_kid import kernel_poly, mmd2

    from diffcli.metrics import compute_metrics

    g = torch.Generator().manual_seed(0)
    same, shifted, biased = [], [], []
    for _ in range(20):
        x, y = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)
        m = compute_metrics({"features": x}, _ref_from(y), ["kid"], layer="features", is_layer="logits")
        same.append(m["kid_mean"])
        kw = {"kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1}
        xn, yn = x.numpy(), y.numpy()
        biased.append(mmd2(kernel_poly(xn, xn, **kw), kernel_poly(xn, yn, **kw), kernel_poly(yn, yn, **kw),
                           mmd_est="biased"))
        m2 = compute_metrics({"features": x + 0.5}, _ref_from(y), ["kid"], layer="features", is_layer="logits")
        shifted.append(m2["kid_mean"])
    same, biased, shifted = map(np.asarray, (same, biased, shifted))
    se = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 3 * se  # unbiased: centred on 0 ...
    assert biased.mean() > 10 * se  # ... where the biased (V-statistic) estimator is clearly positive
    assert shifted.mean() > 10 * se  # and a real difference is detected


def test_precision_recall_identical_sets_are_one_and_disjoint_are_zero():
    from diffcli.metrics import compute_metrics

    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    m = compute_metrics({"features": x}, _ref_from(x), ["pr"], layer="features", is_layer="logits")
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1.0)
    m = compute_metrics({"features": x + 100}, _ref_from(x), ["pr"], layer="features", is_layer="logits")
    assert m["precision"] == 0.0 and m["recall"] == 0.0


# --- the digits extractor --------------------------------------------------------------------------------
def test_digits_extractor_deterministic_and_accurate(digits_cache, digits_seed1):
    from diffcli.features import digits_test_accuracy, tensors_hash, train_digits_classifier

    again = train_digits_classifier(0)
    assert tensors_hash(again.state_dict()) == digits_cache.hash
    assert digits_test_accuracy(again) >= 0.97
    assert digits_cache.test_accuracy >= 0.97
    assert digits_seed1.hash != digits_cache.hash  # the seed matters
    assert digits_cache.path is not None and digits_cache.path.is_file()
    assert str(digits_cache.path).startswith(os.environ["XDG_CACHE_HOME"])


def test_class_accuracy_of_real_digits(digits_cache):
    from diffcli.features import class_accuracy

    x, y = _digits("test")
    assert class_accuracy(x, y) >= 0.97
    assert class_accuracy(x, (y + 1) % 10) < 0.05


def test_corrupt_classifier_cache_is_retrained(digits_cache, tmp_path, monkeypatch):
    from diffcli import features

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = features.digits_classifier_path(0)
    p.parent.mkdir(parents=True)
    p.write_bytes(b"not a safetensors file at all")
    monkeypatch.setattr(features, "_LOADED", {})
    monkeypatch.setattr(features, "train_digits_classifier", lambda seed: digits_cache.net)  # skip the seconds
    clf = features.load_digits_classifier(0)
    assert clf.hash == digits_cache.hash
    from diffcli.checkpoint import read_safetensors

    _, meta = read_safetensors(p)
    assert meta["hash"] == digits_cache.hash


# --- reference statistics cache --------------------------------------------------------------------------
def _extractor(seed):
    from diffcli.metrics import Extractor

    return Extractor("digits", ["fid"], device=torch.device("cpu"), batch_size=256, digits_seed=seed)


def test_reference_cache_hit_miss_and_stale(digits_cache, digits_seed1):
    from diffcli.metrics import ref_cache_path, resolve_reference

    e0, e1 = _extractor(0), _extractor(1)
    assert e0.hash == digits_cache.hash and e1.hash == digits_seed1.hash
    p0 = ref_cache_path("digits", "test", 1, 8, "digits", e0.hash)
    p1 = ref_cache_path("digits", "test", 1, 8, "digits", e1.hash)
    for p in (p0, p1):
        p.unlink(missing_ok=True)
    r = resolve_reference("digits", "test", None, e0, default=None, cache=True)
    assert r.info["cache"] == "miss" and p0.is_file() and r.n == 360
    r2 = resolve_reference("digits", "test", None, e0, default=None, cache=True)
    assert r2.info["cache"] == "hit"
    assert torch.equal(r.features, r2.features) and np.allclose(r.mu, r2.mu)
    # another extractor hash: the seed-0 statistics are not used
    r3 = resolve_reference("digits", "test", None, e1, default=None, cache=True)
    assert r3.info["cache"] == "miss" and p1.is_file()
    assert not torch.equal(r3.features, r.features)
    # a stale file under the right name (made by another extractor) is detected by its metadata and replaced
    p1.write_bytes(p0.read_bytes())
    r4 = resolve_reference("digits", "test", None, e1, default=None, cache=True)
    assert r4.info["cache"] == "miss" and torch.equal(r4.features, r3.features)
    assert resolve_reference("digits", "test", None, e1, default=None, cache=True).info["cache"] == "hit"
    assert resolve_reference("digits", "test", None, e1, default=None, cache=False).info["cache"] == "off"


def test_stats_file_as_reference(digits_cache):
    from diffcli.metrics import ref_cache_path, resolve_reference

    e0 = _extractor(0)
    resolve_reference("digits", "test", None, e0, default=None, cache=True)
    p0 = ref_cache_path("digits", "test", 1, 8, "digits", e0.hash)
    r = resolve_reference(str(p0), None, None, e0, default=None, cache=True)
    assert r.info["source"] == "stats-file" and r.n == 360
    with pytest.raises(UserError, match="statistics made with extractor"):
        resolve_reference(str(p0), None, None, _extractor(1), default=None, cache=True)


# --- end to end ------------------------------------------------------------------------------------------
RECORD_FIELDS = ["metrics", "n_generated", "n_reference", "extractor", "extractor_weights_hash", "feature_layer",
                 "feature_dim", "resize", "extractor_input", "seed", "seeds", "sampler", "schedule", "steps", "nfe",
                 "cfg", "checkpoint", "checkpoint_sha256", "checkpoint_step", "reference", "class_accuracy",
                 "eval_seconds", "generation_seconds", "total_seconds", "timestamp", "warnings", "kid_subsets",
                 "kid_subset_size", "pr_neighborhood", "is_splits", "torch_fidelity_version", "diffcli_version"]


def test_cli_end_to_end_json(digits_cache, tiny_ckpt, tmp_path):
    out = tmp_path / "fid.json"
    r = run_cli("eval-fid", tiny_ckpt, "--n", "40", "--nfe", "3", "--sampler", "euler", "--json", out,
                "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    missing = [k for k in RECORD_FIELDS if k not in rec]
    assert not missing, missing
    assert set(rec["metrics"]) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall",
                                   "f_score"}
    assert all(np.isfinite(v) for v in rec["metrics"].values())
    assert rec["n_generated"] == 40 and rec["n_reference"] == 1437  # default: the recipe's digits train split
    assert rec["reference"]["dataset"] == "digits" and rec["reference"]["split"] == "train"
    assert rec["extractor"] == "digits" and rec["extractor_weights_hash"] == digits_cache.hash
    assert rec["sampler"] == "euler" and rec["nfe"] == 3 and rec["seed"] == 0
    assert 0 <= rec["class_accuracy"] <= 1  # the tiny model is class-conditional
    assert any("FID is biased" in w for w in rec["warnings"]) and any("rank-deficient" in w for w in rec["warnings"])
    assert any("KID from subsets of 40" in w for w in rec["warnings"])  # 40 images: KID and IS mean little
    assert any("IS from 10 split(s) of 4 image(s)" in w for w in rec["warnings"])
    assert "FID" in r.stderr and "warning:" in r.stderr


def test_checkpoint_and_its_sample_folder_agree(digits_cache, tiny_ckpt, tmp_path):
    """Generated on the fly or read back from `diffcli sample`'s PNGs: the same numbers."""
    from diffcli.metrics import EvalOptions, evaluate

    r = run_cli("sample", tiny_ckpt, "--n", "30", "--steps", "3", "--sampler", "ddim", "--out", tmp_path / "s",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    a = evaluate(EvalOptions(generated=tiny_ckpt, n=30, steps=3, sampler="ddim", device="cpu")).records[0]
    b = evaluate(EvalOptions(generated=tmp_path / "s", device="cpu")).records[0]
    assert b["generated"]["source"] == "sample-folder" and b["reference"]["dataset"] == "digits"
    assert a["metrics"]["fid"] == pytest.approx(b["metrics"]["fid"], rel=1e-9)
    assert a["class_accuracy"] == b["class_accuracy"] and b["nfe"] == a["nfe"] and b["seed"] == 0
    # the same sample folder as --ref: its images/ (not grid.png); against itself the distance is 0
    c = evaluate(EvalOptions(generated=tmp_path / "s", ref=str(tmp_path / "s"), device="cpu")).records[0]
    assert c["reference"]["source"] == "sample-folder" and c["metrics"]["fid"] == pytest.approx(0, abs=1e-6)


def test_cli_sweep_writes_csv_and_png(digits_cache, tiny_ckpt, tmp_path):
    out = tmp_path / "sweep"
    r = run_cli("eval-fid", tiny_ckpt, "--n", "16", "--nfe", "2,4", "--sampler", "ddim,euler", "--metrics",
                "fid,pr", "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((out / "eval_fid.csv").open()))
    assert [(x["sampler"], x["nfe"]) for x in rows] == [("ddim", "2"), ("ddim", "4"), ("euler", "2"), ("euler", "4")]
    assert all(float(x["fid"]) > 0 and x["kid_mean"] == "" for x in rows)
    assert (out / "eval_fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((out / "eval_fid.json").read_text())["sweep"]) == 4


def test_sweep_runs_an_adaptive_solver_once_as_its_reference_row(digits_cache, tiny_ckpt, tmp_path):
    """`--sampler ddim,rk45 --nfe 2,4`: ddim at each NFE, rk45 once at its tolerance (its NFE is its own), noted."""
    out = tmp_path / "sweep"
    r = run_cli("eval-fid", tiny_ckpt, "--n", "8", "--nfe", "2,4", "--sampler", "ddim,rk45", "--metrics", "fid",
                "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader((out / "eval_fid.csv").open()))
    assert [x["sampler"] for x in rows] == ["ddim", "ddim", "rk45"]
    assert int(rows[2]["nfe"]) > 0 and "rk45 is adaptive: it runs once" in r.stdout + r.stderr
    doc = json.loads((out / "eval_fid.json").read_text())
    assert any("runs once" in w for w in doc["sweep"][2]["warnings"])


def test_resize_makes_other_resolutions_comparable(digits_cache, tmp_path):
    from diffcli.metrics import EvalOptions, evaluate

    tr, _ = _digits("train")
    big = torch.nn.functional.interpolate(tr[:20], size=(16, 16), mode="bilinear", align_corners=False)
    folder = _write_pngs(tmp_path / "big", big)
    with pytest.raises(UserError, match="--resize"):
        evaluate(EvalOptions(generated=folder, ref="digits", extractor="digits", device="cpu"))
    rec = evaluate(EvalOptions(generated=folder, ref="digits", extractor="digits", resize=True, metrics="fid",
                               device="cpu")).records[0]
    assert "16×16 → 8×8" in rec["resize"] and np.isfinite(rec["metrics"]["fid"])


# --- bad input → exit 2, one line ------------------------------------------------------------------------
def _bad_setups(tmp: Path, digits_cache) -> dict[str, tuple[list, str]]:
    from PIL import Image

    from diffcli.metrics import Reference, save_reference

    tr, _ = _digits("train")
    good = _write_pngs(tmp / "good", tr[:6])
    (tmp / "empty").mkdir()
    _write_pngs(tmp / "one", tr[:1])
    mixed_size = _write_pngs(tmp / "mixed_size", tr[:3])
    Image.new("L", (9, 9)).save(mixed_size / "zz.png")
    mixed_ch = _write_pngs(tmp / "mixed_ch", tr[:3])
    Image.new("RGB", (8, 8)).save(mixed_ch / "zz.png")
    broken = _write_pngs(tmp / "broken", tr[:3])
    (broken / "zz.png").write_bytes(b"garbage, not a png")
    big = _write_pngs(tmp / "big", torch.zeros(3, 1, 16, 16))
    f = torch.randn(10, 4)
    save_reference(tmp / "other.safetensors", Reference(f, f.mean(0).double().numpy(), np.eye(4), 1, 8, "inception",
                                                        "abc", "2048", {}), {"dataset": "x", "split": "train"})
    (tmp / "w.pth").write_bytes(b"not weights")
    return {
        "empty folder": ([tmp / "empty", "--ref", "digits"], "holds no images"),
        "missing folder": ([tmp / "nope", "--ref", "digits"], "does not exist"),
        "unreadable image": ([broken, "--ref", "digits"], "not a readable image"),
        "mixed sizes": ([mixed_size, "--ref", "digits"], "mixed sizes"),
        "mixed channels": ([mixed_ch, "--ref", "digits"], "mixed sizes or channels"),
        "one image": ([tmp / "one", "--ref", "digits"], "at least 2"),
        "unknown metric": ([good, "--ref", "digits", "--metrics", "fid,fvd"], "--metrics"),
        "unknown extractor": ([good, "--ref", "digits", "--extractor", "clip"], "--extractor"),
        "resolution without --resize": ([big, "--ref", "digits", "--extractor", "digits"], "--resize"),
        "stats of another extractor": ([good, "--ref", tmp / "other.safetensors"], "statistics made with extractor"),
        "unknown reference": ([good, "--ref", "imagenet"], "--ref"),
        "folder without --ref": ([good], "--ref is needed"),
        "sampler with a folder": ([good, "--ref", "digits", "--nfe", "5"], "need a checkpoint"),
        "n below 2": ([good, "--ref", "digits", "--n", "1"], "--n 1"),
        "missing inception weights": ([good, "--ref", "digits", "--extractor", "inception", "--inception-weights",
                                       tmp / "none.pth"], "--inception-weights"),
        "broken inception weights": ([good, "--ref", "digits", "--extractor", "inception", "--inception-weights",
                                      tmp / "w.pth"], "--inception-weights"),
        "--json is a folder": ([good, "--ref", "digits", "--json", tmp], "--json"),
        "--json in a missing folder": ([good, "--ref", "digits", "--json", tmp / "no" / "f.json"], "does not exist"),
        "sweep over an earlier one": ([good, "--ref", "digits", "--out", _sweep_folder(tmp)], "--force"),
    }


def _sweep_folder(tmp: Path) -> Path:
    """A folder an earlier `eval-fid --out` sweep wrote into."""
    d = tmp / "old_sweep"
    d.mkdir(exist_ok=True)
    (d / "eval_fid.csv").write_text("sampler,nfe,fid\nddim,5,1.0\n")
    return d


SUBPROCESS_CASES = ("empty folder", "unknown metric", "stats of another extractor")


def test_bad_inputs_exit_2_with_one_line(digits_cache, tmp_path, capsys):
    """A few cases through a real subprocess (`run_cli`); the rest through the same entry point in-process
    (`diffcli.cli.main`, which maps errors to exit codes exactly as the console script does) to keep the suite
    fast on two shared cores."""
    from types import SimpleNamespace

    from diffcli.cli import main

    cases = _bad_setups(tmp_path, digits_cache)
    failures = []
    for name, (args, needle) in cases.items():
        argv = ["eval-fid", *map(str, args), "--device", "cpu"]
        if name in SUBPROCESS_CASES:
            r = run_cli(*argv)
        else:
            capsys.readouterr()
            rc = main(argv)
            r = SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)
        try:
            line = _one_error_line(r)
            assert needle in line, line
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)


def test_inception_unfetchable_says_where_to_put_the_file(digits_cache, tmp_path, monkeypatch):
    """No internet here: the download fails and the message names the hub path and the option."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    tr, _ = _digits("train")
    good = _write_pngs(tmp_path / "good", tr[:4])
    r = run_cli("eval-fid", good, "--ref", good, "--extractor", "inception", "--device", "cpu")
    line = _one_error_line(r)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert str(expected) in line and "--inception-weights" in line


@pytest.mark.slow
def test_inception_with_local_weights_file(digits_cache, tmp_path):
    """The offline path: a local weights file (here random weights of the right architecture, as safetensors)
    loads without pickle and gives finite metrics on RGB and greyscale (→ RGB) folders."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe_inc

    from diffcli.checkpoint import save_safetensors
    from diffcli.metrics import EvalOptions, evaluate

    with mock.patch.object(fe_inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch.object(fe_inc, "load_state_dict_from_url", lambda *a, **k: {}):
        net = fe_inc.FeatureExtractorInceptionV3("x", ["2048"])
    w = tmp_path / "inception.safetensors"
    save_safetensors(w, net.state_dict(), {})
    a = _write_pngs(tmp_path / "a", torch.rand(12, 3, 16, 16) * 2 - 1)
    b = _write_pngs(tmp_path / "b", torch.rand(12, 3, 16, 16) * 2 - 1)
    rec = evaluate(EvalOptions(generated=a, ref=str(b), extractor="inception", inception_weights=w,
                               metrics="fid,kid", device="cpu")).records[0]
    assert rec["feature_dim"] == 2048 and np.isfinite(rec["metrics"]["fid"])
    assert any("rank-deficient" in x for x in rec["warnings"])


def test_tuned_solver_evaluates_like_its_sample_folder(digits_cache, tiny_ckpt, tmp_path, capsys):
    """`eval-fid --schedule tuned` samples the solver `diffcli sample --tune-schedule` stored beside the
    checkpoint: the same images as `diffcli sample --schedule tuned`, so the same numbers; with no stored
    solver for that sampler and NFE it exits 2 with one line before generating anything."""
    import shutil

    from diffcli.cli import main
    from diffcli.metrics import EvalOptions, evaluate

    ck = tmp_path / "model.safetensors"
    shutil.copy(tiny_ckpt, ck)
    common = ["--sampler", "unipc", "--nfe", "4", "--device", "cpu"]
    assert main(["sample", str(ck), *common, "--n", "24", "--tune-schedule", "--tune-draws", "16",
                 "--tune-iters", "3", "--out", str(tmp_path / "s")]) == 0
    a = evaluate(EvalOptions(generated=ck, n=24, nfe="4", sampler="unipc", schedule="tuned", device="cpu",
                             metrics="fid")).records[0]
    b = evaluate(EvalOptions(generated=tmp_path / "s", device="cpu", metrics="fid")).records[0]
    untuned = evaluate(EvalOptions(generated=ck, n=24, nfe="4", sampler="unipc", device="cpu",
                                   metrics="fid")).records[0]
    assert a["schedule"] == "tuned" and a["nfe"] == 4
    assert a["metrics"]["fid"] == pytest.approx(b["metrics"]["fid"], rel=1e-9)
    assert a["metrics"]["fid"] != untuned["metrics"]["fid"]  # the learned solver made other images
    capsys.readouterr()
    rc = main(["eval-fid", str(ck), "--sampler", "unipc", "--nfe", "6", "--schedule", "tuned", "--n", "8",
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --schedule tuned") and len(err.strip().splitlines()) == 1, err


def test_sample_folder_labels_follow_the_file_names(tmp_path):
    """Image NNNNNN.png carries label NNNNNN of sample.json: a removed file shifts nothing; a file sample.json has
    no label for drops the labels (class accuracy) with a warning instead of pairing them wrongly."""
    from diffcli.images import save_png
    from diffcli.metrics import load_generated_folder

    (tmp_path / "images").mkdir()
    for i in range(5):
        save_png(tmp_path / "images" / f"{i:06d}.png", torch.full((1, 8, 8), i / 5))
    (tmp_path / "sample.json").write_text(json.dumps({"labels": [7, 1, 2, 3, 4]}))
    assert load_generated_folder(tmp_path, None).labels.tolist() == [7, 1, 2, 3, 4]
    (tmp_path / "images" / "000001.png").unlink()
    got = load_generated_folder(tmp_path, None)
    assert got.labels.tolist() == [7, 2, 3, 4] and "warning" not in got.info
    save_png(tmp_path / "images" / "000009.png", torch.zeros(1, 8, 8))
    got = load_generated_folder(tmp_path, None)
    assert got.labels is None and "no label" in got.info["warning"]


def test_a_lone_unreadable_file_is_named_not_counted(tmp_path):
    from diffcli.errors import UserError
    from diffcli.metrics import read_folder

    (tmp_path / "a.png").write_text("hi")
    with pytest.raises(UserError, match="a.png"):
        read_folder(tmp_path, "GENERATED")
