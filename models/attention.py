"""Paged KV cache and batched attention over one engine step (prefill chunks and decodes mixed).
The executor builds AttentionMetadata once per step; every decoder layer's Attention reads it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.layers import apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    zeros: Callable[..., torch.Tensor] = torch.zeros,
) -> list[KVCache]:
    """Per layer (k_cache, v_cache), each [num_kv_heads, num_blocks * block_size, head_dim]:
    head-major, so the blocks of a block table gather into [heads, tokens, head_dim] rows that
    matrix products read directly (no transposing copy per step). `zeros(shape, dtype, device)`
    makes each tensor (a platform may commit the memory lazily); unused slots must read as 0,
    since padded decode keys are read and masked, and 0 * NaN would poison a row."""
    shape = (config.num_kv_heads, num_blocks * block_size, config.head_dim)
    return [
        (zeros(shape, dtype=dtype, device=device), zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = (
        2 * config.num_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
    )
    return per_token * block_size * config.num_layers


class DecodeKernel(Protocol):
    """A device's decode attention that reads the paged cache in place (the platform offers one,
    e.g. devices/cpu_paged_attention.py): q [S, H, D] -> [S, H, D], sequence s attending to the
    first lens[s] keys of the blocks tables[s] [S, max_blocks] names."""

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor: ...


class PrefillKernel(Protocol):
    """A device's attention for many query rows at once (e.g. devices/cpu_prefill_attention.py):
    q [Tq, H, D], k/v [rows, kvH, D] (any strides but the last) -> [Tq, H, D]. Segment s takes
    the next q_lens[s] query rows and the next k_lens[s] keys: rows of k/v, or the rows that
    key_index names. Causal: query i of a segment sees keys j <= i + k_len - q_len. Written
    into `out` ([Tq, H, D], a view) where given."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_lens: list[int],
        k_lens: list[int],
        causal: bool,
        key_index: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class RopeStore(Protocol):
    """A device's fused start of attention (e.g. devices/cpu_fused_ops.py): qkv [T, (H + 2 kvH)
    * D] as qkv_proj gives it -> (q rotated [T, H, D], k rotated [T, kvH, D] if `want_k` else
    None), with k rotated and v written into the caches [kvH, slots, D] at `slots` [T]. The
    same arithmetic as apply_rotary + index_copy_."""

    def __call__(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        heads: int,
        kv_heads: int,
        want_k: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class PrefillSpan:
    """One sequence of the step with several new tokens (a prompt or a prefill chunk)."""

    start: int  # its rows in the packed token order: [start, end)
    end: int
    key_slots: torch.Tensor | None  # cache slots of all its keys; None when nothing is cached
    # [1, 1, q, L] causal with offset, where more keys are cached than the span has tokens;
    # None otherwise (no cached keys, or few enough that blank query rows stand for them)
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers.

    slot_mapping [T]: cache slot of each new token. Decodes (one new token each) are attended
    to together: decode_rows [Bd] are their packed rows, decode_tables [Bd, nb] their block
    tables (padding repeats a valid block) and decode_lens [Bd] their key counts. With a
    decode_kernel (the platform's) they are attended to in place; otherwise their blocks are
    gathered and decode_bias [Bd, 1, nb * block_size] (0 on real keys, -inf on padding) masks
    the padding. Every other sequence is a PrefillSpan attended to on its own, so a long prompt
    never pads the decodes of its step to its length.
    """

    slot_mapping: torch.Tensor
    block_size: int
    decode_rows: torch.Tensor | None
    decode_tables: torch.Tensor | None
    decode_lens: torch.Tensor | None
    decode_bias: torch.Tensor | None
    prefills: list[PrefillSpan]
    decode_kernel: DecodeKernel | None = None
    _rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def decode_block_rows(self, num_kv: int, blocks: int) -> torch.Tensor:
        """Rows of a cache viewed as [num_kv * blocks, block_size * head_dim] holding the decodes'
        blocks, head by head (the same for every layer of the step, so made once)."""
        assert self.decode_tables is not None
        key = (num_kv, blocks)
        if key not in self._rows:
            flat = self.decode_tables.flatten()
            heads = torch.arange(num_kv, device=flat.device)[:, None] * blocks
            self._rows[key] = (heads + flat[None, :]).flatten()
        return self._rows[key]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        decode_kernel: DecodeKernel | None = None,
    ) -> AttentionMetadata:
        def slots(table: list[int], first: int, last: int) -> torch.Tensor:
            pos = torch.arange(first, last)
            return torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + (
                pos % block_size
            )

        slot_parts, prefills, decodes = [], [], []
        row = 0
        for qlen, start, table in zip(query_lens, start_positions, block_tables, strict=True):
            slot_parts.append(slots(table, start, start + qlen))
            if qlen == 1:
                decodes.append((row, start + 1, table))
            elif start == 0:
                prefills.append(PrefillSpan(row, row + qlen, None, None))
            else:
                total = start + qlen
                mask = None
                if start > qlen:  # else attended to without a mask (attend_stored)
                    causal = torch.arange(total)[None, :] <= (start + torch.arange(qlen))[:, None]
                    mask = causal[None, None].to(device)
                prefills.append(
                    PrefillSpan(row, row + qlen, slots(table, 0, total).to(device), mask)
                )
            row += qlen
        dec_rows = dec_tables = dec_lens = dec_bias = None
        if decodes:
            nb = max(-(-n // block_size) for _, n, _ in decodes)
            tables = []
            for _, n, table in decodes:
                used = table[: -(-n // block_size)]
                tables.append(used + [used[-1]] * (nb - len(used)))
            lens = torch.tensor([n for _, n, _ in decodes])
            if decode_kernel is None:
                bias = torch.zeros(len(decodes), nb * block_size)
                keys = torch.arange(nb * block_size)[None, :]
                bias.masked_fill_(keys >= lens[:, None], -torch.inf)
                dec_bias = bias[:, None].to(device)
            dec_tables = torch.tensor(tables, dtype=torch.long, device=device)
            dec_lens = lens.to(device)
            dec_rows = torch.tensor([r for r, _, _ in decodes], device=device)
        return cls(
            torch.cat(slot_parts).to(device),
            block_size,
            dec_rows,
            dec_tables,
            dec_lens,
            dec_bias,
            prefills,
            decode_kernel,
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    meta: AttentionMetadata,
    prefill: PrefillKernel | None = None,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, kvH, D] for the new tokens -> output [T, H, D]."""
    k_cache, v_cache = cache
    k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    return attend_stored(q, k, v, cache, meta, prefill)


def attend_stored(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    cache: KVCache,
    meta: AttentionMetadata,
    prefill: PrefillKernel | None = None,
) -> torch.Tensor:
    """paged_attention once the new keys and values are in the cache (k/v: the new tokens';
    k may be None in a decode-only step, whose keys are all read from the cache). With a
    device's `prefill` kernel the prefill spans go to it, otherwise to SDPA."""
    k_cache, v_cache = cache
    if meta.decode_rows is not None and not meta.prefills:
        return _decode_attention(q, k_cache, v_cache, meta)  # every row a decode, in order
    out = torch.empty_like(q)
    for span in meta.prefills:
        if prefill is not None:
            _prefill_span(prefill, q, k, v, cache, span, out[span.start : span.end])
            continue
        qs = q[span.start : span.end].transpose(0, 1)[None]  # [1, H, q, D]
        if span.key_slots is None:  # nothing cached: SDPA's fused causal kernel, no mask
            assert k is not None
            ks = k[span.start : span.end].transpose(0, 1)[None]
            vs = v[span.start : span.end].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        else:
            ks = k_cache.index_select(1, span.key_slots)[None]  # [1, kvH, L, D]
            vs = v_cache.index_select(1, span.key_slots)[None]
            cached = ks.shape[2] - qs.shape[2]
            if span.mask is None:
                # Blank query rows for the cached keys make SDPA's causal mask (aligned to the
                # first query) ours, so its fused kernel runs; a mask would force the slow path
                # (CPU, 16 cached + 638 new tokens: 2.1 against 3.7 ms a layer).
                padded = torch.cat([qs.new_zeros(*qs.shape[:2], cached, qs.shape[3]), qs], dim=2)
                o = F.scaled_dot_product_attention(padded, ks, vs, is_causal=True, enable_gqa=True)
                o = o[:, :, cached:]
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=span.mask, enable_gqa=True)
        out[span.start : span.end] = o[0].transpose(0, 1)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = _decode_attention(q[meta.decode_rows], k_cache, v_cache, meta)
    return out


def _prefill_span(
    prefill: PrefillKernel,
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    cache: KVCache,
    span: PrefillSpan,
    out: torch.Tensor,
) -> None:
    """One span through the device's kernel into `out`: its new keys where nothing is cached,
    else every key read in place from the cache (viewed [slots, kvH, D]; no gathered copy, no
    mask)."""
    qs = q[span.start : span.end]
    n = span.end - span.start
    if span.key_slots is None:
        assert k is not None
        ks, vs = k[span.start : span.end], v[span.start : span.end]
        prefill(qs, ks, vs, [n], [n], True, out=out)
        return
    k_cache, v_cache = cache
    keys = [span.key_slots.shape[0]]
    prefill(
        qs, k_cache.transpose(0, 1), v_cache.transpose(0, 1), [n], keys, True, span.key_slots, out
    )


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """All one-token sequences of the step at once, q [Bd, H, D] -> [Bd, H, D].

    Their blocks are gathered whole (one index_select per cache, a copy of contiguous blocks),
    and each KV head's group of query heads is one batched matrix product over them: no key is
    repeated for grouped-query attention and no transposing copy is made. Measured against
    SDPA's one-token CPU path and an [slots, heads, dim] layout, this was 2-4x faster at 32
    sequences of 700 tokens (see BENCHMARKS.md). A platform's decode_kernel replaces all this."""
    bd, num_heads, head_dim = q.shape
    if meta.decode_kernel is not None:
        assert meta.decode_tables is not None and meta.decode_lens is not None
        return meta.decode_kernel(
            q,
            k_cache,
            v_cache,
            meta.decode_tables,
            meta.decode_lens,
            meta.block_size,
            head_dim**-0.5,
        )
    assert meta.decode_bias is not None
    num_kv = k_cache.shape[0]
    group = num_heads // num_kv
    blocks = k_cache.shape[1] // meta.block_size
    rows = meta.decode_block_rows(num_kv, blocks)
    flat = (num_kv * blocks, meta.block_size * head_dim)
    keys = k_cache.view(flat).index_select(0, rows).view(num_kv * bd, -1, head_dim)
    values = v_cache.view(flat).index_select(0, rows).view(num_kv * bd, -1, head_dim)
    qg = q.view(bd, num_kv, group, head_dim).transpose(0, 1).reshape(num_kv * bd, group, head_dim)
    scores = torch.bmm(qg, keys.transpose(1, 2)).float() * head_dim**-0.5
    scores = scores.view(num_kv, bd, group, -1) + meta.decode_bias
    probs = scores.softmax(dim=-1).to(values.dtype).view(num_kv * bd, group, -1)
    out = torch.bmm(probs, values).view(num_kv, bd, group, head_dim)
    return out.transpose(0, 1).reshape(bd, num_heads, head_dim)


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
        self.rope_store: RopeStore | None = None  # a device's fused one, for decode-only steps
        self.prefill_kernel: PrefillKernel | None = None  # a device's, for prompts and chunks

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.rope_store is None:
            q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), *cos_sin)
            k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), *cos_sin)
            out = paged_attention(q, k, v, cache, meta, self.prefill_kernel)
        else:
            decode_only = meta.decode_rows is not None and not meta.prefills
            q, k_rotated = self.rope_store(
                qkv,
                *cos_sin,
                *cache,
                meta.slot_mapping,
                self.num_heads,
                self.num_kv_heads,
                want_k=not decode_only,  # decodes read their keys from the cache only
            )
            out = attend_stored(q, k_rotated, v, cache, meta, self.prefill_kernel)
        return self.o_proj(out.reshape(-1, self.q_size))
