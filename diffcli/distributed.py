"""Multi-process runs on torch.distributed, launched by torchrun (or `diffcli … --nproc N`, which calls it).

One process per device: gloo on CPU, nccl on CUDA. The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) is all that is read, so multi-node runs use torchrun's own rendezvous unchanged.
With one process nothing here touches torch.distributed at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n items (sizes differ by at most one)."""
        lo = self.rank * n // self.size
        return lo, (self.rank + 1) * n // self.size


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (if any); returns the world and this rank's device."""
    if not launched():
        return World(), device
    import torch.distributed as dist

    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def finish() -> None:
    if launched():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce(t: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max); a no-op in one process."""
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def gather_to_main(obj, world: World) -> list | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj, world: World):
    """Rank 0's `obj` on every rank (the argument is ignored elsewhere)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ReportedByMain(UserError):
    """Bad input that rank 0 reports; the other ranks exit with the same code without repeating the line."""

    quiet = True


def raise_once(error: UserError | None, world: World) -> None:
    """Collective, after every rank has checked the same input: report bad input once, not once per rank.

    If rank 0 found an error it raises it (the CLI prints it) and every other rank raises a quiet
    `ReportedByMain`; an error that only another rank found is raised, and printed, there."""
    if world.distributed:
        main_error = broadcast_from_main(str(error) if error is not None else None, world)
        if main_error is not None and not world.is_main:
            import time

            # let rank 0 print first: torchrun stops every rank as soon as one exits (bounded for other launchers)
            time.sleep(5)
            raise ReportedByMain(main_error)
    if error is not None:
        raise error


def relaunch(nproc: int, argv: list[str]) -> int:
    """`diffcli CMD … --nproc N` → torchrun's launcher (`--standalone --nproc-per-node N -m diffcli CMD …`).

    The launcher runs in this process with our arguments handed over verbatim (on torchrun's own command line
    an argument such as `--n` would be mistaken for an abbreviation of one of its options). The exit code is
    the workers' own (2 for bad input, 130/143 after a signal); torchrun forwards signals to every rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "diffcli"])
    args.training_script_args = list(argv)
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values() if f.exitcode is not None and f.exitcode > 0]
        if 2 in codes:  # a worker's bad input is the verdict; the others' 143 is torchrun stopping them after it
            return 2
        return max(codes) if codes else 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0
