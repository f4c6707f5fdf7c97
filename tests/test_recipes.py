"""Recipe validation: errors name the field and value; overrides; TOML round trip."""

from __future__ import annotations

import pytest

from diffcli.errors import UserError
from diffcli.recipes import Recipe, load_recipe, parse_override, recipe_from_dict


def _err(data: dict) -> str:
    with pytest.raises(UserError) as e:
        recipe_from_dict(data, "r.toml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("data, needles", [
    ({"train": {"lr": -1.0}}, ["train.lr", "-1.0"]),
    ({"train": {"batch_size": 0}}, ["train.batch_size", "0"]),
    ({"train": {"max_steps": 0}}, ["train.max_steps"]),
    ({"train": {"lr": "fast"}}, ["train.lr", '"fast"', "must be a number"]),
    ({"train": {"batch_size": True}}, ["train.batch_size = true", "must be a number"]),  # not read as 1
    ({"train": {"lr": "0.001"}}, ["train.lr", "must be a number"]),
    ({"train": {"lr": float("nan")}}, ["train.lr = nan", "finite"]),
    ({"model": {"channel_mult": [True, True]}}, ["model.channel_mult.0 = true"]),
    ({"train": {"lrr": 1e-3}}, ["unknown key", "train.lrr"]),
    ({"colour": "red"}, ["unknown key", "colour"]),
    ({"foo": {"bar": 1}}, ["unknown section [foo]", "holding bar"]),
    ({"train": {"channels_last": "yes"}}, ["train.channels_last", '"yes"', "auto"]),
    ({"train": {"channels_last": 1}}, ["train.channels_last = 1", "true, false"]),
    ({"train": {"bf16": 1}}, ["train.bf16 = 1", "true or false"]),
    ({"data": {"hflip": "yes"}}, ["data.hflip", '"yes"', "true or false"]),
    ({"diffusion": {"process": "vpp"}}, ["diffusion.process", '"vpp"']),
    ({"diffusion": {"sigma_min": 2.0, "sigma_max": 1.0}}, ["sigma_min", "2.0", "sigma_max"]),
    ({"data": {"name": "celeba"}, "train": {"p_uncond": 0.1}}, ["p_uncond", "class-conditional", "celeba"]),
    ({"data": {"class_conditional": False}, "train": {"p_uncond": 0.2}}, ["p_uncond"]),
    ({"model": {"attention_resolutions": [3]}}, ["attention_resolutions", "3"]),
    ({"model": {"channel_mult": [1, 2, 2, 2, 2]}}, ["channel_mult", "16"]),
    ({"model": {"dropout": 1.5}}, ["model.dropout", "1.5"]),
    ({"data": {"name": "imagefolder"}}, ["data.path"]),
    ({"sample": {"schedule": "karas"}}, ["sample.schedule", "'karas'", "logsnr_linspace"]),
    ({"sample": {"schedule": "tuned"}}, ["sample.schedule", "'tuned'"]),  # tuned solvers belong to a checkpoint
    # the recipe's sampler is used at the first grid, possibly hours in: checked when the recipe loads
    ({"sample": {"sampler": "hune"}}, ["sample.sampler", "'hune'", "heun"]),
    ({"sample": {"eta": 5}}, ["sample.eta", "5"]),
    # 64 channels at 32 per head are 2 heads, at 7 per head 9 heads, which do not divide 64
    ({"model": {"head_channels": 7, "channels": 32, "channel_mult": [1, 2]}, "data": {"resolution": 8}},
     ["model.head_channels = 7", "64"]),
])
def test_errors_name_field_and_value(data, needles):
    msg = _err(data)
    assert msg.startswith("r.toml: ")
    for n in needles:
        assert n in msg, (n, msg)


def test_overrides_are_typed_and_validated(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[train]\nlr = 1e-3\n')
    r = load_recipe(p, ["train.lr=2e-4", "model.channel_mult=[1,1]", "data.hflip=true", "name=abc"])
    assert r.train.lr == 2e-4 and r.model.channel_mult == [1, 1] and r.data.hflip is True and r.name == "abc"
    with pytest.raises(UserError, match=r"train.lr = -5 \(from the command line\)"):
        load_recipe(p, ["train.lr=-5"])  # the file holds lr = 1e-3: the error says where -5 came from
    p.write_text('[train]\nlr = -1.0\n')
    with pytest.raises(UserError, match=r"train.lr = -1.0: "):
        load_recipe(p, ["train.seed=3"])
    with pytest.raises(UserError, match="unknown key train.nope"):
        load_recipe(p, ["train.nope=1"])
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("train.lr")
    assert parse_override("sample.sampler=heun") == (["sample", "sampler"], "heun")


def test_toml_round_trip(tmp_path):
    r = load_recipe("recipes/digits.toml")
    p = tmp_path / "resolved.toml"
    p.write_text(r.to_toml())
    assert load_recipe(p) == r
    assert Recipe.model_validate_json(r.to_json()) == r


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(UserError, match="folder"):
        load_recipe(tmp_path)


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10", "celeba64"])
def test_shipped_recipes_validate(name):
    load_recipe(f"recipes/{name}.toml")


def test_shipped_classifier_recipe_shares_the_digits_process():
    """`--classifier` refuses a classifier of another process, so the shipped pair must agree."""
    clf, den = load_recipe("recipes/digits-classifier.toml"), load_recipe("recipes/digits.toml")
    assert clf.task == "classifier" and den.task == "denoiser"
    assert clf.diffusion == den.diffusion.model_copy(update={"weighting": clf.diffusion.weighting})
    assert clf.data.name == den.data.name


@pytest.mark.parametrize("name", ["digits-progressive", "digits-progressive-full", "digits-consistency",
                                  "digits-guidance", "digits-reflow"])
def test_shipped_distill_recipes_validate(name):
    from diffcli.recipes import load_distill_recipe

    r = load_distill_recipe(f"recipes/{name}.toml")
    assert r.method == name.split("-")[1]


@pytest.mark.parametrize("over, needle", [
    (["diffusion.process='ve'", "diffusion.sigma_max=0.005"], "sigma_max = 0.005"),
    (["diffusion.process='edm'", "diffusion.sigma_min=100"], "sigma_min = 100"),
    (["diffusion.process='vp_linear'", "diffusion.beta_end=0.9"], "beta_end = 0.9"),
])
def test_sigma_range_is_checked_against_the_process_defaults(tmp_path, over, needle):
    """One end of σ set past the other end's default, or a VP schedule whose ᾱ_T underflows (σ_max = ∞), is
    refused at load — not at the end-of-run sample grid or as a NaN loss at the first step."""
    p = tmp_path / "r.toml"
    p.write_text('name = "r"\n[data]\nname = "digits"\n')
    with pytest.raises(UserError, match=needle):
        load_recipe(p, [o.replace("'", '"') for o in over])
