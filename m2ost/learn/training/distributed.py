"""Rank bookkeeping for a training run, distributed or not.

Under ``torchrun`` (or ``srun`` with MASTER_ADDR/MASTER_PORT exported) with a world size above 1,
training uses DistributedDataParallel (gloo on CPU, nccl on CUDA); :class:`Ranks` sets the
process group up and offers the few collective operations the training loop needs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from m2ost.errors import InputError
from m2ost.learn.training.device import resolve_device


class Ranks:
    """Rank bookkeeping; a world of one when not launched distributed."""

    def __init__(self, device_spec: str):
        env = os.environ
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")) or 1)
        self.world = world
        self.rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")) or 0)
        self.local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")) or 0)
        self.owned = False
        if world > 1 and "LOCAL_RANK" not in env:
            env["LOCAL_RANK"] = str(self.local_rank)  # resolve_device maps cuda -> cuda:LOCAL_RANK
        self.device = resolve_device(device_spec)
        if world > 1 and not dist.is_initialized():
            if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
                raise InputError("distributed run (world size > 1) without MASTER_ADDR and "
                                 "MASTER_PORT; launch with torchrun, or export both before srun")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend, rank=self.rank, world_size=world)
            self.owned = True
        if world > 1:
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        if self.world > 1:
            dist.broadcast(t, 0)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
