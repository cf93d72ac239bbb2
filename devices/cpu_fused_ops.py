"""The CPU platform's fused decoder-layer steps: RMSNorm (after the residual add) and, for
decode-only steps, rotary on q/k with the new keys and values written into the paged cache, each
one C call (cpu_fused_ops.c) instead of eight to fifteen torch operations.
devices/cpu_fused_layers.py puts them into the model; the executor calls them in every layer.

On a 2-core CPU each torch operation costs a few microseconds however small its tensors, and a
decode step of SmolLM2-135M ran ~60 of them per layer besides its matrix products.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import torch

from devices.cpu_kernel_build import load_kernel_library

SOURCE = Path(__file__).with_name("cpu_fused_ops.c")
# No -ffast-math and no FMA contraction: results equal torch's eager ones (cpu_fused_ops.c).
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_P, _I64, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load_kernel_library(SOURCE, FLAGS, "norms and rotary run as torch operations")
    if lib is None:
        return None
    lib.tessera_rms_norm.restype = _I
    lib.tessera_rms_norm.argtypes = [_P] * 5 + [_I64] * 2 + [_F, _I, _I]
    lib.tessera_rope_store.restype = _I
    lib.tessera_rope_store.argtypes = [_P] * 8 + [_I64] * 5 + [_I, _I]
    return lib


def available() -> bool:
    """Whether the kernels are built and loadable on this machine (builds them on first call)."""
    return _library() is not None


def _lib() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU fused-ops kernels are not available on this machine")
    return lib


def supported(x: torch.Tensor) -> bool:
    """Whether `x` is a tensor these kernels take: a contiguous fp32 or bf16 CPU tensor."""
    return x.dtype in DTYPES and x.device.type == "cpu" and x.is_contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm of it) for x [..., hidden]; without delta, (x, RMSNorm of x).
    models/layers.py RMSNorm's arithmetic: fp32 normalisation, cast back, then the weight."""
    hidden = x.shape[-1]
    total = x if delta is None else torch.empty_like(x)
    out = torch.empty_like(x)
    _lib().tessera_rms_norm(
        x.data_ptr(),
        None if delta is None else delta.data_ptr(),
        weight.data_ptr(),
        total.data_ptr(),
        out.data_ptr(),
        x.numel() // hidden,
        hidden,
        eps,
        DTYPES[x.dtype],
        torch.get_num_threads(),
    )
    return total, out


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    kv_heads: int,
    want_k: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv [T, (heads + 2 kv_heads) * D] as qkv_proj gives it -> (q rotated [T, heads, D], k
    rotated [T, kv_heads, D] if `want_k` else None); k is rotated and v copied into k_cache /
    v_cache [kv_heads, cache_slots, D] at slots [T]. cos/sin [T, D] in qkv's dtype; the caches
    must be contiguous (they are allocated so)."""
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    slots = slots.to(torch.int64).contiguous()
    tokens, dim = qkv.shape[0], k_cache.shape[-1]
    q = torch.empty(tokens, heads, dim, dtype=qkv.dtype)
    k = torch.empty(tokens, kv_heads, dim, dtype=qkv.dtype) if want_k else None
    status = _lib().tessera_rope_store(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        q.data_ptr(),
        None if k is None else k.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        tokens,
        heads,
        kv_heads,
        dim,
        k_cache.shape[1],
        DTYPES[qkv.dtype],
        torch.get_num_threads(),
    )
    if status != 0:
        raise IndexError(f"a cache slot lies outside the cache's {k_cache.shape[1]} slots")
    return q, k
