"""Device backends: `get_platform` maps the `--device` flag to one Platform (cpu/cuda/npu/tpu).

Actors and models reach device-specific torch calls only through the Platform they are handed.
"""

from __future__ import annotations

from devices.base import Platform
from devices.cpu import CpuPlatform
from devices.cuda import CudaPlatform
from devices.npu import NpuPlatform
from devices.tpu import TpuPlatform

__all__ = ["PLATFORM_NAMES", "Platform", "get_platform"]

_PLATFORMS: dict[str, type[Platform]] = {
    "cpu": CpuPlatform,
    "cuda": CudaPlatform,
    "npu": NpuPlatform,
    "tpu": TpuPlatform,
}
_AUTO_ORDER = ("cuda", "npu", "tpu")  # first available wins; cpu is the fallback
PLATFORM_NAMES = ("auto", *_PLATFORMS)


def get_platform(name: str = "auto") -> Platform:
    """The platform for `name` (auto|cpu|cuda|npu|tpu); "auto" picks the first accelerator found.

    An explicitly named backend is returned even when unavailable; the caller decides whether
    that is an error (so `--device cuda` fails loudly at first use rather than silently on CPU).
    """
    key = name.strip().lower()
    if key == "auto":
        for candidate in _AUTO_ORDER:
            platform = _PLATFORMS[candidate]()
            if platform.is_available():
                return platform
        return CpuPlatform()
    if key not in _PLATFORMS:
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(PLATFORM_NAMES)}")
    return _PLATFORMS[key]()
