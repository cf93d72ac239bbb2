"""CUDA decode attention over the paged KV cache, read in place: two Triton kernels.

Offered by CudaPlatform.decode_attention() when Triton imports (models/attention.py calls it for
every step's one-token sequences). Flash-decoding: each (sequence, KV head) pair's keys are cut
into `splits` equal ranges that run as separate programs (so one long sequence still fills the
GPU), each leaving a partial output and its log-sum-exp; a second kernel merges the ranges.
All shapes are fixed by the caller's tensors, and a program's loop bounds are read from `lens`
on the device, so one launch can be captured in a CUDA graph and replayed for any lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    part_ptr,
    lse_ptr,
    scale,
    stride_qb,
    stride_qh,
    stride_ch,
    stride_cs,
    stride_tb,
    num_heads,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(lens_ptr + b)
    chunk = tl.cdiv(tl.cdiv(n, SPLITS), TILE) * TILE
    lo = s * chunk
    hi = tl.minimum(lo + chunk, n)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    base = kvh * stride_ch
    for start in range(lo, hi, TILE):
        t = start + tl.arange(0, TILE)
        tmask = t < hi
        block = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=tmask, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE
        kv_mask = tmask[:, None] & dmask[None, :]
        offsets = base + slot[:, None] * stride_cs + d[None, :]
        k = tl.load(k_ptr + offsets, mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(tmask[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offsets, mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    row = (b * num_heads + heads) * SPLITS + s
    has = total > 0
    out = tl.where(has[:, None], acc / tl.where(has, total, 1.0)[:, None], 0.0)
    tl.store(
        part_ptr + row[:, None] * DIM_PAD + d[None, :], out, mask=gmask[:, None] & dmask[None, :]
    )
    lse = tl.where(has, m + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row, lse, mask=gmask)


@triton.jit
def _merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, DIM_PAD)
    row = (b * num_heads + h) * SPLITS + sp
    lse = tl.load(lse_ptr + row)
    weights = tl.exp(lse - tl.max(lse, 0))
    parts = tl.load(part_ptr + row[:, None] * DIM_PAD + d[None, :])
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    dest = out_ptr + b * stride_ob + h * stride_oh + d
    tl.store(dest, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def splits_for(batch: int, num_kv_heads: int) -> int:
    """Key ranges per (sequence, KV head): enough programs to cover the SMs at small batches."""
    return max(1, min(16, _next_pow2(max(1, 256 // max(1, batch * num_kv_heads)))))


# A registered op, so torch.compile keeps a compiled decode step in one graph around it.
@torch.library.custom_op("tessera::cuda_paged_decode_attention", mutates_args=())
def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D]; caches [kvH, slots, D]; tables [B, nb] (int32 or int64); lens [B] -> [B, H, D].

    Every sequence must have lens >= 1 (a padded row of a captured batch attends to one key)."""
    batch, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[0]
    group = num_heads // num_kv
    splits = splits_for(batch, num_kv)
    dim_pad = max(16, _next_pow2(head_dim))
    tile = 64 if dim_pad <= 128 else 32
    q = q.contiguous()
    part = torch.empty(batch * num_heads * splits, dim_pad, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch * num_heads * splits, dtype=torch.float32, device=q.device)
    _split_kernel[(batch, num_kv, splits)](
        q,
        k_cache,
        v_cache,
        tables,
        lens,
        part,
        lse,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        tables.stride(0),
        num_heads,
        GROUP=group,
        GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        TILE=tile,
        SPLITS=splits,
        IEEE=q.dtype == torch.float32,
    )
    out = torch.empty_like(q)
    _merge_kernel[(batch, num_heads)](
        part,
        lse,
        out,
        out.stride(0),
        out.stride(1),
        num_heads,
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        SPLITS=splits,
    )
    return out


@paged_decode_attention.register_fake
def _(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
