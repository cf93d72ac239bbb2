"""QuantizedLinear: a linear layer whose weight is stored as integers (int8, int4) or fp8 with
per-row group scales, in one canonical layout every checkpoint format is converted to at load.

Its own forward dequantizes the weight and runs a plain product (the portable path, used on
devices with no quantized kernel and as the numerical reference); Platform.prepare_model swaps it
for the device's kernel (devices/cpu_quant.py). Canonical layout, for a weight W [N, K]:

- `qweight`: bits 8: int8 [N, K]; bits 4: uint8 [N, K/2], column 2j in the low nibble and 2j+1 in
  the high one, values 0..15; fp8: float8_e4m3fn [N, K].
- `scales` [N, K/g] and `offsets` [N, K/g] (fp32; offsets absent for symmetric weights): column k
  of row n is q * scales[n, k // g] + offsets[n, k // g]. Per-channel is g = K; per-tensor and
  block scales are expanded to rows when converted.
- `input_perm` [K] (GPTQ act-order): the product reads x[..., input_perm], so the groups of the
  permuted columns are contiguous.
- `act_quant`: the checkpoint's dynamic activation quantization, applied before the product:
  "int8_token" (w8a8: int8, one scale per token), "fp8_token", "fp8_group<n>" (e4m3, one scale
  per token or per n inputs of a token); "none" for weight-only schemes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = (4, 8, "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] nibbles -> uint8 [N, K] values 0..15 (low nibble first)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8/int [N, K] values 0..15 -> uint8 [N, K/2] (the inverse of unpack_int4)."""
    v = values.to(torch.uint8)
    return v[..., 0::2] | (v[..., 1::2] << 4)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    bits: int | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight [N, K] of canonical quantized tensors, computed in fp32, cast to dtype."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    groups = scales.shape[1]
    w = q.to(torch.float32).view(n, groups, k // groups) * scales.float().unsqueeze(-1)
    if offsets is not None:
        w = w + offsets.float().unsqueeze(-1)
    return w.view(n, k).to(dtype)


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """x rounded as w8a8 kernels see it: symmetric int8 with one scale per row (token)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    return ((xf / scale).round().clamp(-127, 127) * scale).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor, group: int | None) -> torch.Tensor:
    """x rounded to e4m3 with one scale per token (group None) or per `group` inputs."""
    shape = x.shape
    xf = x.float() if group is None else x.float().reshape(*shape[:-1], -1, group)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(shape).to(x.dtype)


def fake_quant(x: torch.Tensor, act_quant: str) -> torch.Tensor:
    """x as the layer's activation quantization (act_quant) rounds it."""
    if act_quant == "int8_token":
        return fake_quant_per_token(x)
    if act_quant == "fp8_token":
        return fake_quant_fp8(x, None)
    if act_quant.startswith("fp8_group"):
        return fake_quant_fp8(x, int(act_quant.removeprefix("fp8_group")))
    return x


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W in the canonical quantized layout (module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int | str,
        group_size: int,
        symmetric: bool,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        act_order: bool = False,
        act_quant: str = "none",
    ) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"unsupported weight bits {bits!r}")
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide {in_features} inputs")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.act_quant = bits, group_size, act_quant
        groups = in_features // group_size
        if bits == 4:
            if in_features % 2:
                raise ValueError("int4 weights need an even number of inputs")
            q = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        else:
            qdtype = torch.int8 if bits == 8 else torch.float8_e4m3fn
            q = torch.empty(out_features, in_features, dtype=qdtype, device=device)
        self.qweight = _frozen(q)
        self.scales = _frozen(torch.empty(out_features, groups, device=device))
        # int4 values are unsigned (0..15): their zero always lives in the offsets.
        asymmetric = not symmetric or bits == 4
        self.offsets = (
            _frozen(torch.empty(out_features, groups, device=device)) if asymmetric else None
        )
        self.input_perm = (
            _frozen(torch.empty(in_features, dtype=torch.long, device=device))
            if act_order
            else None
        )
        self.bias = _frozen(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.offsets, self.bits, dtype)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        x = fake_quant(x, self.act_quant)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group={self.group_size}, symmetric={self.offsets is None}, "
            f"act_order={self.input_perm is not None}, act_quant={self.act_quant}"
        )
