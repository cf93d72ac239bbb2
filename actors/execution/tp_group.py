"""Joins the executor ranks of one engine into a torch.distributed group for tensor parallelism
and hands the model its all-reduce (models/parallel.py). Called once by each executor at start."""

from __future__ import annotations

import torch
import torch.distributed as dist

from devices.base import Platform
from models.parallel import TensorParallel


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def join_group(platform: Platform, rank: int, size: int, rendezvous: str) -> TensorParallel:
    """This rank's TensorParallel; for size > 1, after every rank met at `rendezvous` (a file
    path on a shared filesystem, or tcp://host:port) over the platform's backend."""
    if size == 1:
        return TensorParallel()
    init = rendezvous if "://" in rendezvous else f"file://{rendezvous}"
    dist.init_process_group(
        platform.distributed_backend(), init_method=init, rank=rank, world_size=size
    )
    return TensorParallel(rank, size, _all_reduce)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
