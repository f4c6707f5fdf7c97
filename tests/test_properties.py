"""Property-based tests (hypothesis): whatever a recipe or a checkpoint file holds, loading it gives either a
valid object or the clean one-line UserError — never another exception."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from diffcli.checkpoint import read_header, read_safetensors, save_safetensors
from diffcli.errors import UserError
from diffcli.recipes import Recipe, load_recipe, recipe_from_dict

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ["task", "name", "data", "model", "diffusion", "train", "sample", "lr", "batch_size", "max_steps",
          "channels", "channel_mult", "attention_resolutions", "process", "parameterization", "sigma_min",
          "sigma_max", "p_uncond", "class_conditional", "resolution", "on_bad_image", "adam_betas", "ema_decay",
          "sampler", "steps", "keep_last", "path"]
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["edm", "vp_cosine", "digits", "imagefolder", "ddim"]))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(keys, kids, max_size=5)), max_leaves=20)
recipes = st.dictionaries(keys, values, max_size=7)
# recipe-shaped dicts: real sections with real and random keys, so validation gets past the top level
sections = st.fixed_dictionaries({}, optional={s: st.dictionaries(keys, values, max_size=5)
                                               for s in ("data", "model", "diffusion", "train", "sample")})


def _clean(e: UserError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@SETTINGS
@given(data=st.one_of(recipes, sections))
def test_recipe_from_any_dict_is_valid_or_one_line_error(data):
    try:
        assert isinstance(recipe_from_dict(data, "r.toml"), Recipe)
    except UserError as e:
        _clean(e)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.builds(lambda d: __import__("tomli_w").dumps(d),
                                                        st.dictionaries(st.sampled_from(FIELDS), scalars.filter(
                                                            lambda v: v is not None), max_size=5))),
       overrides=st.lists(st.text(max_size=30), max_size=3))
@example(text="a = " + "[" * 3000, overrides=[])  # deep nesting
@example(text="", overrides=["train.lr.x=1"])
@example(text="", overrides=["train.lr=" + "[" * 3000])
@example(text="[train]\nlr = 1e-3\n", overrides=["train=5", "train.lr=1"])
def test_load_recipe_any_text_and_overrides(scratch, text, overrides):
    p = scratch / "r.toml"
    p.write_bytes(text.encode("utf-8", errors="replace"))  # (lone surrogates: not UTF-8, replaced)
    try:
        assert isinstance(load_recipe(p, overrides), Recipe)
    except UserError as e:
        _clean(e)


# --- checkpoint headers ----------------------------------------------------------------------------------------
def _valid_file(path: Path) -> bytes:
    save_safetensors(path, {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)},
                     {"format": "1", "kind": "denoiser"})
    return path.read_bytes()


def _read(path: Path) -> None:
    try:
        header, meta = read_header(path)
    except UserError as e:
        _clean(e)
        return
    assert isinstance(header, dict) and isinstance(meta, dict)
    try:  # a header that passed the checks must load, or fail as cleanly
        tensors, _ = read_safetensors(path)
        assert set(tensors) == set(header)
    except UserError as e:
        _clean(e)


@SETTINGS
@given(data=st.binary(max_size=300))
@example(data=b"\x80\x04K\x01.")
@example(data=struct.pack("<Q", 2**63) + b"{}")
def test_random_bytes_are_refused_cleanly(scratch, data):
    p = scratch / "x.safetensors"
    p.write_bytes(data)
    _read(p)


entries = st.one_of(
    values,
    st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(["F32", "F16", "I64", "BOOL", "U8", "XX"]), values),
                           "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), values),
                           "data_offsets": st.one_of(st.lists(st.integers(-4, 64), min_size=2, max_size=2), values)}))


@SETTINGS
@given(header=st.dictionaries(st.one_of(st.sampled_from(["a", "b", "__metadata__"]), st.text(max_size=6)), entries,
                              max_size=4),
       tail=st.integers(0, 64), pad=st.sampled_from([b"", b" ", b"\0"]))
@example(header={"a": {"dtype": "F32", "shape": [2], "data_offsets": [True, 8]}}, tail=8, pad=b"")
def test_mutated_headers_are_refused_cleanly(scratch, header, tail, pad):
    raw = json.dumps(header).encode() + pad
    p = scratch / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x01" * tail)
    _read(p)


@SETTINGS
@given(pos=st.integers(0, 10**6), byte=st.integers(0, 255), cut=st.booleans())
def test_flipped_or_cut_valid_files_are_refused_cleanly(scratch, pos, byte, cut):
    good = _valid_file(scratch / "good.safetensors")
    pos %= len(good)
    bad = good[:pos] if cut else good[:pos] + bytes([byte]) + good[pos + 1:]
    p = scratch / "m.safetensors"
    p.write_bytes(bad)
    _read(p)
