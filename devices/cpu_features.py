"""What this CPU can do, read at run time: the CPU platform picks its dtype from it.

Machines differ between runs (AVX2-only, or AVX-512 with native bf16 / AMX), so nothing here is
hard-coded: the flags come from /proc/cpuinfo (Linux), and a CPU we cannot read counts as plain.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where bf16 matrix products run in hardware (AVX512-BF16 or AMX): there bf16 GEMMs
    measured 2.8-9x fp32 here; elsewhere torch emulates bf16 and it is far slower than fp32."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))


def has_int8_dot(flags: frozenset[str] | None = None) -> bool:
    """True where int8 dot products run in hardware (AVX512-VNNI, AVX-VNNI or AMX-INT8): there
    torch._int_mm (w8a8 layers, devices/cpu_quant.py) beats dequantizing the weight."""
    return bool(INT8_DOT_FLAGS & (cpu_flags() if flags is None else flags))
