"""Sophon TPU platform (torch_tpu): float16, sccl; torch_tpu is imported lazily inside methods.

Selected by `--device tpu`, or by `auto` when torch_tpu imports and sees a card.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from devices.base import Platform


def _tpu() -> ModuleType:
    """`torch_tpu.tpu`, the vendor namespace mirroring the cuda one; importing torch_tpu registers "tpu"."""
    return importlib.import_module("torch_tpu").tpu


class TpuPlatform(Platform):
    name = "tpu"

    def is_available(self) -> bool:
        try:
            tpu = _tpu()
            is_available = getattr(tpu, "is_available", None)
            return bool(is_available()) if is_available else tpu.device_count() > 0
        except Exception:  # a broken vendor install means "not available"
            return False

    def torch_device(self, rank: int = 0) -> torch.device:
        _tpu()  # the "tpu" device type exists only once the vendor module is imported
        return torch.device("tpu", rank)

    def default_dtype(self) -> torch.dtype:
        return torch.float16  # SG2260-class cores are fastest in fp16

    def memory_free_bytes(self, device: torch.device) -> int:
        tpu = _tpu()
        mem_get_info = getattr(tpu, "mem_get_info", None)
        if mem_get_info is not None:
            free, _total = mem_get_info(device)
            return int(free)
        # Older torch_tpu builds: total minus what this process's allocator has reserved.
        total = tpu.get_device_properties(device).total_memory
        return int(total - tpu.memory_reserved(device))

    def synchronize(self, device: torch.device) -> None:
        _tpu().synchronize(device)

    def distributed_backend(self) -> str:
        return "sccl"  # SOPHGO Collective Communication Library, registered by torch_tpu

    def empty_cache(self) -> None:
        _tpu().empty_cache()
