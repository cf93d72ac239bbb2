"""Tensor parallelism inside the decoder: which heads, MLP columns and vocabulary rows a rank holds,
the part of each checkpoint tensor it reads, and the collectives that complete its products.

The loaders build a rank's model from `rank_config` (its share of the query heads, KV heads and
MLP width; build_empty then gives it its vocabulary rows) and read checkpoint tensors through
`shard_weights`, which asks each lazy tensor for the rank's rows or columns only; the executor
hands in the collectives (actors/execution/tp_group.py). q/k/v and gate/up stay fused per rank;
o_proj and down_proj are row-parallel, so each rank's output is a partial sum that `reduce`
completes (their biases are kept by rank 0 only). The embedding and the LM head are split by
vocabulary rows: a rank's embedding gives zero rows for ids outside its span and `reduce` sums
them; its LM head gives the logits of its span and `gather_columns` assembles every rank's into
the whole vocabulary's, on every rank (each samples the same tokens). Norms and the vision tower
are replicated on every rank.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig

# Text-layer projections by HF name; the vision tower's names never contain "layers.N.".
LAYER_TENSOR = re.compile(r"(?:^|\.)layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)$")
# The vocabulary-row tensors (plain LLM and VLM layouts).
VOCAB_TENSOR = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head)\.weight$")

Span = tuple[int, int]  # [lo, hi)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _alone(x: torch.Tensor) -> list[torch.Tensor]:
    return [x]


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in a tensor-parallel group. `reduce` sums a tensor over the group in place
    and returns it; `gather` returns every rank's tensor of one shape, in rank order (both
    torch.distributed collectives, set by the executor)."""

    rank: int = 0
    size: int = 1
    reduce: Callable[[torch.Tensor], torch.Tensor] = _identity
    gather: Callable[[torch.Tensor], list[torch.Tensor]] = _alone

    def span(self, n: int) -> Span:
        """This rank's [lo, hi) of n units split as evenly as possible (later ranks get more)."""
        return (self.rank * n) // self.size, ((self.rank + 1) * n) // self.size

    def gather_columns(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The [..., n] tensor whose columns `span(n)` this rank holds as x, from every rank's x.
        Spans may differ in width by one; each is padded to the widest, gathered and trimmed."""
        if self.size == 1:
            return x
        widths = [
            hi - lo for lo, hi in (TensorParallel(r, self.size).span(n) for r in range(self.size))
        ]
        padded = F.pad(x, (0, max(widths) - x.shape[-1])).contiguous()
        parts = self.gather(padded)
        return torch.cat([part[..., :w] for part, w in zip(parts, widths, strict=True)], dim=-1)


class VocabParallelEmbedding(nn.Embedding):
    """An embedding of the vocabulary rows [lo, hi): ids outside them give zero rows, which
    `reduce` (the sum over the ranks, each holding other rows) turns into the whole embedding's."""

    def __init__(
        self, rows: Span, dim: int, reduce: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__(rows[1] - rows[0], dim)
        self.lo, self.hi = rows
        self.reduce = reduce

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.lo
        outside = (local < 0) | (local >= self.hi - self.lo)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.reduce(rows.masked_fill(outside.unsqueeze(-1), 0))


class CheckpointTensor(Protocol):
    """A checkpoint tensor not read yet (HF layout): `read` returns its rows [lo, hi), or of a
    2-D tensor its columns [lo, hi), or (neither given) all of it."""

    def read(self, rows: Span | None = None, columns: Span | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class TensorInMemory:
    """A CheckpointTensor already in memory (a converted tensor, a test's)."""

    tensor: torch.Tensor

    def read(self, rows: Span | None = None, columns: Span | None = None) -> torch.Tensor:
        if rows is not None:
            return self.tensor[rows[0] : rows[1]]
        return self.tensor if columns is None else self.tensor[:, columns[0] : columns[1]]


def head_spans(config: ModelConfig, tp: TensorParallel) -> tuple[Span, Span]:
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
    """The model config a rank builds: its query heads, KV heads and MLP columns. The vocabulary
    stays whole here (the logits a rank samples from span it); Decoder.shard_vocab splits it."""
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
    weights: Iterable[tuple[str, CheckpointTensor]], config: ModelConfig, tp: TensorParallel
) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors (HF names, full `config` shapes) read as this rank's share: each lazy
    tensor is asked for the rank's rows or columns only. One rank reads every tensor whole."""
    if tp.size == 1:
        for name, tensor in weights:
            yield name, tensor.read()
        return
    (q_lo, q_hi), (kv_lo, kv_hi) = head_spans(config, tp)
    i_span = tp.span(config.intermediate_size)
    d = config.head_dim
    rows = {
        "q_proj": (q_lo * d, q_hi * d),
        "k_proj": (kv_lo * d, kv_hi * d),
        "v_proj": (kv_lo * d, kv_hi * d),
        "gate_proj": i_span,
        "up_proj": i_span,
    }
    columns = {"o_proj": (q_lo * d, q_hi * d), "down_proj": i_span}
    for name, tensor in weights:
        match = LAYER_TENSOR.search(name)
        if match is None:
            vocab = VOCAB_TENSOR.search(name) is not None
            yield name, tensor.read(rows=tp.span(config.vocab_size) if vocab else None)
            continue
        proj, kind = match.groups()
        if proj in rows:
            yield name, tensor.read(rows=rows[proj])
        elif proj in columns and kind == "weight":
            yield name, tensor.read(columns=columns[proj])
        elif proj in columns:  # a row-parallel bias is added once, after the sum
            bias = tensor.read()
            yield name, bias if tp.rank == 0 else torch.zeros_like(bias)
        else:
            yield name, tensor.read()
