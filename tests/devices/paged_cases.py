"""Shared by the decode-kernel tests (CPU and CUDA): block tables scattered over a pool, as a
cache looks after requests came and went."""

from __future__ import annotations

import torch


def scattered_tables(lens: list[int], block_size: int) -> tuple[list[list[int]], int]:
    """Block tables holding lens[i] keys each, drawn in a random order from a pool with a few
    spare blocks; returns (tables, pool size in blocks). Seed torch first for repeatability."""
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    order = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for n in lens:
        count = -(-n // block_size)
        tables.append(order[used : used + count])
        used += count
    return tables, num_blocks
