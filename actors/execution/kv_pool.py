"""Sizes the executor's paged KV pool and the longest sequence it serves (max_model_len).
Called once by ModelRunner.load, after the weights are on the device and before the pool exists."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVLimits:
    """The command-line bounds on the pool (EngineConfig's fields of the same names)."""

    max_model_len: int | None = None  # None: the model's max_position_embeddings, if it fits
    max_num_seqs: int = 64
    memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; overrides everything else


@dataclass(frozen=True)
class KVPool:
    num_blocks: int
    block_size: int
    max_model_len: int
    capped: bool = False  # max_model_len was left to default and the pool made it shorter


def size_kv_pool(
    limits: KVLimits,
    *,
    bytes_per_block: int,
    block_size: int,
    max_position_embeddings: int,
    free_bytes: int,
    host_ram: bool,
) -> KVPool:
    """The pool for `limits`: --kv-cache-memory when given; else memory_utilization x free_bytes,
    and where device memory is host RAM (CPU) no more than max_num_seqs sequences of
    max_model_len tokens can use, so an idle engine does not claim the machine's memory.

    Raises ValueError for a max_model_len over max_position_embeddings or past the pool."""
    wanted_len = limits.max_model_len
    if wanted_len is not None and wanted_len > max_position_embeddings:
        raise ValueError(
            f"--max-model-len {wanted_len} exceeds the model's "
            f"max_position_embeddings {max_position_embeddings}"
        )
    if limits.kv_cache_memory:
        budget = limits.kv_cache_memory
    else:
        budget = int(free_bytes * limits.memory_utilization)
        if host_ram:
            blocks_per_seq = -(-(wanted_len or max_position_embeddings) // block_size)
            budget = min(budget, limits.max_num_seqs * blocks_per_seq * bytes_per_block)
    num_blocks = budget // bytes_per_block
    fits = num_blocks * block_size
    if wanted_len is not None:
        if wanted_len > fits:
            raise ValueError(
                f"--max-model-len {wanted_len} does not fit in the KV cache: "
                f"{budget} bytes hold {num_blocks} blocks of {block_size} tokens "
                f"({fits} tokens). Lower --max-model-len or raise --kv-cache-memory / "
                "--memory-utilization."
            )
        return KVPool(num_blocks, block_size, wanted_len)
    if fits < 1:
        raise ValueError(f"no KV block fits in {budget} bytes; raise --kv-cache-memory")
    max_len = min(max_position_embeddings, fits)
    return KVPool(num_blocks, block_size, max_len, capped=max_len < max_position_embeddings)
