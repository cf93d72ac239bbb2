"""CPU platform: float32, gloo, free memory from /proc/meminfo bounded by the cgroup limit.

Used when `--device cpu` is asked for or `auto` finds no accelerator.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from devices.base import Platform

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

    def is_available(self) -> bool:
        return True

    def torch_device(self, rank: int = 0) -> torch.device:
        return torch.device("cpu")  # every rank shares host memory; no device index

    def default_dtype(self) -> torch.dtype:
        return torch.float32  # bf16 matmuls are emulated (slow) on CPUs without AMX/avx512_bf16

    def memory_free_bytes(self, device: torch.device) -> int:
        free = _meminfo_available()
        if free is None:
            free = _sysconf_available() or 0
        headroom = _cgroup_headroom()
        return min(free, headroom) if headroom is not None else free

    def distributed_backend(self) -> str:
        return "gloo"

    def set_threads(self, n: int) -> None:
        if n > 0:
            torch.set_num_threads(n)
