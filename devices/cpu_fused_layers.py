"""Puts the CPU platform's fused kernels (devices/cpu_fused_ops.py) into a loaded model: every
RMSNorm becomes one C call (with the residual add before it, where the layer asks for both), and
every attention layer gets the fused rotary + cache write for decode-only steps.
CpuPlatform.prepare_model calls fuse_layer_ops once, after the weights are loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from devices import cpu_fused_ops
from devices.cpu_fused_ops import rms_norm, rope_store, supported
from models.attention import Attention
from models.layers import RMSNorm


class FusedRMSNorm(RMSNorm):
    """RMSNorm computed by one C call where the tensors allow it (contiguous fp32/bf16 of the
    weight's dtype), by the torch operations otherwise. Same arithmetic either way."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight

    def _fits(self, *tensors: torch.Tensor) -> bool:
        return all(supported(t) and t.dtype == self.weight.dtype for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fits(x):
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)[1]

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._fits(x, delta) or x.shape != delta.shape:
            return super().add_norm(x, delta)
        return rms_norm(x, self.weight, self.eps, delta)


def fuse_layer_ops(model: nn.Module) -> None:
    """Swap in the fused norms and decode-step rotary where the kernels build on this machine
    (else leave the model as it is). Idempotent."""
    if not cpu_fused_ops.available():
        return
    for module in model.modules():
        if isinstance(module, Attention):
            module.rope_store = rope_store
        for name, child in list(module.named_children()):
            if type(child) is RMSNorm:
                setattr(module, name, FusedRMSNorm(child))
