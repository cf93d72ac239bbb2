"""CUDA platform: bfloat16, nccl, free memory from the driver, CUDA graphs and the Triton decode
attention (devices/cuda_paged_attention.py); the only file that says torch.cuda.

Selected by `--device cuda`, or by `auto` when a GPU is visible.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, cast

import torch

from devices.base import F, Platform
from models.attention import DecodeKernel

WARMUP_RUNS = 2  # eager runs on a side stream before capture (lazy init, autotuning, allocator)


class CudaPlatform(Platform):
    name = "cuda"
    records_graphs = True
    vision_batch_patches = 32768  # a GPU is busier with many images per pass (16 at 640x640)

    def __init__(self) -> None:
        self._graph_pool: Any = None  # one memory pool shared by every captured graph

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def default_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def memory_free_bytes(self, device: torch.device) -> int:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)

    def decode_attention(self) -> DecodeKernel | None:
        try:
            from devices.cuda_paged_attention import paged_decode_attention
        except ImportError:  # no Triton: the model's gather path
            return None
        return paged_decode_attention

    def compile(self, fn: F) -> F:
        if os.environ.get("TESSERA_COMPILE", "1") == "0":
            return fn
        # One trace for every input size (dynamic); the graphs then record its kernels per size.
        return cast(F, torch.compile(fn, dynamic=True))

    def capture_graph(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def distributed_backend(self) -> str:
        return "nccl"

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()
