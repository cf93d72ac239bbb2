"""Builds the CPU platform's C kernels (devices/*.c) once per machine with the system C
compiler and loads them through ctypes. Used by devices/cpu_paged_attention.py and
devices/cpu_fused_ops.py when the executor first asks for their kernels.

Kernels are built with -march=native, so each shared object is cached under a key that includes
the CPU's flags (machines differ between runs). Where no compiler is found or the build fails,
None is returned, one warning is logged, and the caller keeps its portable torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import structlog

from devices.cpu_features import cpu_flags

log = structlog.get_logger()


def cache_dir() -> Path:
    """TESSERA_KERNEL_CACHE, else ~/.cache/tessera/kernels."""
    env = os.environ.get("TESSERA_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tessera" / "kernels"


RECIPE = b"compile, then link without the compile flags"  # part of the cache key


def _build(compiler: str, source: Path, flags: list[str]) -> Path:
    parts = [RECIPE, source.read_bytes(), " ".join(flags).encode()]
    digest = hashlib.sha256(b"\0".join([*parts, " ".join(sorted(cpu_flags())).encode()]))
    key = digest.hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, built = Path(tmp) / "kernel.o", Path(tmp) / target.name
        # Compiled and linked apart: linking with -ffast-math would add crtfastmath.o, which
        # flushes subnormals to zero in the whole process that loads the library.
        link = ["-shared", *(f for f in flags if f == "-fopenmp")]
        for command in (
            [compiler, *flags, "-fPIC", "-c", str(source), "-o", str(obj)],
            [compiler, *link, str(obj), "-o", str(built), "-lm"],
        ):
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.replace(built, target)  # atomic: processes building at once all see a whole file
    return target


def load_kernel_library(source: Path, flags: list[str], fallback: str) -> ctypes.CDLL | None:
    """`source` compiled with `flags` into a shared library and loaded; None, with a warning naming
    `fallback` (what runs instead), where that cannot be done here."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning(f"no C compiler found: {fallback}")
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, source, flags)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning(
            f"{source.name} not built: {fallback}",
            error=str(exc),
            detail=detail.decode(errors="replace")[-500:],
        )
        return None
