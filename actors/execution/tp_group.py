"""Joins the executor ranks of one engine into a torch.distributed group for tensor parallelism
and hands the model its all-reduce and all-gather (models/parallel.py). Called once by each
executor at start."""

from __future__ import annotations

import torch
import torch.distributed as dist

from devices.base import Platform
from models.parallel import TensorParallel


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's x (one shape on all ranks: gloo gathers equal sizes only), in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def join_group(platform: Platform, rank: int, size: int, rendezvous: str) -> TensorParallel:
    """This rank's TensorParallel; for size > 1, after every rank met at `rendezvous` (a file
    path on a shared filesystem, or tcp://host:port) over the platform's backend."""
    if size == 1:
        return TensorParallel()
    init = rendezvous if "://" in rendezvous else f"file://{rendezvous}"
    dist.init_process_group(
        platform.distributed_backend(), init_method=init, rank=rank, world_size=size
    )
    return TensorParallel(rank, size, _all_reduce, _all_gather)


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
