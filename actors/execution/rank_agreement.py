"""What every tensor-parallel rank must agree on before it serves: the engine flags that shape
the wiring and the model (a host started with other flags would garble every step), and the
memory its KV pool is sized in (one block table serves every rank). Called by each executor
after it joined the group (actors/execution/tp_group.py); alone, they change nothing."""

from __future__ import annotations

import zlib

import orjson
import torch
import torch.distributed as dist

from core.config import EngineConfig

# Flags that must be equal on every host: the stage table (and so the tcp ports), the model's
# numerics, and the scheduler's view of the KV pool. The model path may differ between hosts.
SHARED_FLAGS = (
    "tensor_parallel_size",
    "nnodes",
    "tokenizer_workers",
    "image_workers",
    "detokenizer_workers",
    "tcp_base_port",
    "dtype",
    "quantization",
    "block_size",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "kv_cache_memory",
    "enable_prefix_caching",
    "enable_chunked_prefill",
    "enforce_eager",
    "seed",
)


def flags_digest(config: EngineConfig) -> int:
    values = {name: getattr(config, name) for name in SHARED_FLAGS}
    return zlib.crc32(orjson.dumps(values, option=orjson.OPT_SORT_KEYS))


def check_same_flags(config: EngineConfig, device: torch.device) -> None:
    """Raises ValueError on every rank when any rank's SHARED_FLAGS differ (a no-op alone).
    `device`: the rank's, where its backend's collectives run (nccl's on the GPU)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digest = flags_digest(config)
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)  # [max, -min]: equal only if all agree
    if int(both[0]) != -int(both[1]):
        raise ValueError(
            "the tensor-parallel ranks were started with different engine flags; start every "
            f"host's launcher with the same values of: {', '.join(SHARED_FLAGS)}"
        )


def smallest_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (free device memory: ranks on other devices or hosts
    see different amounts, and each must size the same number of KV blocks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0])
