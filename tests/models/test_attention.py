"""Paged attention against dense causal attention: decodes read by block table, prefill spans
with and without cached prefixes, grouped-query heads, in one mixed step."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from models.attention import AttentionMetadata, paged_attention


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last q.shape[0] positions over all k/v rows ([L, kvH, D])."""
    groups = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
    values = v.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
    total, n = k.shape[0], q.shape[0]
    mask = torch.arange(total)[None, :] <= (total - n + torch.arange(n))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1), (4, 4)])
def test_mixed_step_matches_dense_attention(heads: int, kv_heads: int) -> None:
    torch.manual_seed(0)
    block_size, head_dim = 4, 8
    # (tokens already cached, new tokens): decodes, a fresh prompt, a chunk after a shorter
    # prefix (blank query rows + SDPA's causal kernel) and after a longer one (explicit mask)
    shapes = [(9, 1), (0, 6), (3, 1), (5, 7), (12, 3), (16, 1)]
    blocks = list(range(64))
    random.Random(1).shuffle(blocks)
    tables, histories = [], []
    for cached, new in shapes:
        n = -(-(cached + new) // block_size)
        tables.append(blocks[:n])
        blocks = blocks[n:]
        histories.append(
            (
                torch.randn(cached + new, kv_heads, head_dim),
                torch.randn(cached + new, kv_heads, head_dim),
            )
        )
    k_cache = torch.zeros(kv_heads, 64 * block_size, head_dim)
    v_cache = torch.zeros_like(k_cache)
    for (cached, _), table, (k, v) in zip(shapes, tables, histories):
        for pos in range(cached):  # what earlier steps wrote
            slot = table[pos // block_size] * block_size + pos % block_size
            k_cache[:, slot], v_cache[:, slot] = k[pos], v[pos]
    qs = [torch.randn(new, heads, head_dim) for _, new in shapes]
    meta = AttentionMetadata.build(
        [new for _, new in shapes], [c for c, _ in shapes], tables, block_size, torch.device("cpu")
    )
    new_k = torch.cat([k[c:] for (c, _), (k, _) in zip(shapes, histories)])
    new_v = torch.cat([v[c:] for (c, _), (_, v) in zip(shapes, histories)])
    out = paged_attention(torch.cat(qs), new_k, new_v, (k_cache, v_cache), meta)
    expected = torch.cat([dense_reference(q, k, v) for q, (k, v) in zip(qs, histories)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_only_step_matches_dense_attention() -> None:
    torch.manual_seed(2)
    block_size, heads, kv_heads, head_dim = 16, 14, 2, 16
    lens = [1, 17, 40, 33]
    tables = [[7], [0, 3], [9, 1, 4], [2, 8, 5]]
    k_cache = torch.randn(kv_heads, 10 * block_size, head_dim)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(len(lens), heads, head_dim)
    slots = [
        torch.tensor([t[p // block_size] * block_size + p % block_size for p in range(n)])
        for t, n in zip(tables, lens)
    ]
    new_k = torch.stack([k_cache[:, s[-1]] for s in slots])
    new_v = torch.stack([v_cache[:, s[-1]] for s in slots])
    meta = AttentionMetadata.build(
        [1] * len(lens), [n - 1 for n in lens], tables, block_size, torch.device("cpu")
    )
    out = paged_attention(q, new_k, new_v, (k_cache, v_cache), meta)
    expected = torch.cat(
        [
            dense_reference(
                q[i : i + 1], k_cache[:, s].transpose(0, 1), v_cache[:, s].transpose(0, 1)
            )
            for i, s in enumerate(slots)
        ]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
