"""CUDA platform: bfloat16, nccl, free memory from the driver; the only file that says torch.cuda.

Selected by `--device cuda`, or by `auto` when a GPU is visible.
"""

from __future__ import annotations

import torch

from devices.base import Platform


class CudaPlatform(Platform):
    name = "cuda"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_free_bytes(self, device: torch.device) -> int:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def distributed_backend(self) -> str:
        return "nccl"

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()
