"""Ascend NPU platform (torch_npu): bfloat16, hccl; torch_npu is imported lazily inside methods.

Selected by `--device npu`, or by `auto` when torch_npu imports and sees a card.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from devices.base import Platform


def _npu() -> ModuleType:
    """`torch_npu.npu`, the vendor namespace mirroring the cuda one; importing torch_npu registers "npu"."""
    return importlib.import_module("torch_npu").npu


class NpuPlatform(Platform):
    name = "npu"

    def is_available(self) -> bool:
        try:
            return bool(_npu().is_available())
        except Exception:  # a broken vendor install means "not available"
            return False

    def torch_device(self, rank: int = 0) -> torch.device:
        _npu()  # the "npu" device type exists only once the vendor module is imported
        return torch.device("npu", rank)

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_free_bytes(self, device: torch.device) -> int:
        free, _total = _npu().mem_get_info(device)
        return int(free)

    def synchronize(self, device: torch.device) -> None:
        _npu().synchronize(device)

    def distributed_backend(self) -> str:
        return "hccl"

    def empty_cache(self) -> None:
        _npu().empty_cache()
