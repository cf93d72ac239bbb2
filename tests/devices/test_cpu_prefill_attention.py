"""The CPU prefill-attention kernel (AMX): it attends as SDPA does, to bf16 rounding, for causal
prompts, prompts after a cached prefix read from a scattered paged cache, and the vision tower's
windows, over odd lengths and several head groupings; and it leaves torch's own AMX kernels
working. Skipped on CPUs without AMX, where the platform keeps SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from devices import cpu_prefill_attention
from devices.cpu_prefill_attention import prefill_attention
from models.attention import AttentionMetadata, paged_attention
from models.qwen2_5_vl import segment_attention, segments
from tests.devices.paged_cases import scattered_tables

pytestmark = pytest.mark.skipif(
    not cpu_prefill_attention.available(), reason="no AMX on this CPU: the platform keeps SDPA"
)
BF16 = torch.bfloat16
HEADS = [(14, 2, 64), (4, 4, 80), (6, 1, 128), (3, 3, 32), (2, 1, 48)]


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_offset: int | None
) -> torch.Tensor:
    """fp32 attention of q [n, H, D] over k/v [L, kvH, D]; query i sees keys <= i + offset."""
    qs, ks, vs = (t.float().transpose(0, 1)[None] for t in (q, k, v))
    mask = None
    if causal_offset is not None:
        keys = torch.arange(k.shape[0])[None, :]
        mask = keys <= torch.arange(q.shape[0])[:, None] + causal_offset
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


def assert_bf16_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), HEADS)
@pytest.mark.parametrize("length", [1, 17, 32, 33, 100, 300])
def test_causal_prompt_matches_reference(
    heads: int, kv_heads: int, head_dim: int, length: int
) -> None:
    torch.manual_seed(length * head_dim)
    q = torch.randn(length, heads, head_dim, dtype=BF16)
    k = torch.randn(length, kv_heads, head_dim, dtype=BF16)
    v = torch.randn(length, kv_heads, head_dim, dtype=BF16)
    out = prefill_attention(q, k, v, [length], [length], causal=True)
    assert_bf16_close(out, reference(q, k, v, 0))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), HEADS)
def test_segments_attend_only_among_themselves(heads: int, kv_heads: int, head_dim: int) -> None:
    torch.manual_seed(heads)
    lengths = [64, 48, 64, 36, 5, 1, 130]
    total = sum(lengths)
    # q, k and v as the vision tower has them: views into one [S, 3, H, D] tensor
    qkv = torch.randn(total, 3, heads, head_dim, dtype=BF16)
    q, k, v = qkv.unbind(1)
    if kv_heads != heads:
        k, v = k[:, :kv_heads], v[:, :kv_heads]
    out = prefill_attention(q, k, v, lengths, lengths, causal=False)
    start = 0
    for n in lengths:
        rows = slice(start, start + n)
        assert_bf16_close(out[rows], reference(q[rows], k[rows], v[rows], None))
        start += n


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), HEADS[:3])
@pytest.mark.parametrize(("cached", "new"), [(16, 638), (5, 7), (200, 33), (1000, 40)])
def test_prompt_after_a_cached_prefix_reads_the_paged_cache(
    heads: int, kv_heads: int, head_dim: int, cached: int, new: int
) -> None:
    torch.manual_seed(cached + new)
    block_size = 16
    tables, num_blocks = scattered_tables([cached + new], block_size)
    slots_per_head = num_blocks * block_size
    k_cache = torch.randn(kv_heads, slots_per_head, head_dim, dtype=BF16)
    v_cache = torch.randn(kv_heads, slots_per_head, head_dim, dtype=BF16)
    pos = torch.arange(cached + new)
    slots = torch.tensor(tables[0])[pos // block_size] * block_size + pos % block_size
    q = torch.randn(new, heads, head_dim, dtype=BF16)
    out = prefill_attention(
        q,
        k_cache.transpose(0, 1),
        v_cache.transpose(0, 1),
        [new],
        [cached + new],
        causal=True,
        key_index=slots,
    )
    keys, values = (c[:, slots].transpose(0, 1) for c in (k_cache, v_cache))
    assert_bf16_close(out, reference(q, keys, values, cached))


@pytest.mark.parametrize("starts", [[0], [16], [700], [0, 40, 5]])
def test_paged_attention_with_the_kernel_matches_sdpa(starts: list[int]) -> None:
    """Through models/attention.py: fresh prompts, short and long cached prefixes (the latter
    SDPA attends with a mask), several prompts in one step with decodes among them."""
    torch.manual_seed(sum(starts))
    heads, kv_heads, head_dim, block_size = 14, 2, 64, 16
    query_lens = [37 if i % 2 == 0 else 1 for i in range(len(starts))]
    query_lens[0] = 90
    lens = [s + n for s, n in zip(starts, query_lens)]
    tables, num_blocks = scattered_tables(lens, block_size)
    shape = (kv_heads, num_blocks * block_size, head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=BF16), torch.randn(shape, dtype=BF16)
    total = sum(query_lens)
    q = torch.randn(total, heads, head_dim, dtype=BF16)
    k = torch.randn(total, kv_heads, head_dim, dtype=BF16)
    v = torch.randn(total, kv_heads, head_dim, dtype=BF16)
    meta = AttentionMetadata.build(query_lens, starts, tables, block_size, torch.device("cpu"))
    outs = [
        paged_attention(q, k, v, (k_cache.clone(), v_cache.clone()), meta, kernel)
        for kernel in (None, prefill_attention)
    ]
    assert_bf16_close(outs[1], outs[0].float())


@pytest.mark.parametrize("lengths", [[64, 64, 48, 36], [529], [100, 3]])
def test_vision_segments_with_the_kernel_match_sdpa(lengths: list[int]) -> None:
    torch.manual_seed(len(lengths))
    total = sum(lengths)
    q, k, v = (torch.randn(total, 10, 64, dtype=BF16) for _ in range(3))
    segs = segments(lengths, torch.device("cpu"))
    expected = segment_attention(q, k, v, segs)
    assert_bf16_close(segment_attention(q, k, v, segs, prefill_attention), expected.float())


def test_torch_amx_kernels_still_work_after_the_kernel() -> None:
    """The kernel configures AMX tiles in torch's own OpenMP threads; it must hand back the
    configuration that torch's oneDNN kernels (SDPA, bf16 matmul) left there."""
    torch.manual_seed(0)
    q = torch.randn(1, 14, 300, 64, dtype=BF16)
    k, v = torch.randn(1, 2, 300, 64, dtype=BF16), torch.randn(1, 2, 300, 64, dtype=BF16)
    a, b = torch.randn(256, 512, dtype=BF16), torch.randn(512, 384, dtype=BF16)

    def torch_work() -> tuple[torch.Tensor, torch.Tensor]:
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return sdpa, a @ b

    before = torch_work()
    qf, kf, vf = (t[0].transpose(0, 1) for t in (q, k, v))
    for _ in range(3):
        prefill_attention(qf, kf, vf, [300], [300], causal=True)
        after = torch_work()
        torch.testing.assert_close(after[0], before[0], atol=0, rtol=0)
        torch.testing.assert_close(after[1], before[1], atol=0, rtol=0)


def test_rejects_what_it_cannot_do() -> None:
    q = torch.randn(4, 2, 64)
    with pytest.raises(TypeError):
        prefill_attention(q, q, q, [4], [4], causal=True)
    qb = q.to(BF16)
    with pytest.raises(ValueError):
        prefill_attention(qb[:2], qb, qb, [2], [1], causal=True)  # fewer keys than queries


@pytest.mark.parametrize(("dtype", "expected"), [(BF16, True), (torch.float32, False)])
def test_the_platform_hands_the_kernel_to_bf16_models_only(
    dtype: torch.dtype, expected: bool
) -> None:
    from devices.cpu import CpuPlatform
    from models.attention import Attention
    from models.config import ModelConfig

    config = ModelConfig("qwen2", 32, 64, 128, 1, 4, 2, 16)
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(32, 64, dtype=dtype), "attn": Attention(config).to(dtype)}
    )
    CpuPlatform().prepare_model(model)
    attn = model["attn"]
    assert isinstance(attn, Attention)
    assert (attn.prefill_kernel is prefill_attention) is expected
