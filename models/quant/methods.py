"""Quantize-at-load (`--quantization int8|int4` on an unquantized checkpoint): round-to-nearest
weight-only quantization of the loaded linears. Called by models/loader.py after the dense load.

int8: symmetric, one scale per output row (per channel). int4: asymmetric groups of 32 inputs
with a scale and a float minimum, as GGUF's Q4_1. With `lm_head`, the head is int8 per channel
(it is the widest product of a small model, and the most sensitive to rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from models.quant.linear import QuantizedLinear, pack_int4
from models.quant.spec import QuantSpec, empty_quantized, quantized_paths

INT4_GROUP = 32
LOAD_METHODS: dict[str, QuantSpec] = {
    "int8": QuantSpec("int8", bits=8, lm_head=True),
    "int4": QuantSpec(
        "int4", bits=4, group_size=INT4_GROUP, symmetric=False, lm_head=True, lm_head_bits=8
    ),
}


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [N, K], scales [N, 1]): symmetric per-row round-to-nearest."""
    w = weight.float()
    scales = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return (w / scales).round().clamp(-127, 127).to(torch.int8), scales


def quantize_int4(
    weight: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, K/2], scales [N, K/g], offsets [N, K/g]): per group q in 0..15 with
    w ~ q * scale + min (min the group's minimum, so 0 and the extremes are near exact)."""
    n, k = weight.shape
    w = weight.float().view(n, k // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15.0).clamp_min(1e-12)
    q = ((w - low.unsqueeze(-1)) / scales.unsqueeze(-1)).round().clamp(0, 15)
    return pack_int4(q.view(n, k)), scales, low


@torch.no_grad()
def quantize_linear(linear: nn.Linear, spec: QuantSpec, bits: int | str) -> QuantizedLinear:
    out = empty_quantized(linear, spec, bits)
    if bits == 8:
        q, scales = quantize_int8(linear.weight)
        out.qweight.copy_(q)
        out.scales.copy_(scales)
        if out.offsets is not None:
            out.offsets.zero_()
    elif bits == 4:
        q, scales, offsets = quantize_int4(linear.weight, out.group_size)
        out.qweight.copy_(q)
        out.scales.copy_(scales)
        if out.offsets is None:
            raise ValueError("int4 quantize-at-load is asymmetric")
        out.offsets.copy_(offsets)
    else:
        raise ValueError(f"no quantize-at-load for {bits!r} weights")
    if out.bias is not None and linear.bias is not None:
        out.bias.copy_(linear.bias)
    return out


def quantize_model(model: nn.Module, method: str) -> None:
    """Replaces the model's linears (QuantSpec's coverage) by quantized copies, in place."""
    spec = LOAD_METHODS[method]
    for path in quantized_paths(model, spec):
        *owners, leaf = path.split(".")
        parent = model.get_submodule(".".join(owners)) if owners else model
        linear = getattr(parent, leaf)
        if not isinstance(linear, nn.Linear):
            continue  # already quantized by the checkpoint
        bits = spec.lm_head_bits if leaf == "lm_head" and spec.lm_head_bits else spec.bits
        for_spec = QuantSpec(spec.method, bits, spec.group_size, spec.symmetric)
        if bits == 8:  # int8 rows are symmetric whatever the layers' scheme
            for_spec = QuantSpec(spec.method, 8)
        setattr(parent, leaf, quantize_linear(linear, for_spec, bits))
