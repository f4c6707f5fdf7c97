"""Checkpoints: one `.safetensors` file per model; never pickle.

Metadata (all strings): `format`, `kind` (denoiser | classifier | student), `recipe` (resolved, JSON,
re-validated on load), `step`, and what sampling needs: `process`, `parameterization`, `sigma_min`,
`sigma_max`, `sigma_data`, `num_classes`, `channels`, `resolution`, `dataset`.

Writes are atomic: a temporary file in the same folder, flush + fsync, `os.replace`, fsync of the folder —
a crash mid-write leaves the previous file byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .denoiser import Denoiser
from .errors import RunFailure, UserError
from .nets.unet import UNet
from .processes import make_process
from .recipes import Recipe, recipe_from_json
from .runtime import use_channels_last

FORMAT_VERSION = "1"
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin"}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "…"


# --- atomic writes ----------------------------------------------------------------------------------------
def _file_mode() -> int:
    """The mode open() would give a new file (0o666 less the umask): mkstemp's 0o600 would hide every
    checkpoint, grid and JSON from the user's group, unlike files any other tool writes."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # read once: os.umask can only be read by setting it, which is not thread-safe


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    try:  # a full disk or a read-only folder can fail here already: the same clean RunFailure
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise RunFailure(f"cannot write {path}: {e.strerror or e}; the previous file is intact") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise RunFailure(f"cannot write {path}: {e.strerror or e}; the previous file is intact") from None
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _unlink(p: str | Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what atomic_write_bytes' mkstemp names look like


def clean_temporaries(folder: str | Path) -> int:
    """Remove leftovers of interrupted atomic writes (`.NAME.XXXXXXXX.tmp`) in `folder`; returns how many.

    Not recursive on purpose: callers name the folders diffcli writes to, so a user's own files elsewhere
    (say `--out .`) are never touched."""
    n = 0
    if not Path(folder).is_dir():
        return 0
    for p in Path(folder).glob(".*.tmp"):
        if _TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink():
            _unlink(p)
            n += 1
    return n


# --- safetensors I/O --------------------------------------------------------------------------------------
def save_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata={k: str(v) for k, v in metadata.items()}))


