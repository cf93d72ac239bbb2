"""CPU linear kernels: whatever product a layer picks for a batch width, it computes what
nn.Linear computes (bf16 within bf16 rounding, fp32 packed within summation-order noise)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from devices.cpu import Bf16Linear, OneDNNLinear, pack_linears


@pytest.mark.parametrize("rows", [1, 5, 63, 64, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_matches_nn_linear(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    ref = nn.Linear(96, 160, bias=bias).to(torch.bfloat16)
    fast = Bf16Linear.wrap(ref)
    x = torch.randn(2, rows, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ref(x.float().to(torch.bfloat16)).float()
        got = fast(x)
    assert got.shape == (2, rows, 160) and got.dtype == torch.bfloat16
    assert got.is_contiguous()  # later layers view() their inputs
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)


def test_pack_linears_picks_a_kernel_per_dtype_and_is_idempotent() -> None:
    inner = nn.Sequential(nn.Linear(8, 4).to(torch.bfloat16))
    model = nn.Sequential(nn.Linear(8, 8), inner)
    pack_linears(model)
    first = [type(m) for m in model.modules()]
    pack_linears(model)
    assert [type(m) for m in model.modules()] == first
    if torch.backends.mkldnn.is_available():
        assert isinstance(model[0], OneDNNLinear) and isinstance(inner[0], Bf16Linear)
