"""CPU kernels for QuantizedLinear (models/quant/linear.py): CpuPlatform.prepare_model swaps each
quantized layer for the fastest kernel its scheme has here, chosen at run time.

- int8 per-channel weights: torch._weight_int8pack_mm up to 16 rows; wider products (prefill)
  convert the int8 values to bf16 (exact) and scale the product's columns.
- int4 groups (32..256 inputs): torch's int4 packed layout and _weight_int4pack_mm_for_cpu up
  to 48 rows; wider ones dequantize from that same layout (no second copy of the weight).
- w8a8 (int8 weights, dynamic per-token int8 activations): torch._int_mm, int8 dot products
  (AVX512-VNNI / AMX) where the CPU has them.
- anything else (fp8, grouped or asymmetric int8): the layer's own dequantizing forward.

The weight-only kernels compute in bf16, so they need native bf16 (elsewhere the layer's own
forward runs): the fp32 variants of torch's packed kernels are not vectorised (int8, 1 row of
896 -> 9728: 13 ms against 0.26 ms in bf16), nor are the fp16 ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from devices.cpu_features import has_int8_dot, has_native_bf16
from models.quant.linear import QuantizedLinear, unpack_int4

# Products of at most this many rows use the packed quantized kernels; wider ones dequantize the
# weight to bf16 and run a dense product. Measured on a 2-core AMX Xeon, 896 -> 9728 in bf16:
# 1 row int8 0.27 ms, int4 0.24 ms against 0.41 ms for the packed bf16 weight; 16 rows int8
# 1.7 ms against 1.2 ms to convert + 0.7 ms to multiply; int4 4.7 ms at 48 rows and 6.3 ms at
# 64 against ~6 ms to dequantize + 1 ms (dense bf16: 0.6 ms at 16 rows, 1.0 ms at 64).
INT8_KERNEL_ROWS = 16
INT4_KERNEL_ROWS = 48
INT4_GROUPS = (32, 64, 128, 256)
INT4_ROW_BLOCK = 64  # torch's CPU int4 layout packs rows in blocks of 64


class CpuInt8Linear(nn.Module):
    """Symmetric per-channel int8 weights, weight-only (activations stay in the compute dtype)."""

    def __init__(self, layer: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.dtype = dtype
        self.qweight = layer.qweight.detach()
        self.scales = layer.scales.detach().reshape(-1).to(dtype)
        self.bias = None if layer.bias is None else layer.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        if flat.shape[0] <= INT8_KERNEL_ROWS:
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        else:  # int8 values are exact in bf16; the scale applies to the product's columns
            out = F.linear(flat, self.qweight.to(self.dtype)) * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class CpuInt4Linear(nn.Module):
    """int4 weights in torch's CPU packed layout with [K/g, N, (scale, zero)] where
    w = (q - 8) * scale + zero; the canonical offsets fold into `zero` (offset + 8 * scale)."""

    def __init__(self, layer: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.group_size, self.dtype = layer.group_size, dtype
        values = unpack_int4(layer.qweight.detach()).to(torch.int32)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(values, 1)
        scales = layer.scales.detach().float()
        offsets = layer.offsets.detach().float() if layer.offsets is not None else 0 * scales
        zeros = offsets + 8 * scales
        self.scale_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()
        perm = layer.input_perm
        self.input_perm = None if perm is None else perm.detach()
        self.bias = None if layer.bias is None else layer.bias.detach().to(dtype)

    @staticmethod
    def supports(layer: QuantizedLinear) -> bool:
        return (
            layer.bits == 4
            and layer.group_size in INT4_GROUPS
            and layer.out_features % INT4_ROW_BLOCK == 0
            and layer.act_quant == "none"
        )

    def dequantized_weight_t(self) -> torch.Tensor:
        """W^T [K, N] in the compute dtype, read back from the packed layout: each block of 64
        rows is [K, 32] bytes, rows 0-31 in the low nibbles and 32-63 in the high ones. Written
        input-major, so the product reads it as it is; the nibbles are unpacked straight into
        that order (uint8), then converted and scaled in one pass each (~4 ms for 896 x 9728)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        blocks = self.packed.view(n // INT4_ROW_BLOCK, k, INT4_ROW_BLOCK // 2).permute(1, 0, 2)
        values = torch.empty(k, n // INT4_ROW_BLOCK, INT4_ROW_BLOCK, dtype=torch.uint8)
        half = INT4_ROW_BLOCK // 2
        torch.bitwise_and(blocks, 15, out=values[..., :half])
        torch.bitwise_right_shift(blocks, 4, out=values[..., half:])
        shape = (k // g, g, n // INT4_ROW_BLOCK, INT4_ROW_BLOCK)
        # The decode kernel's formula, (q - 8) * scale + zero; q - 8 is exact in bf16. (In fp32,
        # rounded once, it took 3.5x as long and changed no measured greedy token.)
        scales = self.scale_zeros[..., 0].contiguous().view(k // g, 1, *shape[2:])
        zeros = self.scale_zeros[..., 1].contiguous().view(k // g, 1, *shape[2:])
        centred = values.to(self.dtype).view(shape).sub_(8)
        return torch.addcmul(zeros, centred, scales).view(k, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.dtype)
        if self.input_perm is not None:
            flat = flat.index_select(1, self.input_perm)
        if flat.shape[0] <= INT4_KERNEL_ROWS:
            out = torch._weight_int4pack_mm_for_cpu(
                flat, self.packed, self.group_size, self.scale_zeros
            )
            if self.bias is not None:
                out = out + self.bias
        else:
            out = flat @ self.dequantized_weight_t()
            if self.bias is not None:
                out = out + self.bias
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class CpuW8A8Linear(nn.Module):
    """int8 weights and per-token int8 activations: one int32 product (VNNI / AMX), rescaled."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight_t = layer.qweight.detach().t().contiguous()  # [K, N] for _int_mm
        self.scales = layer.scales.detach().reshape(1, -1).float()
        self.bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        q = (flat / scale).round().clamp(-127, 127).to(torch.int8)
        out = (torch._int_mm(q, self.weight_t).float() * (scale * self.scales)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def _per_channel_int8(layer: QuantizedLinear) -> bool:
    return (
        layer.bits == 8
        and layer.offsets is None
        and layer.group_size == layer.in_features
        and layer.input_perm is None
    )


def cpu_quantized_kernel(layer: QuantizedLinear) -> nn.Module:
    """The fastest CPU module computing `layer` (the layer itself where none is faster). The
    weight-only kernels compute in bf16, so they need a CPU with native bf16."""
    if layer.act_quant == "int8_token":
        if _per_channel_int8(layer) and has_int8_dot():
            return CpuW8A8Linear(layer)
        return layer
    if not has_native_bf16():
        return layer
    if _per_channel_int8(layer):
        return CpuInt8Linear(layer, torch.bfloat16)
    if CpuInt4Linear.supports(layer):
        return CpuInt4Linear(layer, torch.bfloat16)
    return layer
