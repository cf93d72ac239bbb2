"""The vision tower's elementwise steps (RMSNorm, rotary on q/k, the gated activation), kept
apart from its matrix products so a device can swap in fused versions of them. Called by
models/qwen2_5_vl.py for every block of every image the executor encodes.

Each image puts thousands of patches through these steps in fp32 (as HF does), and eagerly
each one is several passes over [patches, hidden] tensors: on a 2-core CPU they were ~40% of a
640x640 image's encoding time. `VisionKernels.compiled` fuses each into one pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from models.layers import apply_rotary

Activation = Callable[[torch.Tensor], torch.Tensor]
Compiler = Callable[[Callable[..., Any]], Callable[..., Any]]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models.layers.RMSNorm as a function: normalise in fp32, cast back, then scale."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_qk(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [S, 3, heads, D] -> q, k rotated (in fp32, cast back, as HF does) and v."""
    q, k, v = qkv.unbind(1)
    q = apply_rotary(q.float(), cos, sin).to(qkv.dtype)
    k = apply_rotary(k.float(), cos, sin).to(qkv.dtype)
    return q, k, v


@dataclass(frozen=True)
class VisionKernels:
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rotate_qk: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor],
        tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ]
    gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # act(gate) * up

    @staticmethod
    def eager(act: Activation) -> VisionKernels:
        def gate(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return act(g).mul_(u)

        return VisionKernels(rms_norm, rotate_qk, gate)

    @staticmethod
    def compiled(act: Activation, compile: Compiler) -> VisionKernels:
        """The same steps through `compile` (e.g. torch.compile with dynamic shapes: one trace
        serves every image size)."""

        def gate(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            return act(g) * u  # out of place: the compiler fuses it into one pass

        return VisionKernels(compile(rms_norm), compile(rotate_qk), compile(gate))
