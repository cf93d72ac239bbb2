"""KV pool sizing: --kv-cache-memory, memory_utilization x free memory, and on CPU only what
max_num_seqs sequences of max_model_len tokens can use; the two start-up errors."""

from __future__ import annotations

import pytest

from actors.execution.kv_pool import KVLimits, KVPool, size_kv_pool

BLOCK = 16
PER_BLOCK = 1000  # bytes
GIB = 1 << 30


def size(limits: KVLimits, free: int = GIB, host_ram: bool = True, max_pos: int = 4096) -> KVPool:
    return size_kv_pool(
        limits,
        bytes_per_block=PER_BLOCK,
        block_size=BLOCK,
        max_position_embeddings=max_pos,
        free_bytes=free,
        host_ram=host_ram,
    )


def test_cpu_pool_holds_max_num_seqs_full_length_sequences() -> None:
    pool = size(KVLimits(max_num_seqs=4))
    assert pool == KVPool(num_blocks=4 * 4096 // BLOCK, block_size=BLOCK, max_model_len=4096)
    pool = size(KVLimits(max_num_seqs=3, max_model_len=100))  # 7 blocks per sequence
    assert (pool.num_blocks, pool.max_model_len, pool.capped) == (21, 100, False)


def test_cpu_pool_is_capped_by_memory_utilization_of_free_ram() -> None:
    free = 1000 * PER_BLOCK
    pool = size(KVLimits(max_num_seqs=64, memory_utilization=0.5), free=free)
    assert pool.num_blocks == 500
    assert pool.max_model_len == 4096 and not pool.capped  # 8000 tokens hold one sequence
    small = size(KVLimits(max_num_seqs=64, memory_utilization=0.5), free=free // 10)
    assert small.num_blocks == 50
    assert (small.max_model_len, small.capped) == (50 * BLOCK, True)


def test_accelerator_pool_takes_memory_utilization_of_free_memory() -> None:
    pool = size(KVLimits(max_num_seqs=1, memory_utilization=0.5), free=GIB, host_ram=False)
    assert pool.num_blocks == GIB // 2 // PER_BLOCK
    assert pool.max_model_len == 4096


@pytest.mark.parametrize("host_ram", [True, False])
def test_kv_cache_memory_overrides_everything(host_ram: bool) -> None:
    pool = size(KVLimits(max_num_seqs=1, kv_cache_memory=300 * PER_BLOCK), host_ram=host_ram)
    assert pool.num_blocks == 300 and pool.max_model_len == 4096


def test_max_model_len_over_the_model_or_the_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 4096"):
        size(KVLimits(max_model_len=5000))
    with pytest.raises(ValueError, match="does not fit in the KV cache"):
        size(KVLimits(max_model_len=4096, kv_cache_memory=10 * PER_BLOCK))
    with pytest.raises(ValueError, match="no KV block fits"):
        size(KVLimits(kv_cache_memory=PER_BLOCK - 1))
