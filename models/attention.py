"""Paged KV cache and batched attention over one engine step (prefill chunks and decodes mixed).
The executor builds AttentionMetadata once per step; every decoder layer's Attention reads it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> list[KVCache]:
    """Per layer (k_cache, v_cache), each [num_blocks * block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
    return [
        (
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )
        for _ in range(config.num_layers)
    ]


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = (
        2 * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
    )
    return per_token * block_size * config.num_layers


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers.

    slot_mapping [T]: cache slot of each new token. query_index [T]: where each packed token sits
    in the padded [B * Qmax] query grid. key_slots [B, Lmax]: cache slots of each sequence's keys
    (padding repeats a valid slot). mask [B, 1, Qmax, Lmax]: causal with per-sequence offset; a
    padded query row sees the same keys as its sequence's last real row, so it never yields NaN.
    """

    slot_mapping: torch.Tensor
    query_index: torch.Tensor
    key_slots: torch.Tensor
    mask: torch.Tensor
    num_seqs: int
    max_query_len: int
    fresh_prefill: bool = False  # one sequence, nothing cached before it: plain causal SDPA

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        num_seqs = len(query_lens)
        max_q = max(query_lens)
        seq_lens = [s + q for s, q in zip(start_positions, query_lens, strict=True)]
        max_len = max(seq_lens)
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
        for b, table in enumerate(block_tables):
            tables[b, : len(table)] = torch.tensor(table, dtype=torch.long)
        qlen = torch.tensor(query_lens, dtype=torch.long)
        start = torch.tensor(start_positions, dtype=torch.long)
        slen = torch.tensor(seq_lens, dtype=torch.long)

        # Keys: positions 0..Lmax-1 per sequence, padding clamped onto the last real position.
        key_pos = torch.minimum(torch.arange(max_len)[None, :], (slen - 1)[:, None])
        key_slots = tables.gather(1, key_pos // block_size) * block_size + key_pos % block_size

        # New tokens: packed order is sequence by sequence, row i of sequence b.
        row = torch.arange(max_q)[None, :]
        valid_q = row < qlen[:, None]  # [B, Qmax]
        q_pos = start[:, None] + row
        slot_mapping = key_slots.gather(1, torch.minimum(q_pos, slen[:, None] - 1))[valid_q]
        query_index = (torch.arange(num_seqs)[:, None] * max_q + row)[valid_q]

        # Causal mask with offset; padded query rows reuse the last real row's visibility.
        vis_pos = start[:, None] + torch.minimum(row, (qlen - 1)[:, None])  # [B, Qmax]
        mask = torch.arange(max_len)[None, None, :] <= vis_pos[:, :, None]  # [B, Qmax, Lmax]
        return cls(
            slot_mapping=slot_mapping.to(device),
            query_index=query_index.to(device),
            key_slots=key_slots.to(device),
            mask=mask[:, None].to(device),
            num_seqs=num_seqs,
            max_query_len=max_q,
            fresh_prefill=num_seqs == 1 and start_positions[0] == 0 and max_q > 1,
        )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, meta: AttentionMetadata
) -> torch.Tensor:
    """q [T, H, D], k/v [T, kvH, D] for the new tokens -> output [T, H, D]."""
    k_cache, v_cache = cache
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_tokens, num_heads, head_dim = q.shape
    if meta.fresh_prefill:  # no mask: SDPA's fused causal kernel instead of its math path
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            is_causal=True,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)
    grid = meta.num_seqs * meta.max_query_len
    q_pad = q.new_zeros(grid, num_heads, head_dim).index_copy_(0, meta.query_index, q)
    q_pad = q_pad.view(meta.num_seqs, meta.max_query_len, num_heads, head_dim).transpose(1, 2)
    keys = k_cache[meta.key_slots].transpose(1, 2)  # [B, kvH, Lmax, D]
    values = v_cache[meta.key_slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=meta.mask, enable_gqa=True)
    out = out.transpose(1, 2).reshape(grid, num_heads, head_dim)
    return out.index_select(0, meta.query_index)


class Attention(nn.Module):
    """Self-attention with one fused qkv_proj matmul (a deliberate perf choice; the loader writes
    HF's q_proj/k_proj/v_proj into its three row blocks), RoPE, paged KV and o_proj."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), *cos_sin)
        k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), *cos_sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, cache, meta)
        return self.o_proj(out.reshape(-1, self.q_size))
