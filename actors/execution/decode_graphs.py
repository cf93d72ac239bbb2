"""Recorded decode steps: the model's forward for a batch of one-token sequences, captured once per
batch size bucket by the platform (CUDA graphs) and replayed by ModelRunner for every step that
only decodes. Replaying skips the per-kernel launch cost of an eager forward, which dominates a
small batch's step on a fast GPU.

The graphs read fixed buffers: token ids, positions, cache slots, block tables and key counts.
A step of n sequences runs the smallest bucket >= n; its padding rows attend to one key of a
scratch block that no sequence owns (ModelRunner allocates it past the pool's blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from devices.base import Platform
from models.attention import AttentionMetadata, DecodeKernel, KVCache
from models.decoder import Decoder


def _run_layer(
    layer: nn.Module,
    x: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    cache: KVCache,
) -> torch.Tensor:
    return layer(x, cos_sin, meta, cache)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_batch (always included), as vLLM captures."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    """One recorded forward per bucket; `run` fills the buffers and replays the right one."""

    def __init__(
        self,
        model: Decoder,
        kv: list[KVCache],
        platform: Platform,
        kernel: DecodeKernel,
        *,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        mrope: bool,
    ) -> None:
        device = model.embed_tokens.weight.device
        self.model, self.kv, self.kernel = model, kv, kernel
        self.block_size, self.scratch_block = block_size, scratch_block
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch
        self.max_blocks = max_blocks

        def buffer(shape: tuple[int, ...], fill: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.full(shape, fill, dtype=dtype, device=device)

        scratch_slot = scratch_block * block_size
        self.input_ids = buffer((max_batch,), 0, torch.long)
        self.positions = buffer((3, max_batch) if mrope else (max_batch,), 0, torch.long)
        self.slots = buffer((max_batch,), scratch_slot, torch.long)
        self.tables = buffer((max_batch, max_blocks), scratch_block, torch.int32)
        self.lens = buffer((max_batch,), 1, torch.int32)
        self.rows = torch.arange(max_batch, device=device)
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.replays = 0
        # Compiled one layer at a time: every layer runs the same code, so one trace serves all.
        self.run_layer = platform.compile(_run_layer)
        with torch.inference_mode():
            for size in reversed(self.buckets):  # largest first: the smaller reuse its memory
                self.graphs[size] = platform.capture_graph(partial(self._forward, size))

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:size],
            block_size=self.block_size,
            decode_rows=self.rows[:size],
            decode_tables=self.tables[:size],
            decode_lens=self.lens[:size],
            decode_bias=None,
            prefills=[],
            decode_kernel=self.kernel,
        )
        positions = self.positions[..., :size]
        return self.model(self.input_ids[:size], positions, meta, self.kv, run_layer=self.run_layer)

    def run(
        self,
        token_ids: list[int],
        positions: torch.Tensor,
        block_tables: list[list[int]],
        cache_lens: list[int],
    ) -> torch.Tensor:
        """Hidden states [n, hidden] of n one-token sequences: token i at `positions[..., i]`
        (a CPU tensor, [n] or [3, n]) is the last of cache_lens[i] keys in block_tables[i]."""
        n = len(token_ids)
        size = next(b for b in self.buckets if b >= n)
        bs = self.block_size
        width = max(-(-length // bs) for length in cache_lens)
        if width > self.max_blocks:
            raise ValueError(f"a sequence of {max(cache_lens)} tokens exceeds the recorded tables")
        tables = torch.full((size, width), self.scratch_block, dtype=torch.int32)
        slots = torch.full((size,), self.scratch_block * bs, dtype=torch.long)
        lens = torch.ones(size, dtype=torch.int32)
        ids = torch.zeros(size, dtype=torch.long)
        ids[:n] = torch.tensor(token_ids, dtype=torch.long)
        for i, (table, length) in enumerate(zip(block_tables, cache_lens, strict=True)):
            used = -(-length // bs)
            tables[i, :used] = torch.tensor(table[:used], dtype=torch.int32)
            slots[i] = table[(length - 1) // bs] * bs + (length - 1) % bs
            lens[i] = length
        pos = torch.zeros((*positions.shape[:-1], size), dtype=torch.long)
        pos[..., :n] = positions
        self.input_ids[:size].copy_(ids, non_blocking=True)
        self.positions[..., :size].copy_(pos, non_blocking=True)
        self.slots[:size].copy_(slots, non_blocking=True)
        self.tables[:size, :width].copy_(tables, non_blocking=True)
        self.lens[:size].copy_(lens, non_blocking=True)
        self.replays += 1
        return self.graphs[size]()[:n]
