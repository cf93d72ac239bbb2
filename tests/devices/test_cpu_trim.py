"""CpuPlatform.trim_host_memory gives freed heap back to the OS, even under the launcher's
malloc settings that otherwise keep it (core/launch MALLOC_ENV)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core.launch import MALLOC_ENV

SCRIPT = """
import torch
from devices.cpu import CpuPlatform

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

base = rss_mb()
chunks = [torch.ones(256 * 1024) for _ in range(400)]  # 400 MB in 1 MiB pieces (heap, not mmap)
del chunks[1::2]  # every other one freed: holes the heap keeps, no free top to trim
held = rss_mb()
CpuPlatform().trim_host_memory()
print(base, held, rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim: Linux only")
def test_trim_returns_freed_heap_pages() -> None:
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    base, held, trimmed = (float(x) for x in out.stdout.split())
    assert held - base > 350  # the freed half is still resident
    assert trimmed < held - 150  # and trimming gave it back
