"""Tensor-parallel ranks as threads of one process: each runs the same code with a TensorParallel
whose all-reduce and all-gather meet at a barrier, as torch.distributed's do across processes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from models.parallel import TensorParallel

T = TypeVar("T")


class ThreadGroup:
    """Collectives among `size` threads, one per rank (a rank that fails breaks the barrier, so
    the others fail too instead of waiting)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[torch.Tensor] = [torch.empty(0)] * size
        self.barrier = threading.Barrier(size, timeout=120)

    def rank(self, rank: int) -> TensorParallel:
        return TensorParallel(
            rank,
            self.size,
            lambda x: self.all_reduce(rank, x),
            lambda x: self.all_gather(rank, x),
        )

    def all_gather(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = x.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank took the list
        return parts

    def all_reduce(self, rank: int, x: torch.Tensor) -> torch.Tensor:
        return x.copy_(torch.stack(self.all_gather(rank, x)).sum(0))

    def run(self, fn: Callable[[TensorParallel], T], rank: int) -> T:
        try:
            return fn(self.rank(rank))
        except BaseException:
            self.barrier.abort()
            raise


def run_ranks(size: int, fn: Callable[[TensorParallel], T]) -> list[T]:
    """fn(rank's TensorParallel) on `size` threads at once; the results in rank order."""
    group = ThreadGroup(size)
    with ThreadPoolExecutor(size) as pool:
        futures = [pool.submit(group.run, fn, r) for r in range(size)]
        return [f.result() for f in futures]
