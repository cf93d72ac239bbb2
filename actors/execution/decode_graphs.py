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

        # All per-sequence inputs in one int64 block [ids; positions (1 or 3 rows); slots; lens],
        # so a step needs two host-to-device copies (this block and the tables), both from
        # page-locked staging buffers on accelerators.
        self.position_rows = 3 if mrope else 1
        rows = self.position_rows + 3
        pin = device.type != "cpu"
        self.inputs = torch.zeros((rows, max_batch), dtype=torch.long, device=device)
        self.tables = torch.full((max_batch, max_blocks), scratch_block, device=device)
        self.tables = self.tables.to(torch.int32)
        self.staged_inputs = torch.zeros((rows, max_batch), dtype=torch.long, pin_memory=pin)
        self.staged_tables = torch.zeros(max_batch * max_blocks, dtype=torch.int32, pin_memory=pin)
        self.input_ids = self.inputs[0]
        self.positions = self.inputs[1 : 1 + self.position_rows]
        if not mrope:
            self.positions = self.positions[0]
        self.slots = self.inputs[-2]
        self.lens = self.inputs[-1]
        self.inputs[-2].fill_(scratch_block * block_size)
        self.inputs[-1].fill_(1)
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
        positions: list[list[int]],
        block_tables: list[list[int]],
        cache_lens: list[int],
    ) -> torch.Tensor:
        """Hidden states [n, hidden] of n one-token sequences: token i at position
        positions[r][i] (one row, or three for M-RoPE) is the last of cache_lens[i] keys in
        block_tables[i]. The result is the recording's buffer: read it before the next run."""
        n = len(token_ids)
        size = next(b for b in self.buckets if b >= n)
        bs = self.block_size
        width = max(-(-length // bs) for length in cache_lens)
        if width > self.max_blocks:
            raise ValueError(f"a sequence of {max(cache_lens)} tokens exceeds the recorded tables")
        inputs = self.staged_inputs.numpy()
        inputs[0, :n] = token_ids
        inputs[0, n:size] = 0
        for r, row in enumerate(positions):
            inputs[1 + r, :n] = row
        inputs[1 : 1 + self.position_rows, n:size] = 0
        inputs[-1, :n] = cache_lens
        inputs[-1, n:size] = 1
        inputs[-2, n:size] = self.scratch_block * bs
        tables = self.staged_tables[: size * width].view(size, width).numpy()
        tables[n:, 0] = self.scratch_block
        for i, (table, length) in enumerate(zip(block_tables, cache_lens, strict=True)):
            used = -(-length // bs)
            tables[i, :used] = table[:used]
            inputs[-2, i] = table[(length - 1) // bs] * bs + (length - 1) % bs
        self.inputs[:, :size].copy_(self.staged_inputs[:, :size], non_blocking=True)
        self.tables[:size, :width].copy_(self.staged_tables[: size * width].view(size, width))
        self.replays += 1
        return self.graphs[size]()[:n]
