"""Third-party device backends: a package that declares an entry point in the `tessera.platforms`
group is selectable by `--device NAME` and tried by `auto`; a broken one is reported, not fatal.

The plug-ins here are real installed distributions (a module plus its .dist-info metadata on
sys.path), found by importlib.metadata exactly as a pip-installed package would be."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import devices
from core.cli import parse_args
from devices import get_platform, platform_names
from devices.cpu import CpuPlatform

PLUGIN_MODULE = """
from devices.cpu import CpuPlatform


class DemoPlatform(CpuPlatform):
    name = "demo"

    def is_available(self):
        return False


class NotAPlatform:
    pass
"""


def install(site: Path, dist: str, entries: dict[str, str]) -> None:
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[tessera.platforms]\n{lines}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "demo_backend.py").write_text(PLUGIN_MODULE)
    install(
        tmp_path,
        "demo_backend",
        {
            "demo": "demo_backend:DemoPlatform",
            "wrong": "demo_backend:NotAPlatform",
            "missing": "no_such_module:Platform",
            "cpu": "demo_backend:DemoPlatform",  # may not replace a built-in
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    devices._plugins.cache_clear()
    devices._broken.clear()
    yield tmp_path
    devices._plugins.cache_clear()
    devices._broken.clear()
    sys.modules.pop("demo_backend", None)


def test_an_installed_plugin_is_a_device(site: Path) -> None:
    platform = get_platform("demo")
    assert type(platform).__name__ == "DemoPlatform" and platform.name == "demo"
    assert "demo" in platform_names()
    assert parse_args(["--device", "demo"]).device == "demo"
    assert isinstance(get_platform("cpu"), CpuPlatform)
    assert type(get_platform("cpu")) is CpuPlatform  # the built-in wins over a same-named plug-in


def test_auto_tries_plugins_and_falls_back_to_cpu(site: Path) -> None:
    if any(get_platform(n).is_available() for n in ("cuda", "npu", "tpu")):
        pytest.skip("an accelerator is present, so auto does not reach the plug-ins here")
    assert type(get_platform("auto")) is CpuPlatform  # the demo plug-in says it is unavailable


def test_broken_plugins_are_reported_by_name(site: Path) -> None:
    with pytest.raises(ValueError, match="'missing' could not be loaded: ModuleNotFoundError"):
        get_platform("missing")
    with pytest.raises(ValueError, match="not a devices.base.Platform subclass"):
        get_platform("wrong")
    with pytest.raises(SystemExit):
        parse_args(["--device", "nonesuch"])
