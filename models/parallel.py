"""Tensor parallelism inside the decoder: which heads and MLP columns a rank holds, the slice of
each checkpoint tensor it loads, and the sum over ranks after each row-parallel product.

The loaders build a rank's model from `rank_config` (its share of the query heads, KV heads and
MLP width) and pass checkpoint tensors through `shard_weights`; the executor hands in the
all-reduce. Embeddings, norms, the LM head and the vision tower are replicated on every rank.
q/k/v and gate/up stay fused per rank; o_proj and down_proj are row-parallel, so each rank's
output is a partial sum that `reduce` completes (their biases are kept by rank 0 only).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from models.config import ModelConfig

# Text-layer projections by HF name; the vision tower's names never contain "layers.N.".
LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in a tensor-parallel group; `reduce` sums a tensor over the group in place
    and returns it (torch.distributed's all_reduce, set by the executor)."""

    rank: int = 0
    size: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity

    def span(self, n: int) -> tuple[int, int]:
        """This rank's [lo, hi) of n units split as evenly as possible (earlier ranks get more)."""
        return (self.rank * n) // self.size, ((self.rank + 1) * n) // self.size


def head_spans(config: ModelConfig, tp: TensorParallel) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query heads, KV heads) of this rank. Query heads are split as evenly as possible; a rank
    holds the KV heads its query heads read (copies of them when ranks outnumber KV heads).
    Raises ValueError when a rank's query heads would not map onto its KV heads in equal groups."""
    group = config.num_heads // config.num_kv_heads
    q_lo, q_hi = tp.span(config.num_heads)
    if q_lo == q_hi:
        raise ValueError(f"{config.num_heads} attention heads cannot be split over {tp.size} ranks")
    kv_lo, kv_hi = q_lo // group, (q_hi - 1) // group + 1
    if kv_hi - kv_lo > 1 and (q_lo % group or q_hi % group):
        raise ValueError(
            f"tensor parallel size {tp.size} splits the {config.num_heads} query heads across "
            f"their {config.num_kv_heads} KV heads unevenly (rank {tp.rank}: query heads "
            f"{q_lo}-{q_hi - 1}); choose a size that divides the heads"
        )
    return (q_lo, q_hi), (kv_lo, kv_hi)


def widest_rank_kv_heads(config: ModelConfig, size: int) -> int:
    """The most KV heads any rank of `size` holds: every rank sizes its KV pool for this many,
    so all ranks hold the same number of blocks (the scheduler hands out one block table)."""
    return max(
        kv_hi - kv_lo
        for _, (kv_lo, kv_hi) in (head_spans(config, TensorParallel(r, size)) for r in range(size))
    )


def rank_config(config: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The model config a rank builds: its query heads, KV heads and MLP columns."""
    if tp.size == 1:
        return config
    (q_lo, q_hi), (kv_lo, kv_hi) = head_spans(config, tp)
    i_lo, i_hi = tp.span(config.intermediate_size)
    return dataclasses.replace(
        config,
        num_heads=q_hi - q_lo,
        num_kv_heads=kv_hi - kv_lo,
        intermediate_size=i_hi - i_lo,
    )


def shard_weights(
    weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig, tp: TensorParallel
) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors (HF names, full `config` shapes) cut to this rank's share."""
    if tp.size == 1:
        yield from weights
        return
    (q_lo, q_hi), (kv_lo, kv_hi) = head_spans(config, tp)
    i_lo, i_hi = tp.span(config.intermediate_size)
    d = config.head_dim
    rows = {
        "q_proj": (q_lo * d, q_hi * d),
        "k_proj": (kv_lo * d, kv_hi * d),
        "v_proj": (kv_lo * d, kv_hi * d),
        "gate_proj": (i_lo, i_hi),
        "up_proj": (i_lo, i_hi),
    }
    columns = {"o_proj": (q_lo * d, q_hi * d), "down_proj": (i_lo, i_hi)}
    for name, tensor in weights:
        match = LAYER_TENSOR.search(name)
        if match is None:
            yield name, tensor
            continue
        proj, kind = match.groups()
        if proj in rows:
            lo, hi = rows[proj]
            yield name, tensor[lo:hi]
        elif proj in columns and kind == "weight":
            lo, hi = columns[proj]
            yield name, tensor[:, lo:hi]
        elif proj in columns:  # a row-parallel bias is added once, after the sum
            yield name, tensor if tp.rank == 0 else torch.zeros_like(tensor)
        else:
            yield name, tensor
