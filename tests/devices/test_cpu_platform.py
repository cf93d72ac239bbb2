"""Tests for the device platform layer: name resolution, the CPU backend, and hardware backends.

Runs on CPU; checks that need a GPU, NPU or TPU skip, naming the missing hardware.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import devices
from devices import get_platform
from devices.base import Platform
from devices.cpu import CpuPlatform
from devices.cpu_features import has_native_bf16
from devices.cuda import CudaPlatform
from devices.npu import NpuPlatform
from devices.tpu import TpuPlatform

ACCELERATORS = {"cuda": CudaPlatform(), "npu": NpuPlatform(), "tpu": TpuPlatform()}
HARDWARE = {
    "cuda": "an NVIDIA GPU",
    "npu": "an Ascend NPU with torch_npu",
    "tpu": "a Sophon TPU with torch_tpu",
}
REPO = pathlib.Path(__file__).resolve().parents[2]


def test_auto_resolves_to_cpu_without_accelerators() -> None:
    if any(p.is_available() for p in ACCELERATORS.values()):
        pytest.skip("an accelerator is present, so auto does not resolve to cpu here")
    platform = get_platform("auto")
    assert isinstance(platform, CpuPlatform)
    assert platform.name == "cpu"


def test_cpu_platform_basics() -> None:
    platform = get_platform("cpu")
    assert platform.is_available()
    native = has_native_bf16()
    assert platform.default_dtype() == (torch.bfloat16 if native else torch.float32)
    assert platform.torch_device() == torch.device("cpu")
    assert platform.torch_device(3) == torch.device("cpu")
    assert platform.distributed_backend() == "gloo"
    platform.synchronize(platform.torch_device())
    platform.empty_cache()


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert has_native_bf16(frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert has_native_bf16(frozenset({"avx512f", "amx_bf16", "amx_tile"}))
    assert not has_native_bf16(frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
    assert not has_native_bf16(frozenset())


def test_cpu_memory_free_bytes_is_positive() -> None:
    free = get_platform("cpu").memory_free_bytes(torch.device("cpu"))
    assert isinstance(free, int)
    assert free > 0


def test_cpu_set_threads() -> None:
    platform = get_platform("cpu")
    before = torch.get_num_threads()
    try:
        platform.set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_unknown_name_raises_with_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, cpu, cuda, npu, tpu"):
        get_platform("rocm")


def test_names_are_case_insensitive_and_every_backend_is_a_platform() -> None:
    for name in ("cpu", "cuda", "npu", "tpu"):
        platform = get_platform(name.upper())
        assert isinstance(platform, Platform)
        assert platform.name == name


@pytest.mark.parametrize(
    ("name", "dtype", "backend"),
    [
        ("cuda", torch.bfloat16, "nccl"),
        ("npu", torch.bfloat16, "hccl"),
        ("tpu", torch.float16, "sccl"),
    ],
)
def test_accelerator_constants_need_no_hardware(
    name: str, dtype: torch.dtype, backend: str
) -> None:
    platform = get_platform(name)
    assert platform.default_dtype() == dtype
    assert platform.distributed_backend() == backend
    if name == "cuda":  # "npu"/"tpu" device types exist only once the vendor module is loaded
        assert platform.torch_device(1) == torch.device("cuda", 1)


def test_vendor_modules_are_imported_lazily() -> None:
    if importlib.util.find_spec("torch_npu") is None:
        assert NpuPlatform().is_available() is False  # answers, does not raise
    if importlib.util.find_spec("torch_tpu") is None:
        assert TpuPlatform().is_available() is False
    source = "".join(p.read_text() for p in pathlib.Path(devices.__file__).parent.glob("*.py"))
    assert "import torch_npu" not in source and "import torch_tpu" not in source


def test_torch_cuda_appears_only_in_devices_cuda() -> None:
    offenders = []
    for path in REPO.glob("*/**/*.py"):
        relative = path.relative_to(REPO)
        if (
            relative.parts[0].startswith(".")
            or relative.parts[0] == "tests"
            or relative == pathlib.Path("devices/cuda.py")
        ):
            continue
        if "torch.cuda" in path.read_text(encoding="utf-8", errors="replace"):
            offenders.append(str(relative))
    assert offenders == []


@pytest.mark.parametrize("name", ["cuda", "npu", "tpu"])
def test_accelerator_memory_and_sync(name: str) -> None:
    platform = ACCELERATORS[name]
    if not platform.is_available():
        pytest.skip(f"needs {HARDWARE[name]}; none is available here")
    device = platform.torch_device(0)
    x = torch.ones(1024, device=device)
    platform.synchronize(device)
    assert platform.memory_free_bytes(device) > 0
    assert float(x.sum().cpu()) == 1024.0
    platform.empty_cache()


def _rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_cpu_zeros_commit_memory_only_where_written() -> None:
    platform = get_platform("cpu")
    before = _rss_bytes()
    pool = platform.zeros((4, 1 << 26), torch.bfloat16, torch.device("cpu"))  # 512 MiB
    assert _rss_bytes() - before < (64 << 20)  # reserved, not resident
    assert pool.shape == (4, 1 << 26) and pool.dtype == torch.bfloat16
    assert not pool[:, :4096].any() and not pool[3, -4096:].any()
    pool[1, 7] = 3.0
    assert pool.sum().item() == 3.0
