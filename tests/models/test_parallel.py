"""Tensor-parallel sharding (models/parallel.py) without processes: the ranks' shards put back
together are the checkpoint's tensors, heads map onto KV heads in equal groups on every rank,
row-parallel biases are kept once, splits that cannot work are refused, and the vocabulary-
parallel embedding and LM head (ranks as threads, tests/models/tp_threads.py) give exactly the
one-rank results over uneven vocabulary splits, up to a whole model's greedy generation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from models import load_model
from models.config import ModelConfig
from models.parallel import (
    TensorInMemory,
    TensorParallel,
    VocabParallelEmbedding,
    head_spans,
    rank_config,
    shard_weights,
    widest_rank_kv_heads,
)
from tests.fixtures.checkpoints import make_qwen2_checkpoint
from tests.models.paged_runner import greedy_generate
from tests.models.tp_threads import run_ranks

CONFIG = ModelConfig(
    architecture="qwen2",
    vocab_size=11,  # split unevenly over 2, 3 and 4 ranks
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
        "model.layers.0.input_layernorm.weight": (h,),
        "model.embed_tokens.weight": (config.vocab_size, h),
        "lm_head.weight": (config.vocab_size, h),
        "visual.blocks.0.mlp.gate_proj.weight": (8, 4),  # the vision tower is replicated
    }
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


MHA = dataclasses.replace(CONFIG, num_kv_heads=6)


@pytest.mark.parametrize(("config", "size"), [(CONFIG, 1), (CONFIG, 2), (MHA, 3), (MHA, 4)])
def test_shards_put_back_together_are_the_checkpoint(config: ModelConfig, size: int) -> None:
    full = checkpoint(config)
    lazy = [(name, TensorInMemory(tensor)) for name, tensor in full.items()]
    shards = [dict(shard_weights(lazy, config, TensorParallel(r, size))) for r in range(size)]
    for name, tensor in full.items():
        parts = [s[name] for s in shards]
        if "o_proj.weight" in name or "down_proj.weight" in name:
            assert torch.equal(torch.cat(parts, dim=1), tensor)
        elif name.endswith(("o_proj.bias", "down_proj.bias")):  # summed once after the reduce
            assert torch.equal(torch.stack(parts).sum(0), tensor)
            assert torch.equal(parts[0], tensor)
        elif "layernorm" in name or "visual" in name:  # replicated
            assert all(torch.equal(part, tensor) for part in parts)
        elif ("k_proj" in name or "v_proj" in name) and size > config.num_kv_heads:
            assert all(part.shape[1:] == tensor.shape[1:] for part in parts)  # copied KV heads
        else:  # q/k/v and gate/up rows, the embedding's and LM head's vocabulary rows
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_vocab_parallel_embedding_and_head_equal_one_rank(size: int, dtype: torch.dtype) -> None:
    vocab, hidden = CONFIG.vocab_size, CONFIG.hidden_size
    # small integers: every product and sum is exact, whatever order the matmul adds in
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(-3, 4, (vocab, hidden), generator=g).to(dtype)
    ids = torch.tensor([3, 0, 10, 5, 5, 7, 1, 9, 2, 4, 6, 8])  # every id, some twice
    rows = torch.randint(-3, 4, (4, hidden), generator=g).to(dtype)

    def rank(tp: TensorParallel) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = tp.span(vocab)
        embed = VocabParallelEmbedding((lo, hi), hidden, tp.reduce).to(dtype)
        embed.weight.data.copy_(weight[lo:hi])
        return embed(ids), tp.gather_columns(rows @ embed.weight.T, vocab)

    for embeddings, logits in run_ranks(size, rank):
        assert torch.equal(embeddings, weight[ids])
        assert torch.equal(logits, rows @ weight.T)


def test_one_rank_gathers_nothing() -> None:
    x = torch.randn(2, 5)
    assert TensorParallel().gather_columns(x, 5) is x


@pytest.fixture(scope="module", params=["untied", "tied"])
def odd_vocab_checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A tiny Qwen2 with 101 tokens: 50 / 51 over 2 ranks, 33 / 34 / 34 over 3."""
    tied = request.param == "tied"
    return make_qwen2_checkpoint(
        tmp_path_factory.mktemp(request.param) / "ckpt", vocab_size=101, tie_word_embeddings=tied
    )


@pytest.mark.parametrize("size", [2, 3])
def test_vocab_parallel_model_equals_one_rank(odd_vocab_checkpoint: Path, size: int) -> None:
    """Each rank holds only its vocabulary rows (tied: embedding and head one tensor), yet its
    `embed` equals one rank's exactly, its `compute_logits` spans the whole vocabulary (equal
    up to the matmul's summation order over a narrower head) and greedy generation is the same."""
    cpu = torch.device("cpu")
    whole = load_model(str(odd_vocab_checkpoint), cpu, torch.float32)
    ids = torch.arange(101).flip(0)
    hidden = torch.randn(5, whole.config.hidden_size, generator=torch.Generator().manual_seed(2))
    prompts = [[7, 100, 3, 50, 51, 33, 34, 0], [99, 66, 67]]
    embeddings, logits = whole.embed(ids), whole.compute_logits(hidden)
    expected = greedy_generate(whole, prompts, 6)[0]  # packs the linears for the CPU

    def rank(tp: TensorParallel) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        model = load_model(str(odd_vocab_checkpoint), cpu, torch.float32, tp)
        lo, hi = tp.span(101)
        assert model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == hi - lo
        tied = model.config.tie_word_embeddings
        assert (model.lm_head.weight is model.embed_tokens.weight) == tied
        return model.embed(ids), model.compute_logits(hidden), greedy_generate(model, prompts, 6)[0]

    for rank_embeddings, rank_logits, greedy in run_ranks(size, rank):
        assert torch.equal(rank_embeddings, embeddings)
        torch.testing.assert_close(rank_logits, logits, rtol=0, atol=1e-5)
        assert greedy == expected
