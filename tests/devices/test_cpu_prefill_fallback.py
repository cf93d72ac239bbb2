"""Where the CPU has no AMX (AVX2-only, or AVX-512 without tiles) the prefill-attention kernel
is not offered, nothing is compiled, and a bf16 model keeps SDPA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from devices import cpu_prefill_attention
from devices.cpu import CpuPlatform
from models.attention import Attention
from models.config import ModelConfig


@pytest.fixture
def no_amx(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    flags = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"})
    monkeypatch.setattr(cpu_prefill_attention, "cpu_flags", lambda: flags)
    cpu_prefill_attention._library.cache_clear()
    yield
    cpu_prefill_attention._library.cache_clear()


@pytest.mark.usefixtures("no_amx")
def test_without_amx_a_bf16_model_keeps_sdpa() -> None:
    assert not cpu_prefill_attention.available()
    config = ModelConfig("qwen2", 32, 64, 128, 1, 4, 2, 16)
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(32, 64, dtype=torch.bfloat16), "attn": Attention(config)}
    )
    CpuPlatform().prepare_model(model)
    attn = model["attn"]
    assert isinstance(attn, Attention) and attn.prefill_kernel is None
