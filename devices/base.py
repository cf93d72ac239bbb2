"""Platform interface: what the engine needs from a device backend (cpu, cuda, npu, tpu).

The executor's model runner asks its Platform for the torch device, dtype, free memory, the
distributed backend, and to prepare a loaded model's weights for the device's kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from models.attention import DecodeKernel

F = TypeVar("F", bound=Callable[..., Any])


class Platform(ABC):
    """One accelerator family. Subclasses live one per file; only they touch vendor modules."""

    name: str = ""
    # True where device memory is the host's RAM: the KV pool is then sized to what the running
    # batch can use, not to everything that is free (see actors/execution/kv_pool.py).
    memory_is_host_ram: bool = False
    adapts_threads: bool = False  # its compute threads share cores with other processes
    records_graphs: bool = False  # capture_graph works (CUDA graphs)
    # Images encoded in one vision pass while their patches fit in this. On 2 CPU cores batching
    # four 224x224 images saved ~14%, while four 640x640 ones ran 1.5x slower than one by one.
    vision_batch_patches: int = 1024

    @abstractmethod
    def is_available(self) -> bool:
        """True when this backend can run here (vendor module importable and a device present)."""

    def torch_device(self, rank: int = 0) -> torch.device:
        """The device a tensor-parallel rank runs on (accelerators: one card per rank)."""
        return torch.device(self.name, rank)

    @abstractmethod
    def default_dtype(self) -> torch.dtype:
        """The dtype `--dtype auto` resolves to on this backend."""

    @abstractmethod
    def memory_free_bytes(self, device: torch.device) -> int:
        """Bytes that can still be allocated on `device`; sizes the paged KV cache."""

    def prepare_model(self, model: nn.Module) -> None:  # noqa: B027 - no-op by default
        """Adapt a loaded model's weights to this device's fastest kernels, in place (idempotent).

        Called once, after the weights are loaded and before the first forward."""

    def decode_attention(self) -> DecodeKernel | None:
        """This device's kernel for one-token (decode) attention over the paged cache, read in
        place; None: the model's portable torch path (gathers each step's blocks)."""
        return None

    def capture_graph(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record `fn` once (its inputs are fixed buffers it reads) and return a replay that runs
        the recorded work again and returns the same output tensor, refilled. Only where
        `records_graphs`."""
        raise NotImplementedError(f"{self.name} records no graphs")

    def compile(self, fn: F) -> F:
        """`fn` made faster for this device (fused kernels, any input sizes): the vision
        tower's elementwise steps, and a decode layer before graphs record it; `fn` itself
        where nothing is measured faster."""
        return fn

    def synchronize(self, device: torch.device) -> None:  # noqa: B027 - no-op by default
        """Wait for all queued work on `device` (no-op where execution is synchronous)."""

    @abstractmethod
    def distributed_backend(self) -> str:
        """The torch.distributed backend name for tensor parallelism on this platform."""

    def set_threads(self, n: int) -> None:  # noqa: B027 - no-op by default
        """Set intra-op CPU threads (meaningful on cpu only)."""

    def zeros(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A zero-filled tensor for a long-lived pool (the KV cache)."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def empty_cache(self) -> None:  # noqa: B027 - no-op by default
        """Return cached allocator blocks to the device (no-op where there is no cache)."""

    def trim_host_memory(self) -> None:  # noqa: B027 - no-op by default
        """Give freed host heap pages back to the OS; the executor calls it now and then
        between steps (see devices/cpu.py)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
