"""The CPU platform's prefill attention on CPUs with AMX: a C kernel (cpu_prefill_attention.c)
that attends many query rows to many keys with AMX tile products, bf16 only. Built once per
machine (devices/cpu_kernel_build.py); CpuPlatform hands it to the decoder's prompts and prefill
chunks and to the vision tower's windows. Elsewhere (no AMX, fp32, no compiler) SDPA stays.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from devices.cpu_features import cpu_flags
from devices.cpu_kernel_build import load_kernel_library

SOURCE = Path(__file__).with_name("cpu_prefill_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp"]
AMX_FLAGS = frozenset({"amx_tile", "amx_bf16", "avx512_bf16", "avx512bw"})


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if not AMX_FLAGS <= cpu_flags():
        return None
    lib = load_kernel_library(SOURCE, FLAGS, "prefill attention uses SDPA")
    if lib is None or lib.tessera_prefill_supported() != 1:
        return None
    fn = lib.tessera_prefill_attention
    fn.restype = ctypes.c_int
    fn.argtypes = (
        [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 12 + [ctypes.c_int, ctypes.c_float, ctypes.c_int]
    )
    return lib


def available() -> bool:
    """Whether this CPU has AMX, the OS lets the process use it and the kernel is built."""
    return _library() is not None


def _rows_and_heads(t: torch.Tensor, name: str) -> tuple[int, int]:
    if t.dim() != 3 or t.stride(2) != 1:
        raise ValueError(f"{name} must be [rows, heads, head_dim] with a contiguous last dimension")
    return t.stride(0), t.stride(1)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: list[int],
    k_lens: list[int],
    causal: bool,
    key_index: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [Tq, H, D], k/v [rows, kvH, D] (bf16, any strides but the last) -> out [Tq, H, D]
    (a new tensor, or `out`, any strides but the last).

    Segment s takes the next q_lens[s] query rows and the next k_lens[s] keys: rows of k/v, or
    the rows key_index [sum(k_lens)] names (keys of a paged cache viewed as [slots, kvH, D]).
    Causal: query i of a segment sees keys j <= i + k_len - q_len. Scale 1 / sqrt(D)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU prefill attention kernel is not available on this machine")
    if not (q.dtype == k.dtype == v.dtype == torch.bfloat16):
        raise TypeError(f"prefill attention kernel takes bf16, not {q.dtype}")
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    if heads % kv_heads or sum(q_lens) != q.shape[0] or len(q_lens) != len(k_lens):
        raise ValueError("heads, query rows or segments do not match")
    if causal and any(kn < qn for qn, kn in zip(q_lens, k_lens)):
        raise ValueError("a causal segment needs at least as many keys as queries")
    strides = [*_rows_and_heads(q, "q"), *_rows_and_heads(k, "k"), *_rows_and_heads(v, "v")]
    index = None if key_index is None else key_index.to(torch.int64).contiguous()
    qn = torch.tensor(q_lens, dtype=torch.int64)
    kn = torch.tensor(k_lens, dtype=torch.int64)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    elif out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError("out must be shaped and typed as q")
    strides += [*_rows_and_heads(out, "out")]
    status = lib.tessera_prefill_attention(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        None if index is None else index.data_ptr(),
        qn.data_ptr(),
        kn.data_ptr(),
        len(q_lens),
        heads,
        kv_heads,
        head_dim,
        *strides,
        int(causal),
        head_dim**-0.5,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("prefill attention kernel could not allocate its work buffers")
    return out
