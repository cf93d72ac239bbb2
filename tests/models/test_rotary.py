"""The half-by-half rotary rotation is bit-for-bit the rotate_half formula transformers uses,
in fp32 and bf16, for text ([T, heads, D]) and vision q/k stacked together ([T, 2, heads, D])."""

from __future__ import annotations

import pytest
import torch

from models.layers import apply_rotary


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 7, 64), (37, 2, 5, 16)])
def test_rotary_is_bit_equal_to_rotate_half(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    freqs = torch.randn(shape[0], shape[-1] // 2) * 10
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    x = torch.randn(shape).to(dtype)
    got = apply_rotary(x, cos, sin)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, rotate_half_reference(x, cos, sin))
