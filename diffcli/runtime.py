"""Small shared runtime helpers: device choice, seeding, progress bars."""

from __future__ import annotations

import hashlib
import torch

from .errors import UserError


def check_out_folder(out, option: str = "--out") -> None:
    """An output folder must be a folder or not exist yet, and so must its nearest existing ancestor: a path
    through a file would fail only at the first write, after all the work."""
    from pathlib import Path

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {str(out)!r} is a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {str(out)!r}: {str(parent)!r} is a file, not a folder")
            return


def resolve_device(name: str, field: str = "--device") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else must be a device torch knows and has. `field` is
    where the name came from (the option, or the recipe's train.device), for the error message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{field} {name!r}: not a device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{field} {name!r}: CUDA is not available on this machine")
    return dev


def run_device(option: str | None, recipe_device: str) -> torch.device:
    """The device of a run: --device when given, else the recipe's train.device (the error names which)."""
    return resolve_device(option or recipe_device, "--device" if option else "train.device")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms (SHA-256 of their text)."""
    h = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of image `index` of a run with `seed`: images depend only on (seed, index)."""
    return torch.Generator().manual_seed(mix_seed(seed, index, 0x5A))


def progress(transient: bool = False):
    """A rich progress bar with ETA on stderr (stdout stays clean for scripts)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=console, transient=transient,
                    disable=not console.is_terminal)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def use_channels_last(setting: bool | str, dev: torch.device, bf16: bool = False) -> bool:
    """Whether to keep weights and batches channels_last (NHWC) — the recipe's `train.channels_last`.

    "auto" turns it on where it was measured or is documented to pay (docs/BENCHMARKS.md, issue 8): float32
    on CPUs with AVX-512, whose oneDNN convolutions are NHWC-native (training step 1.09× at 32×32 and 1.08× at
    8×8 on a 2-core Xeon), and CUDA under bf16 autocast (tensor-core convolutions want NHWC). Off on AVX2-only
    CPUs (0.93× at 32×32 on an AMD EPYC), under bf16 on a CPU (0.89× at 32×32, 0.86× at 8×8 on the Xeon) and
    elsewhere. Only the memory layout changes, not the arithmetic."""
    if setting != "auto":
        return bool(setting)
    if dev.type == "cuda":
        return bf16
    if dev.type == "cpu":
        return not bf16 and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return False


def to_channels_last(x: torch.Tensor | None, enabled: bool) -> torch.Tensor | None:
    """A 4-D batch (B, C, H, W) in channels_last memory when `enabled`; anything else unchanged."""
    if enabled and x is not None and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
