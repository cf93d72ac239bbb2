"""Device backends: `get_platform` maps the `--device` flag to one Platform (cpu/cuda/npu/tpu, or a
third-party backend registered under the `tessera.platforms` entry-point group).

Actors and models reach device-specific torch calls only through the Platform they are handed.
A plug-in package declares, in its own pyproject.toml,

    [project.entry-points."tessera.platforms"]
    mydev = "mypackage.platform:MyPlatform"

where MyPlatform subclasses devices.base.Platform; `--device mydev` then selects it, and `auto`
tries it after the built-in accelerators.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from devices.base import Platform
from devices.cpu import CpuPlatform
from devices.cuda import CudaPlatform
from devices.npu import NpuPlatform
from devices.tpu import TpuPlatform

__all__ = ["ENTRY_POINT_GROUP", "Platform", "get_platform", "platform_names"]

ENTRY_POINT_GROUP = "tessera.platforms"
_BUILT_IN: dict[str, type[Platform]] = {
    "cpu": CpuPlatform,
    "cuda": CudaPlatform,
    "npu": NpuPlatform,
    "tpu": TpuPlatform,
}
_AUTO_ORDER = ("cuda", "npu", "tpu")  # first available wins; plug-ins next; cpu is the fallback


@functools.cache
def _plugins() -> dict[str, type[Platform]]:
    """Backends other packages register; one that fails to load is skipped with its reason."""
    found: dict[str, type[Platform]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _BUILT_IN:
            continue  # a plug-in cannot replace a built-in backend
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not stop the engine
            _broken[ep.name] = f"{type(exc).__name__}: {exc}"
            continue
        if not (isinstance(cls, type) and issubclass(cls, Platform)):
            _broken[ep.name] = f"{ep.value} is not a devices.base.Platform subclass"
            continue
        found[ep.name] = cls
    return found


_broken: dict[str, str] = {}  # plug-in name -> why it could not be loaded


def platform_names() -> tuple[str, ...]:
    """Every valid `--device` value: auto, the built-in backends, then installed plug-ins."""
    return ("auto", *_BUILT_IN, *sorted(_plugins()))


def get_platform(name: str = "auto") -> Platform:
    """The platform for `name`; "auto" picks the first accelerator found.

    An explicitly named backend is returned even when unavailable; the caller decides whether
    that is an error (so `--device cuda` fails loudly at first use rather than silently on CPU).
    """
    key = name.strip().lower()
    backends = {**_BUILT_IN, **_plugins()}
    if key == "auto":
        candidates = [*_AUTO_ORDER, *sorted(_plugins())]
        for candidate in candidates:
            platform = backends[candidate]()
            if platform.is_available():
                return platform
        return CpuPlatform()
    if key not in backends:
        if key in _broken:
            raise ValueError(f"device plug-in {key!r} could not be loaded: {_broken[key]}")
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(platform_names())}")
    return backends[key]()
