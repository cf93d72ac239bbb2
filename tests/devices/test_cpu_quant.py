"""CPU quantized kernels (devices/cpu_quant.py) against the portable QuantizedLinear they replace:
int8 and int4 weight-only on decode rows (packed kernels) and prefill rows (dequantized), w8a8."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from devices.cpu_features import has_int8_dot, has_native_bf16
from devices.cpu_quant import CpuInt4Linear, CpuInt8Linear, CpuW8A8Linear, cpu_quantized_kernel
from models.quant.linear import QuantizedLinear
from models.quant.methods import quantize_linear
from models.quant.spec import QuantSpec

torch.set_num_threads(2)
needs_bf16 = pytest.mark.skipif(not has_native_bf16(), reason="CPU has no native bf16")


def _quantized(
    bits: int, group: int | None, *, bias: bool = True, **spec: object
) -> QuantizedLinear:
    torch.manual_seed(0)
    linear = nn.Linear(128, 192, bias=bias)
    return quantize_linear(linear, QuantSpec("t", bits, group, symmetric=bits == 8, **spec), bits)  # type: ignore[arg-type]


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= 0.02 * ref.abs().max().item(), err


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_int8_kernel_matches_dequantized_layer(rows: int) -> None:
    layer = _quantized(8, None)
    kernel = cpu_quantized_kernel(layer)
    assert isinstance(kernel, CpuInt8Linear)
    x = torch.randn(rows, 128)
    _close(kernel(x), layer(x))
    assert kernel(x).dtype == torch.float32


@needs_bf16
@pytest.mark.parametrize("rows", [1, 4, 70])
def test_int4_kernel_matches_dequantized_layer(rows: int) -> None:
    layer = _quantized(4, 32)
    kernel = cpu_quantized_kernel(layer)
    assert isinstance(kernel, CpuInt4Linear)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    _close(kernel(x), layer(x.float()))


@needs_bf16
def test_int4_weight_reads_back_from_the_packed_layout() -> None:
    layer = _quantized(4, 64, bias=False)
    kernel = CpuInt4Linear(layer, torch.bfloat16)
    expected = layer.dequantized_weight(torch.float32)
    got = kernel.dequantized_weight_t().float().t()
    assert torch.allclose(got, expected, atol=0.02, rtol=0.01)


@needs_bf16
def test_int4_act_order_permutes_inputs() -> None:
    layer = _quantized(4, 32, bias=False)
    perm = torch.randperm(128)
    act = QuantizedLinear(
        128,
        192,
        bits=4,
        group_size=32,
        symmetric=False,
        bias=False,
        dtype=torch.float32,
        act_order=True,
    )
    for name in ("qweight", "scales", "offsets"):
        getattr(act, name).data.copy_(getattr(layer, name))
    assert act.input_perm is not None
    act.input_perm.data.copy_(perm)
    x = torch.randn(2, 128)
    _close(act(x), layer(x[:, perm]))
    _close(cpu_quantized_kernel(act)(x), layer(x[:, perm]))


@pytest.mark.skipif(not has_int8_dot(), reason="CPU has no int8 dot products")
@pytest.mark.parametrize("rows", [1, 33])
def test_w8a8_kernel_matches_fake_quantized_layer(rows: int) -> None:
    layer = _quantized(8, None, act_quant="int8_token")
    kernel = cpu_quantized_kernel(layer)
    assert isinstance(kernel, CpuW8A8Linear)
    x = torch.randn(rows, 128)
    torch.testing.assert_close(kernel(x), layer(x), atol=1e-4, rtol=1e-4)


def test_unsupported_schemes_keep_the_portable_layer() -> None:
    layer = _quantized(8, 32)  # grouped int8: no packed kernel
    assert cpu_quantized_kernel(layer) is layer
