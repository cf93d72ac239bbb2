"""CPU linear kernels: a packed linear layer and the fused gated MLP compute what nn.Linear and
GatedMLP compute (fp32 within summation-order noise, bf16 within bf16 rounding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from devices.cpu_linear import FusedGatedMLP, PackedLinear, pack_linears, packing_supported
from models.layers import GatedMLP

DTYPES = [d for d in (torch.float32, torch.bfloat16) if packing_supported(d)]
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (0.05, 0.02)}  # (atol, rtol)


class MlpShape:
    hidden_size = 96
    intermediate_size = 160
    mlp_bias = False


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 63, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_nn_linear(dtype: torch.dtype, rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    ref = nn.Linear(96, 160, bias=bias).to(dtype)
    fast = PackedLinear(ref)
    x = torch.randn(2, rows, 96, dtype=dtype)
    with torch.no_grad():
        expected = ref(x).float()
        got = fast(x)
    assert got.shape == (2, rows, 160) and got.dtype == dtype
    assert got.is_contiguous()  # later layers view() their inputs
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 130])
def test_fused_gated_mlp_matches_gated_mlp(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(rows)
    ref = GatedMLP(MlpShape()).to(dtype)  # type: ignore[arg-type]
    fast = FusedGatedMLP(ref)
    x = torch.randn(rows, 96, dtype=dtype)
    with torch.no_grad():
        expected, got = ref(x).float(), fast(x)
    assert got.shape == (rows, 96) and got.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


def test_pack_linears_replaces_each_layer_once() -> None:
    mlp = GatedMLP(MlpShape())  # type: ignore[arg-type]
    inner = nn.Sequential(nn.Linear(8, 4))
    model = nn.Sequential(nn.Linear(8, 8), inner, mlp)
    pack_linears(model)
    first = [type(m) for m in model.modules()]
    pack_linears(model)
    assert [type(m) for m in model.modules()] == first
    if packing_supported(torch.float32):
        assert isinstance(model[0], PackedLinear) and isinstance(inner[0], PackedLinear)
        assert isinstance(model[2], FusedGatedMLP)
