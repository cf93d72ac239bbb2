"""The CPU platform's C kernels build here, and loading them leaves the process's floating-point
state alone: a library linked with -ffast-math would flush subnormals to zero in every
computation of the process that loads it (torch's included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECK = """
from devices import cpu_fused_ops, cpu_paged_attention
assert 5e-324 * 1.0 != 0.0, "subnormals flushed before loading anything"
assert cpu_paged_attention.available() and cpu_fused_ops.available()
assert 5e-324 * 1.0 != 0.0, "a kernel library flushes subnormals to zero"
"""


def test_kernels_keep_subnormals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_KERNEL_CACHE", str(tmp_path))  # built fresh for this test
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(tmp_path.glob("*.so"))) == 2
