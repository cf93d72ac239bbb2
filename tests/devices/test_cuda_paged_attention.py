"""The CUDA (Triton) paged decode-attention kernel attends as the portable torch path does, for any
block layout, length, head grouping and head size (also ones that are not powers of two).

Needs an NVIDIA GPU with Triton; with TRITON_INTERPRET=1 and Triton installed, the same checks
run on the CPU through Triton's interpreter (slow, for working on the kernel without a GPU)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from devices.cuda import CudaPlatform
from models.attention import AttentionMetadata, paged_attention
from tests.devices.paged_cases import scattered_tables

TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


@pytest.fixture(scope="module")
def device() -> torch.device:
    if CudaPlatform().is_available():
        return torch.device("cuda")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreted and importlib.util.find_spec("triton") is not None:
        return torch.device("cpu")
    pytest.skip("needs an NVIDIA GPU with Triton; none is available here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "lens"),
    [
        (16, 2, 128, 16, [1, 5, 16, 17, 700]),  # Qwen2.5-VL-3B's grouping, a long history
        (14, 2, 64, 16, [3, 33]),  # Qwen2.5-0.5B's group of 7 pads to 16
        (9, 3, 80, 4, [1, 2, 97]),  # a head size that is not a power of two
        (4, 4, 16, 4, [9, 1, 64, 65] * 9),  # the test checkpoints' shape, 36 sequences
    ],
)
def test_kernel_matches_the_torch_path(
    device: torch.device,
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    lens: list[int],
) -> None:
    from devices.cuda_paged_attention import paged_decode_attention

    if device.type == "cpu" and dtype != torch.float32:
        pytest.skip("Triton's interpreter gets bf16 products wrong; bf16 needs an NVIDIA GPU")
    torch.manual_seed(heads * head_dim + len(lens))
    tables, num_blocks = scattered_tables(lens, block_size)
    shape = (kv_heads, num_blocks * block_size, head_dim)
    k_cache = torch.randn(shape, dtype=dtype, device=device)
    v_cache = torch.randn(shape, dtype=dtype, device=device)
    q, k, v = (
        torch.randn(len(lens), n, head_dim, dtype=dtype, device=device)
        for n in (heads, kv_heads, kv_heads)
    )
    starts = [n - 1 for n in lens]
    outs = []
    for kernel in (None, paged_decode_attention):
        meta = AttentionMetadata.build([1] * len(lens), starts, tables, block_size, device, kernel)
        caches = (k_cache.clone(), v_cache.clone())
        outs.append(paged_attention(q, k, v, caches, meta).float())
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(outs[1], outs[0], atol=atol, rtol=rtol)
