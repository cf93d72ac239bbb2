"""The CPU paged decode-attention kernel: it attends exactly as the portable torch path does
(fp32 to summation order, bf16 to bf16 rounding) for any block layout, length and head grouping,
and a machine without a C compiler falls back to the torch path instead of failing."""

from __future__ import annotations

import pytest
import torch

from devices import cpu_paged_attention
from devices.cpu import CpuPlatform
from devices.cpu_paged_attention import paged_decode_attention
from models.attention import AttentionMetadata, paged_attention
from tests.devices.paged_cases import scattered_tables

TOLERANCE = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [
        (14, 2, 64, 16),
        (9, 3, 64, 4),
        (4, 4, 128, 16),
        (6, 1, 48, 8),
        (16, 1, 64, 32),  # 16 heads a KV head, two 16-key runs a block (the AVX512-BF16 path)
        (17, 1, 64, 16),  # more heads a KV head than that path takes
    ],
)
def test_kernel_matches_the_torch_path(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    assert cpu_paged_attention.available(), "this machine has a C compiler: the kernel must build"
    torch.manual_seed(heads * head_dim)
    # keys per sequence, the new one included: partial and whole 16-key runs, a long history
    lens = [1, 5, 15, block_size, block_size + 1, 97, 300]
    tables, num_blocks = scattered_tables(lens, block_size)
    shape = (kv_heads, num_blocks * block_size, head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    q = torch.randn(len(lens), heads, head_dim, dtype=dtype)
    k = torch.randn(len(lens), kv_heads, head_dim, dtype=dtype)
    v = torch.randn(len(lens), kv_heads, head_dim, dtype=dtype)
    starts = [n - 1 for n in lens]
    outs = []
    for kernel in (None, paged_decode_attention):
        meta = AttentionMetadata.build(
            [1] * len(lens), starts, tables, block_size, torch.device("cpu"), kernel
        )
        caches = (k_cache.clone(), v_cache.clone())
        outs.append(paged_attention(q, k, v, caches, meta).float())
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(outs[1], outs[0], atol=atol, rtol=rtol)


def test_without_a_compiler_the_platform_offers_no_kernel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("TESSERA_KERNEL_CACHE", str(tmp_path))
    cpu_paged_attention._library.cache_clear()
    try:
        assert not cpu_paged_attention.available()
        assert CpuPlatform().decode_attention() is None
    finally:
        monkeypatch.undo()
        cpu_paged_attention._library.cache_clear()
    assert CpuPlatform().decode_attention() is paged_decode_attention
