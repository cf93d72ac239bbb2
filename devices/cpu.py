"""CPU platform: bf16 where the CPU has it natively (else float32), gloo, free memory from /proc/meminfo bounded by the cgroup limit, and
fp32 linear weights prepacked for oneDNN. Used when `--device cpu` is asked for or `auto` finds no
accelerator.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from devices.base import Platform
from devices.cpu_features import has_native_bf16

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _sysconf_available() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's cgroup (v2, then v1); None when unlimited or unknown."""
    candidates = [
        (_CGROUP_ROOT / "memory.max", _CGROUP_ROOT / "memory.current"),
        (
            _CGROUP_ROOT / "memory" / "memory.limit_in_bytes",
            _CGROUP_ROOT / "memory" / "memory.usage_in_bytes",
        ),
    ]
    for limit_path, usage_path in candidates:
        try:
            limit_text = limit_path.read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(usage_path.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1 spells "unlimited" as a huge number
            return None
        return max(limit - usage, 0)
    return None


class OneDNNLinear(nn.Module):
    """A linear layer whose weight lives in oneDNN's blocked layout (CPU, fp32).

    Deliberate CPU choice: decode steps are matrix-vector or skinny products, where MKL's
    default sgemm reads weights at about half the memory bandwidth; oneDNN's prepacked kernel is
    1.2-2x faster there (896->9728, M=8: 2.1 vs 4.1 ms on this 2-core box) and as fast for
    prefill-sized products.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_packed = linear.weight.detach().to_mkldnn()
        bias = linear.bias if linear.bias is not None else torch.zeros(self.out_features)
        self.bias_packed = bias.detach().float().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).contiguous().to_mkldnn()
        out = torch._C._nn.mkldnn_linear(flat, self.weight_packed, self.bias_packed).to_dense()
        return out.view(*x.shape[:-1], self.out_features)


class Bf16Linear(nn.Linear):
    """A bf16 linear layer that picks, by the number of rows, the product that reads its weight
    fastest on CPU. Weights bigger than the caches are read from memory once per step, so decode
    is bandwidth-bound: F.linear's bf16 path read them at 14-16 GB/s here, a matrix-vector
    product at 19-23 GB/s (one row) and `weight @ x.T` at ~23 GB/s (2-63 rows), against a
    measured 23.6 GB/s machine limit; from 64 rows on (prefill) F.linear's AMX kernel wins."""

    @classmethod
    def wrap(cls, linear: nn.Linear) -> Bf16Linear:
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.weight, out.bias = linear.weight, linear.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows == 1:
            out = torch.mv(self.weight, flat[0])[None]
        elif rows < 64:
            out = (self.weight @ flat.t()).t().contiguous()
        else:
            return F.linear(x, self.weight, self.bias)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> None:
    """Give every nn.Linear in `model` its CPU kernel (after weights are loaded): fp32 weights
    are packed for oneDNN (OneDNNLinear), bf16 ones pick their product by batch width.

    Idempotent: layers already replaced are not plain nn.Linear and are left alone."""
    if not torch.backends.mkldnn.is_available():
        return
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear and child.weight.dtype == torch.float32:
            setattr(model, name, OneDNNLinear(child))
        elif type(child) is nn.Linear and child.weight.dtype == torch.bfloat16:
            setattr(model, name, Bf16Linear.wrap(child))
        else:
            pack_linears(child)


class CpuPlatform(Platform):
    name = "cpu"
    memory_is_host_ram = True
    adapts_threads = True

    def is_available(self) -> bool:
        return True

    def torch_device(self, rank: int = 0) -> torch.device:
        return torch.device("cpu")  # every rank shares host memory; no device index

    def default_dtype(self) -> torch.dtype:
        """bf16 where the CPU computes it natively (AVX512-BF16 or AMX), else fp32: elsewhere
        bf16 matrix products are emulated and far slower than fp32."""
        return torch.bfloat16 if has_native_bf16() else torch.float32

    def zeros(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Zeros in an anonymous memory map: the kernel hands out zero pages on first touch, so
        the KV pool costs RAM only as far as requests have written into it (an idle engine
        serving a 135M model no longer holds gigabytes of zeros)."""
        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(region, dtype=dtype, count=count).view(shape)

    def memory_free_bytes(self, device: torch.device) -> int:
        free = _meminfo_available()
        if free is None:
            free = _sysconf_available() or 0
        headroom = _cgroup_headroom()
        return min(free, headroom) if headroom is not None else free

    def prepare_model(self, model: nn.Module) -> None:
        pack_linears(model)  # faster decode products on CPU; see OneDNNLinear

    def distributed_backend(self) -> str:
        return "gloo"

    def set_threads(self, n: int) -> None:
        if n > 0:
            torch.set_num_threads(n)
