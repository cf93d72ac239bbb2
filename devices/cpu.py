"""CPU platform: bf16 where the CPU has it natively (else float32), gloo, free memory from /proc/meminfo bounded by the cgroup limit, and
fp32 linear weights prepacked for oneDNN. Used when `--device cpu` is asked for or `auto` finds no
accelerator.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import cast

import torch
from torch import nn

from devices.base import F, Platform
from devices.cpu_features import has_native_bf16
from devices.cpu_fused_layers import fuse_layer_ops
from devices.cpu_linear import pack_linears
from devices.cpu_paged_attention import available as paged_attention_built
from devices.cpu_paged_attention import paged_decode_attention
from devices.cpu_prefill_attention import available as prefill_attention_built
from devices.cpu_prefill_attention import prefill_attention
from models.attention import Attention, DecodeKernel
from models.qwen2_5_vl import VisionTransformer


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (AttributeError, OSError):
        return None


_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's cgroup (v2, then v1); None when unlimited or unknown."""
    candidates = [
        (_CGROUP_ROOT / "memory.max", _CGROUP_ROOT / "memory.current"),
        (
            _CGROUP_ROOT / "memory" / "memory.limit_in_bytes",
            _CGROUP_ROOT / "memory" / "memory.usage_in_bytes",
        ),
    ]
    for limit_path, usage_path in candidates:
        try:
            limit_text = limit_path.read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(usage_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1 spells "unlimited" as a huge number
            return None
        return max(limit - usage, 0)
    return None


class CpuPlatform(Platform):
    name = "cpu"
    memory_is_host_ram = True
    adapts_threads = True

    def is_available(self) -> bool:
        return True

    def torch_device(self, rank: int = 0) -> torch.device:
        return torch.device("cpu")  # every rank shares host memory; no device index

    def default_dtype(self) -> torch.dtype:
        """bf16 where the CPU computes it natively (AVX512-BF16 or AMX), else fp32: elsewhere
        bf16 matrix products are emulated and far slower than fp32."""
        return torch.bfloat16 if has_native_bf16() else torch.float32

    def zeros(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Zeros in an anonymous memory map: the kernel hands out zero pages on first touch, so
        the KV pool costs RAM only as far as requests have written into it (an idle engine
        serving a 135M model no longer holds gigabytes of zeros)."""
        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(region, dtype=dtype, count=count).view(shape)

    def memory_free_bytes(self, device: torch.device) -> int:
        free = _meminfo_available()
        if free is None:
            free = _sysconf_available() or 0
        headroom = _cgroup_headroom()
        return min(free, headroom) if headroom is not None else free

    def prepare_model(self, model: nn.Module) -> None:
        self._choose_prefill_attention(model)
        pack_linears(model)  # prepacked oneDNN weights, fused MLP: devices/cpu_linear.py
        fuse_layer_ops(model)  # norms, rotary and cache writes in C: devices/cpu_fused_layers.py

    def _choose_prefill_attention(self, model: nn.Module) -> None:
        """The AMX kernel of devices/cpu_prefill_attention.c for bf16 prompts, prefill chunks
        and vision windows: against SDPA (2 threads) a 654-token causal prompt, 14/2 heads, was
        ~1.7x faster a layer, a 2,116-patch full vision block ~1.1x, a block of 64-patch windows
        ~3x (BENCHMARKS.md). Without AMX or in fp32 SDPA stays: nothing else was measured faster
        there."""
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not embeddings or embeddings[0].weight.dtype != torch.bfloat16:
            return
        if os.environ.get("TESSERA_PREFILL_KERNEL", "1") == "0" or not prefill_attention_built():
            return
        for module in model.modules():
            if isinstance(module, Attention):
                module.prefill_kernel = prefill_attention
            elif isinstance(module, VisionTransformer):
                module.attention = prefill_attention

    def compile(self, fn: F) -> F:
        """torch.compile (C++ kernels, one trace for every input size). Used for the vision
        tower's elementwise steps: a 640x640 image encoded ~25% faster (BENCHMARKS.md). Whole
        decode steps are not compiled on CPU: measured no faster there."""
        if os.environ.get("TESSERA_COMPILE", "1") == "0":
            return fn
        return cast(F, torch.compile(fn, dynamic=True))

    def decode_attention(self) -> DecodeKernel | None:
        """The C kernel of devices/cpu_paged_attention.c where this machine can build it: 1.5x
        the torch path's speed at 32 sequences x 700 tokens in bf16, 3x in fp32 (BENCHMARKS.md)."""
        return paged_decode_attention if paged_attention_built() else None

    def distributed_backend(self) -> str:
        return "gloo"

    def set_threads(self, n: int) -> None:
        if n > 0:
            torch.set_num_threads(n)

    def trim_host_memory(self) -> None:
        """glibc's malloc_trim: the stages keep freed heap (MALLOC_TRIM_THRESHOLD_, core/launch)
        so a step's activations do not page-fault again, but activations of ever-changing
        sizes fragment that heap and the executor's RSS crept up ~15% over a 10-minute soak.
        Trimming every half minute costs one step's page faults and keeps RSS at what is live."""
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