def read_header(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Validate a safetensors file's header without loading tensors: (tensor entries, metadata).

    Everything a hostile or broken file can do wrong is a UserError naming the file."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(f"{p}: {p.suffix} files are pickles, which diffcli never loads (they can run code); "
                        f"convert the weights to .safetensors")
    if not p.exists():
        raise UserError(f"checkpoint {str(p)!r} does not exist")
    if p.is_dir():
        raise UserError(f"checkpoint {str(p)!r} is a folder, not a .safetensors file")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{p}: not a safetensors file (too short: {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            # the pickle/zip magic is also the little-endian header length of valid files (640, 896, 1152 or
            # 1408 bytes mod 2^16 start with 80 02..05; 19280 with "PK"), whose JSON header starts with "{"
            json_follows = n <= min(MAX_HEADER, size - 8) and f.read(1) == b"{"
            f.seek(8)
            if not json_follows and (head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
                                     or head[:2] == b"PK"):
                raise UserError(f"{p}: is a pickle/zip (torch.save) file, which diffcli never loads; "
                                f"convert the weights to .safetensors")
            if n > MAX_HEADER or n > size - 8:
                raise UserError(f"{p}: not a safetensors file (header length {n} exceeds the file's {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"checkpoint {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
        raise UserError(f"{p}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{p}: not a safetensors file (header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{p}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise UserError(f"{p}: tensor {name!r} has a malformed header entry")
        off = e["data_offsets"]
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) for o in off)
                or not 0 <= off[0] <= off[1] <= data_len):
            raise UserError(f"{p}: tensor {name!r} has data offsets {off} outside the file (truncated?)")
        spans.append((off[0], off[1], name))
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise UserError(f"{p}: tensors {an!r} and {bn!r} overlap")
    for name, e in header.items():
        dtype, shape, (o0, o1) = e["dtype"], e["shape"], e["data_offsets"]
        if (not isinstance(dtype, str) or not isinstance(shape, list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise UserError(f"{p}: tensor {name!r} has a malformed dtype {_short(dtype)} or shape {_short(shape)}")
        if dtype in DTYPE_BYTES and math.prod(shape) * DTYPE_BYTES[dtype] != o1 - o0:
            raise UserError(f"{p}: tensor {name!r} ({dtype} {_short(shape)}) does not fit its {o1 - o0} bytes")
    return header, meta


def read_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load all tensors and metadata of a validated safetensors file."""
    _, meta = read_header(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0][:120]})") from None
    return tensors, meta


def file_hash(path: str | Path, n: int = 16) -> str:
    """SHA-256 (first n hex digits) of a file: identifies checkpoints in sample.json, latents, metrics."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


# --- denoiser checkpoints ---------------------------------------------------------------------------------
def build_net(recipe: Recipe, channels: int, resolution: int, num_classes: int) -> UNet:
    m = recipe.model
    return UNet(in_channels=channels, out_channels=channels, resolution=resolution, channels=m.channels,
                channel_mult=m.channel_mult, num_res_blocks=m.num_res_blocks,
                attention_resolutions=m.attention_resolutions, head_channels=m.head_channels,
                dropout=m.dropout, num_classes=num_classes, noise_embedding=m.noise_embedding,
                guidance_embedding=m.guidance_embedding)


def build_denoiser(recipe: Recipe, channels: int, resolution: int, num_classes: int) -> Denoiser:
    d = recipe.diffusion
    process = make_process(d.process, sigma_min=d.sigma_min, sigma_max=d.sigma_max, sigma_data=d.sigma_data,
                           timesteps=d.timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
    net = build_net(recipe, channels, resolution, num_classes)
    return Denoiser(net, process, d.parameterization, num_classes=num_classes, weighting=d.weighting,
                    min_snr_gamma=d.min_snr_gamma, sigma_sampling=d.sigma_sampling, p_mean=d.p_mean, p_std=d.p_std)


def denoiser_metadata(denoiser: Denoiser, recipe: Recipe, *, step: int, channels: int, resolution: int,
                      kind: str = "denoiser", extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {
        "format": FORMAT_VERSION, "kind": kind, "recipe": recipe.to_json(), "step": str(step),
        "process": denoiser.process.name, "parameterization": denoiser.parameterization,
        "sigma_min": repr(denoiser.sigma_min), "sigma_max": repr(denoiser.sigma_max),
        "sigma_data": repr(denoiser.sigma_data), "num_classes": str(denoiser.num_classes),
        "channels": str(channels), "resolution": str(resolution), "dataset": recipe.data.name,
    }
    meta.update(extra or {})
    return meta


def save_denoiser(path: str | Path, denoiser: Denoiser, recipe: Recipe, *, step: int, channels: int,
                  resolution: int, state_dict: dict[str, Tensor] | None = None, kind: str = "denoiser",
                  extra: dict[str, str] | None = None) -> None:
    """Write a checkpoint; `state_dict` (e.g. the EMA weights) defaults to the denoiser's network weights."""
    sd = state_dict if state_dict is not None else denoiser.net.state_dict()
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise RunFailure(f"refusing to write {path}: tensor {k!r} has non-finite values")
    save_safetensors(path, sd, denoiser_metadata(denoiser, recipe, step=step, channels=channels,
                                                 resolution=resolution, kind=kind, extra=extra))


class LoadedCheckpoint:
    """A checkpoint's parts: the denoiser (eval mode), its recipe, metadata and file hash."""

    def __init__(self, denoiser: Denoiser, recipe: Recipe, meta: dict[str, str], path: Path) -> None:
        self.denoiser, self.recipe, self.meta, self.path = denoiser, recipe, meta, path

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def step(self) -> int:
        return int(self.meta.get("step", "0"))


def _meta_int(meta: dict[str, str], key: str, path: Path, lo: int, hi: int) -> int:
    try:
        v = int(meta[key])
    except KeyError:
        raise UserError(f"{path}: metadata lacks {key!r}; not a diffcli checkpoint") from None
    except ValueError:
        raise UserError(f"{path}: metadata {key} = {meta[key]!r} is not an integer") from None
    if not lo <= v <= hi:
        raise UserError(f"{path}: metadata {key} = {v} is out of range [{lo}, {hi}]")
    return v


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    kinds: tuple[str, ...] = ("denoiser", "student")) -> LoadedCheckpoint:
    """Load and validate a diffcli model checkpoint (see module docstring)."""
    path = Path(path)
    tensors, meta = read_safetensors(path)
    if meta.get("format") is None:
        raise UserError(f"{path}: no diffcli metadata (format); not a diffcli checkpoint")
    if meta["format"] != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {meta['format']!r} is not supported (this diffcli reads "
                        f"format {FORMAT_VERSION})")
    kind = meta.get("kind", "")
    if kind not in kinds:
        raise UserError(f"{path}: is a {kind or 'unknown'!r} checkpoint; a {' or '.join(kinds)} is needed here")
    if "recipe" not in meta:
        raise UserError(f"{path}: metadata lacks the recipe")
    recipe = recipe_from_json(meta["recipe"], str(path))
    channels = _meta_int(meta, "channels", path, 1, 4)
    resolution = _meta_int(meta, "resolution", path, 1, 4096)
    num_classes = _meta_int(meta, "num_classes", path, 0, 100000)
    if "step" in meta:  # read later for sample.json and the like: a bad value must fail here, before any output
        _meta_int(meta, "step", path, 0, 10**15)
    denoiser = build_denoiser(recipe, channels, resolution, num_classes)
    load_weights(denoiser.net, tensors, path)
    denoiser.to(device).eval()
    # sampling, inversion and distillation run the network in the layout training chose on this device
    # (the no-grad 32×32 forward is 1.08× faster channels_last on an AVX-512 CPU; the file stays contiguous)
    if use_channels_last(recipe.train.channels_last, torch.device(device)):
        denoiser.net.to(memory_format=torch.channels_last)
    if kind == "student" and "student_sigmas" in meta:  # the grid a distilled student was trained for
        denoiser.student_grid = (meta.get("student_sampler"), meta["student_sigmas"])
    return LoadedCheckpoint(denoiser, recipe, meta, path)


def load_weights(module: torch.nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    """Load a state dict strictly, listing missing, unexpected, mis-shaped and non-finite tensors by name."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    problems = []
    if missing:
        problems.append(f"missing tensors {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_names(unexpected)}")
    if shapes:
        problems.append("mis-shaped tensors " + _names(
            [f"{k} {tuple(tensors[k].shape)} (expected {tuple(own[k].shape)})" for k in shapes]))
    if problems:
        raise UserError(f"{path}: does not match its recipe's network: {'; '.join(problems)}")
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: tensor {k!r} has non-finite values")
    module.load_state_dict(tensors, strict=True)


def _names(items: list[str], most: int = 5) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" (+{len(items) - most} more)" if len(items) > most else "")


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> Denoiser:
    """DESIGN.md contract: any model checkpoint as a Denoiser (eval mode, on `device`)."""
    return load_checkpoint(path, device).denoiser
