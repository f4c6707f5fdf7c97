"""Image grids and PNG I/O. Images are float tensors in [-1, 1] shaped (B, C, H, W) with C = 1 or 3."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write_bytes
from .errors import UserError


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, C, H, W), rounded to nearest."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def png_bytes(img: Tensor) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (greyscale for C = 1)."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 1, upscale: int | None = None) -> Tensor:
    """uint8 grid (C, H', W') of a batch; small images are enlarged (nearest) so a grid is visible."""
    from torchvision.utils import make_grid as tv_grid

    u8 = to_uint8(images)
    if upscale is None:
        upscale = max(1, 32 // u8.shape[-1])
    if upscale > 1:
        u8 = u8.repeat_interleave(upscale, -1).repeat_interleave(upscale, -2)
    nrow = nrow or max(1, math.ceil(math.sqrt(len(u8))))
    grid = tv_grid(u8, nrow=nrow, padding=padding, pad_value=0)
    return grid[:1] if u8.shape[1] == 1 else grid


def save_grid(path: str | Path, images: Tensor, nrow: int | None = None) -> None:
    atomic_write_bytes(path, png_bytes(make_grid(images, nrow)))


def save_png(path: str | Path, image: Tensor) -> None:
    """One [-1, 1] image (C, H, W) as PNG."""
    atomic_write_bytes(path, png_bytes(to_uint8(image[None])[0]))


def load_png_uint8(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


IMAGE_RECORDS = ("sample.json", "decode.json")  # the records of the runs that write images/NNNNNN.png


def numbered_images(out: Path) -> list[Path]:
    """The images/NNNNNN.png files in `out` — the names diffcli's sample and decode write."""
    img = out / "images"
    if not img.is_dir() or img.is_symlink():
        return []
    return sorted(p for p in img.iterdir() if re.fullmatch(r"\d{6}\.png", p.name) and p.is_file())


def _recorded_count(record: Path) -> int | None:
    """The image count `n` of a diffcli sample.json / decode.json, or None when the file is not one diffcli
    wrote (not JSON, or without its diffcli_version and n)."""
    import json

    try:
        r = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or "diffcli_version" not in r or not isinstance(r.get("n"), int) or r["n"] < 0:
        return None
    return r["n"]


def diffcli_images(out: Path, image_records: Sequence[str] = IMAGE_RECORDS) -> list[Path]:
    """The images/NNNNNN.png in `out` that a diffcli record there says its run wrote: indices below its n."""
    counts = [c for r in image_records if (out / r).is_file() and (c := _recorded_count(out / r)) is not None]
    n = max(counts, default=0)
    return [p for p in numbered_images(out) if int(p.stem) < n]


def check_images_replaceable(out: Path) -> None:
    """`--force` replaces what an earlier diffcli run wrote, never what it did not write: a sample.json or
    decode.json that is not diffcli's, and numbered PNGs in out/images that no diffcli record there accounts for
    (a user's own images, an interrupted run's, this run's inputs, or more than the record's n), are refused
    before any work, naming the folder."""
    for r in IMAGE_RECORDS:
        if (out / r).is_file() and _recorded_count(out / r) is None:
            raise UserError(f"--out {str(out)!r}: {r} is not a record diffcli wrote (no diffcli_version and n); "
                            f"--force replaces only diffcli's own output — move it or choose another folder")
    ours = set(diffcli_images(out))
    strays = [p for p in numbered_images(out) if p not in ours]
    if strays:
        raise UserError(f"--out {str(out)!r}: images/ holds {len(strays)} PNG file(s) such as {strays[0].name!r} "
                        f"that no sample.json or decode.json describes; --force replaces only diffcli's own output "
                        f"— move them or choose another folder")


def outputs_to_clear(out: Path, names: Sequence[str], image_records: Sequence[str] = IMAGE_RECORDS) -> list[Path]:
    """The files `clear_outputs` would remove: `names`, and the images/NNNNNN.png that one of `image_records`
    shows a diffcli run wrote."""
    found = [out / n for n in names if (out / n).is_file() or (out / n).is_symlink()]
    return found + diffcli_images(out, image_records)


def check_inputs_survive(out: Path, names: Sequence[str], inputs: Sequence[Path],
                         image_records: Sequence[str] = IMAGE_RECORDS) -> None:
    """A run reads its inputs before it writes: one that `--force` would remove (a latents file decoded into its
    own encode folder, a decode folder's images encoded into it) is refused before any work, naming it."""
    doomed = {p.resolve() for p in outputs_to_clear(out, names, image_records)}
    for p in inputs:
        if Path(p).resolve() in doomed:
            raise UserError(f"--out {str(out)!r} --force would delete the input {str(p)!r} (an earlier run's "
                            f"output there); choose another --out")


def clear_outputs(out: Path, names: Sequence[str], image_records: Sequence[str] = IMAGE_RECORDS) -> None:
    """Before a run writes into a folder that an earlier run filled (`--force`): remove the files diffcli itself
    writes there (`outputs_to_clear`) so the folder never mixes two runs (an eval-fid of it would score both).
    Nothing else in the folder is touched."""
    for p in outputs_to_clear(out, names, image_records):
        p.unlink()
