"""Checkpoints: round trip, metadata re-validation, and refusal of pickles and broken files."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from diffcli.checkpoint import load_checkpoint, load_denoiser, read_header, save_safetensors
from diffcli.errors import UserError


def test_round_trip_gives_identical_outputs(tiny_ckpt, tmp_path):
    ck = load_checkpoint(tiny_ckpt)
    assert ck.meta["kind"] == "denoiser" and ck.meta["format"] == "1" and int(ck.meta["step"]) == 20
    assert ck.denoiser.num_classes == 10 and ck.channels == 1 and ck.resolution == 8
    # the resolved recipe is embedded and re-validated
    assert json.loads(ck.meta["recipe"])["train"]["max_steps"] == 20
    from diffcli.checkpoint import save_denoiser

    copy = tmp_path / "copy.safetensors"
    save_denoiser(copy, ck.denoiser, ck.recipe, step=ck.step, channels=1, resolution=8)
    d2 = load_denoiser(copy)
    x, s, y = torch.randn(6, 1, 8, 8), torch.logspace(-2, 1.5, 6), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(ck.denoiser(x, s, y), d2(x, s, y))
        assert torch.equal(ck.denoiser(x, s, None), d2(x, s, None))


def _tamper(src, dst, **meta_changes):
    from safetensors.torch import load_file
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_safetensors(dst, load_file(str(src)), meta)


def test_embedded_recipe_is_revalidated(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.safetensors"
    rec = json.loads(load_checkpoint(tiny_ckpt).meta["recipe"])
    rec["train"]["lr"] = -1
    _tamper(tiny_ckpt, bad, recipe=json.dumps(rec))
    with pytest.raises(UserError, match=r"train.lr = -1"):
        load_checkpoint(bad)
    _tamper(tiny_ckpt, bad, kind="classifier")
    with pytest.raises(UserError, match="classifier"):
        load_checkpoint(bad)


def test_pickle_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("model.pt", "model.pkl", "model.safetensors"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(Evil(), protocol=4))
        with pytest.raises(UserError, match=name):
            load_checkpoint(p)
    assert not marker.exists()


@pytest.mark.parametrize("header_len", [0x280, 0x380, 0x480, 0x580, 0x4B50])
def test_valid_file_whose_header_length_looks_like_pickle_magic_loads(tmp_path, header_len):
    # the little-endian length 640 is b"\x80\x02…" (pickle protocol 2), 19280 is b"PK…" (zip): a latents file
    # written by `diffcli encode` hit this and `--decode` refused it as a pickle
    from safetensors.torch import save

    def file_with(pad: int) -> bytes:
        return save({"x": torch.zeros(3)}, metadata={"pad": "a" * pad})

    base = struct.unpack("<Q", file_with(0)[:8])[0]
    data = file_with(header_len - base)
    assert struct.unpack("<Q", data[:8])[0] == header_len
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    header, meta = read_header(p)
    assert "x" in header and len(meta["pad"]) == header_len - base


@pytest.mark.parametrize("make, needle", [
    (lambda: b"", "too short"),
    (lambda: struct.pack("<Q", 10**12) + b"{}", "header length"),
    (lambda: struct.pack("<Q", 5) + b"notjs", "not JSON"),
    (lambda: (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 8)(
        json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 8]}}).encode()), "overlap"),
    (lambda: (lambda h: struct.pack("<Q", len(h)) + h)(
        json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()), "truncated"),
])
def test_broken_files_give_one_line(tmp_path, make, needle):
    p = tmp_path / "x.safetensors"
    p.write_bytes(make())
    with pytest.raises(UserError) as e:
        read_header(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_misshaped_tensors_are_named(tiny_ckpt, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tiny_ckpt), "pt") as f:
        meta = dict(f.metadata())
    t = load_file(str(tiny_ckpt))
    t.pop("conv_in.weight")
    t["conv_out.bias"] = torch.zeros(3)
    t["extra.weight"] = torch.zeros(1)
    p = tmp_path / "m.safetensors"
    save_safetensors(p, t, meta)
    with pytest.raises(UserError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "conv_in.weight" in msg and "conv_out.bias" in msg and "extra.weight" in msg
    t = load_file(str(tiny_ckpt))
    t["conv_in.bias"][0] = float("nan")
    save_safetensors(p, t, meta)
    with pytest.raises(UserError, match="conv_in.bias.*non-finite"):
        load_checkpoint(p)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import os

    from diffcli.checkpoint import atomic_write_bytes
    from diffcli.errors import RunFailure

    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(RunFailure, match="No space left"):
        atomic_write_bytes(p, b"new" * 1000)
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind


def test_atomic_writes_get_the_mode_open_would_give(tmp_path, monkeypatch):
    """mkstemp creates 0600 files; a written checkpoint, grid or JSON must be as readable as any file the user's
    umask allows (a shared run folder read by teammates or a web server), not private to its writer."""
    import os
    import stat

    from diffcli import checkpoint

    for mask in (0o022, 0o077):
        old = os.umask(mask)
        try:
            monkeypatch.setattr(checkpoint, "_FILE_MODE", checkpoint._file_mode())
            checkpoint.atomic_write_text(tmp_path / f"a{mask:o}.json", "{}")
            with open(tmp_path / f"b{mask:o}.json", "w") as f:
                f.write("{}")
        finally:
            os.umask(old)
        got = stat.S_IMODE((tmp_path / f"a{mask:o}.json").stat().st_mode)
        assert got == stat.S_IMODE((tmp_path / f"b{mask:o}.json").stat().st_mode) == 0o666 & ~mask
