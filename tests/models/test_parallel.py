"""Tensor-parallel sharding (models/parallel.py) without processes: the ranks' shards put back
together are the checkpoint's tensors, heads map onto KV heads in equal groups on every rank,
row-parallel biases are kept once, and splits that cannot work are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.config import ModelConfig
from models.parallel import (
    TensorParallel,
    head_spans,
    rank_config,
    shard_weights,
    widest_rank_kv_heads,
)

CONFIG = ModelConfig(
    architecture="qwen2",
    vocab_size=10,
    hidden_size=12,
    intermediate_size=10,
    num_layers=1,
    num_heads=6,
    num_kv_heads=2,
    head_dim=2,
)


def checkpoint(config: ModelConfig) -> dict[str, torch.Tensor]:
    d, h, i = config.head_dim, config.hidden_size, config.intermediate_size
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (config.num_heads * d, h),
        "model.layers.0.self_attn.q_proj.bias": (config.num_heads * d,),
        "model.layers.0.self_attn.k_proj.weight": (config.num_kv_heads * d, h),
        "model.layers.0.self_attn.v_proj.weight": (config.num_kv_heads * d, h),
        "model.layers.0.self_attn.o_proj.weight": (h, config.num_heads * d),
        "model.layers.0.self_attn.o_proj.bias": (h,),
        "model.layers.0.mlp.gate_proj.weight": (i, h),
        "model.layers.0.mlp.up_proj.weight": (i, h),
        "model.layers.0.mlp.down_proj.weight": (h, i),
        "model.layers.0.mlp.down_proj.bias": (h,),
        "model.embed_tokens.weight": (config.vocab_size, h),
        "visual.blocks.0.mlp.gate_proj.weight": (8, 4),  # the vision tower is replicated
    }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


MHA = dataclasses.replace(CONFIG, num_kv_heads=6)


@pytest.mark.parametrize(("config", "size"), [(CONFIG, 1), (CONFIG, 2), (MHA, 3), (MHA, 4)])
def test_shards_put_back_together_are_the_checkpoint(config: ModelConfig, size: int) -> None:
    full = checkpoint(config)
    shards = [
        dict(shard_weights(full.items(), config, TensorParallel(r, size))) for r in range(size)
    ]
    for name, tensor in full.items():
        parts = [s[name] for s in shards]
        if "o_proj.weight" in name or "down_proj.weight" in name:
            assert torch.equal(torch.cat(parts, dim=1), tensor)
        elif name.endswith(("o_proj.bias", "down_proj.bias")):  # summed once after the reduce
            assert torch.equal(torch.stack(parts).sum(0), tensor)
            assert torch.equal(parts[0], tensor)
        elif "layers" not in name:  # replicated
            assert all(torch.equal(part, tensor) for part in parts)
        elif ("k_proj" in name or "v_proj" in name) and size > config.num_kv_heads:
            assert all(part.shape[1:] == tensor.shape[1:] for part in parts)  # copied KV heads
        else:
            assert torch.equal(torch.cat(parts), tensor)
    configs = [rank_config(config, TensorParallel(r, size)) for r in range(size)]
    assert sum(c.num_heads for c in configs) == config.num_heads
    assert sum(c.intermediate_size for c in configs) == config.intermediate_size


def test_each_rank_keeps_whole_head_groups_or_copies_one_kv_head() -> None:
    assert head_spans(CONFIG, TensorParallel(0, 2)) == ((0, 3), (0, 1))
    assert head_spans(CONFIG, TensorParallel(1, 2)) == ((3, 6), (1, 2))
    mqa = dataclasses.replace(CONFIG, num_heads=3, num_kv_heads=1)
    assert head_spans(mqa, TensorParallel(0, 2)) == ((0, 1), (0, 1))
    assert head_spans(mqa, TensorParallel(1, 2)) == ((1, 3), (0, 1))
    assert widest_rank_kv_heads(CONFIG, 2) == 1 and widest_rank_kv_heads(CONFIG, 1) == 2


def test_impossible_splits_are_refused() -> None:
    with pytest.raises(ValueError, match="splits the 6 query heads"):
        head_spans(dataclasses.replace(CONFIG, num_kv_heads=3), TensorParallel(1, 4))
    with pytest.raises(ValueError, match="cannot be split over 8 ranks"):
        head_spans(CONFIG, TensorParallel(0, 8))
