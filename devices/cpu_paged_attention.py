"""The CPU platform's decode attention: a small C kernel (cpu_paged_attention.c) that reads each
sequence's keys and values in place in the paged cache, built once per machine
(devices/cpu_kernel_build.py) and called through ctypes. The model runner hands it to every
step's AttentionMetadata. Where it cannot be built, attention keeps its portable torch path.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from devices.cpu_kernel_build import load_kernel_library

SOURCE = Path(__file__).with_name("cpu_paged_attention.c")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load_kernel_library(SOURCE, FLAGS, "decode attention uses the torch path")
    if lib is None:
        return None
    fn = lib.tessera_paged_decode
    fn.restype = ctypes.c_int
    fn.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_float] + [ctypes.c_int] * 2
    )
    return lib


def available() -> bool:
    """Whether the kernel is built and loadable on this machine (builds it on first call)."""
    return _library() is not None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [S, H, D] -> [S, H, D]: sequence s attends to the first lens[s] keys that its block
    table tables[s] names in k_cache / v_cache [kvH, slots, D]. fp32 or bf16, CPU tensors."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU paged attention kernel is not available on this machine")
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"paged attention kernel takes fp32 or bf16, not {q.dtype}")
    q = q.contiguous()
    tables = tables.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    seqs, heads, head_dim = q.shape
    kv_heads, slots, _ = k_cache.shape
    out = torch.empty_like(q)
    status = lib.tessera_paged_decode(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        seqs,
        heads,
        kv_heads,
        head_dim,
        slots,
        tables.shape[1],
        block_size,
        scale,
        DTYPES[q.dtype],
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged attention kernel could not allocate its work buffers")
    return out
