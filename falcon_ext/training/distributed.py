"""This process's place in a training job: the single process, or one rank of `torchrun`.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the environment)
``session`` joins PyTorch's process group, gloo for a CPU device and nccl for CUDA (each rank on
cuda:LOCAL_RANK). Launched any other way it creates no process group and every collective below
is the identity, so the single-process path runs exactly as it did before DDP existed.

Ranks split each global batch into equal contiguous shares of rows (``World.share``): the
global batch is a pure function of (seed, step), so a rank reads its rows without a sampler.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Rank and size of the job, and the device this rank computes on; ``group``: a process group
    was joined (torchrun), so collectives communicate."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the only one that logs and writes files."""
        return self.rank == 0

    def share(self, rows: int) -> slice:
        """This rank's rows of a global batch of ``rows`` (a multiple of the size)."""
        if rows % self.size:
            raise ValueError(f"a global batch of {rows} rows does not split evenly over {self.size} processes")
        n = rows // self.size
        return slice(self.rank * n, (self.rank + 1) * n)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over the ranks, in place."""
        if self.group:
            dist.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (equal shapes), concatenated along dim 0 in rank order."""
        if not self.group:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module to train: DistributedDataParallel over it in a process group, else itself."""
        if not self.group:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.local_rank] if self.device.startswith("cuda") else None)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def start(device: str, timeout_s: float) -> World:
    """Joins the process group when launched by torchrun (waiting at most ``timeout_s`` for the
    other ranks; the same bound applies to every later collective), else the single process."""
    if not launched_by_torchrun():
        return World(device=device)
    rank, size = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set (a distributed launch), but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # torch's DistError family derives from RuntimeError
        where = ":".join(os.environ.get(v, f"<{v} unset>") for v in ("MASTER_ADDR", "MASTER_PORT"))
        reason = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        raise RuntimeError(f"rank {rank} of {size} could not join the {backend} process group at {where} within "
                           f"{timeout_s:g} s: {reason}. Launch every rank with the same command through torchrun "
                           f"(--nproc-per-node, and --nnodes with one --rdzv-endpoint on several nodes); nothing "
                           f"was written") from None
    return World(rank, size, local, device, group=True)


@contextlib.contextmanager
def session(device: str, timeout_s: float = 1800.0):
    """``start`` as a context: the process group, if one was joined, is left on the way out."""
    world = start(device, timeout_s)
    try:
        yield world
    finally:
        if world.group:
            dist.destroy_process_group()
