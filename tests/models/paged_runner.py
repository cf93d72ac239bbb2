"""A minimal paged engine loop for tests: block allocation, (chunked) prefill, batched greedy decode.
Drives models.Decoder exactly as the executor does, without the scheduler or any actors."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from models import AttentionMetadata, allocate_kv_cache
from models.decoder import Decoder


@dataclass
class Sequence:
    prompt: list[int]
    blocks: list[int]
    computed: int = 0  # tokens already in the KV cache
    output: list[int] = field(default_factory=list)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def greedy_generate(
    model: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    block_size: int = 4,
    prefill_chunk: int | None = None,
    shuffle_blocks: bool = True,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Runs all prompts together; returns per prompt (greedy output ids, prompt logits [L, V]).

    Every step packs, for each sequence, either its next prompt chunk (all of it when
    prefill_chunk is None) or its last sampled token, so chunked steps mix prefill and decode.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    need = [-(-(len(p) + max_new_tokens) // block_size) for p in prompts]
    free = list(range(sum(need)))
    if shuffle_blocks:  # non-contiguous tables exercise the slot arithmetic
        random.Random(0).shuffle(free)
    seqs = []
    for prompt, n in zip(prompts, need, strict=True):
        seqs.append(Sequence(prompt=list(prompt), blocks=free[:n]))
        free = free[n:]
    kv = allocate_kv_cache(model.config, sum(need), block_size, device, dtype)

    while any(len(s.output) < max_new_tokens for s in seqs):
        active = [s for s in seqs if len(s.output) < max_new_tokens]
        ids: list[int] = []
        positions: list[int] = []
        qlens: list[int] = []
        for s in active:
            remaining = len(s.tokens) - s.computed
            n = remaining if prefill_chunk is None else min(remaining, prefill_chunk)
            ids += s.tokens[s.computed : s.computed + n]
            positions += list(range(s.computed, s.computed + n))
            qlens.append(n)
        meta = AttentionMetadata.build(
            qlens, [s.computed for s in active], [s.blocks for s in active], block_size, device
        )
        with torch.no_grad():
            hidden = model(
                torch.tensor(ids, device=device), torch.tensor(positions, device=device), meta, kv
            )
            record_step(model, hidden, active, qlens)
    return [s.output for s in seqs], [torch.cat(s.prompt_logits) for s in seqs]


def record_step(model: Decoder, hidden: torch.Tensor, active: list, qlens: list[int]) -> None:
    """After one step: keep each sequence's prompt logits, advance it, take its greedy token."""
    offset = 0
    for s, n in zip(active, qlens, strict=True):
        rows = hidden[offset : offset + n]
        offset += n
        in_prompt = max(0, min(n, len(s.prompt) - s.computed))
        if in_prompt:
            s.prompt_logits.append(model.compute_logits(rows[:in_prompt]))
        s.computed += n
        if s.computed >= len(s.prompt):  # last row predicts the next token
            s.output.append(int(model.compute_logits(rows[-1:]).argmax(-1)))
