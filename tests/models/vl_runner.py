"""A minimal paged loop for Qwen2.5-VL tests: image rows spliced into the embeddings, M-RoPE.
Drives models.Qwen2_5_VLModel as the executor does (chunked prefill, mixed batches), no actors."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from models import AttentionMetadata, allocate_kv_cache
from models.mrope import mrope_positions
from models.qwen2_5_vl import Qwen2_5_VLModel
from tests.models.paged_runner import record_step


@dataclass
class VLPrompt:
    """A prompt with its placeholders expanded, and each image's pixel patches and grid."""

    ids: list[int]
    images: list[tuple[torch.Tensor, tuple[int, int, int]]] = field(default_factory=list)


@dataclass
class _Seq:
    prompt: list[int]
    blocks: list[int]
    image_rows: torch.Tensor  # [n_image_tokens, H]: every image's embeddings, in prompt order
    image_ordinal: torch.Tensor  # [L]: index into image_rows of each prompt token
    positions: torch.Tensor  # [3, L]
    delta: int
    computed: int = 0
    output: list[int] = field(default_factory=list)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


def _prepare(model: Qwen2_5_VLModel, prompt: VLPrompt, blocks: list[int]) -> _Seq:
    c = model.config
    assert c.image_token_id is not None and c.spatial_merge_size is not None
    grids = [grid for _, grid in prompt.images]
    pos, delta = mrope_positions(prompt.ids, grids, c.image_token_id, c.spatial_merge_size)
    embeds = [model.encode_image(pixels, grid) for pixels, grid in prompt.images]
    rows = torch.cat(embeds) if embeds else torch.empty(0, c.hidden_size)
    is_image = torch.tensor(prompt.ids) == c.image_token_id
    ordinal = torch.cumsum(is_image.long(), 0) - 1
    return _Seq(list(prompt.ids), blocks, rows, ordinal, torch.from_numpy(pos), delta)


@torch.no_grad()
def vl_greedy_generate(
    model: Qwen2_5_VLModel,
    prompts: list[VLPrompt],
    max_new_tokens: int,
    block_size: int = 4,
    prefill_chunk: int | None = None,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Runs all prompts together; returns per prompt (greedy output ids, prompt logits [L, V]).

    Each step packs every sequence's next prompt chunk (all of it when prefill_chunk is None) or
    its last sampled token. Prefill rows of image tokens take the matching rows of the image's
    embedding, so a chunk boundary may cut an image; decode positions are index + delta.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    need = [-(-(len(p.ids) + max_new_tokens) // block_size) for p in prompts]
    free = list(range(sum(need)))
    random.Random(0).shuffle(free)
    seqs = []
    for prompt, n in zip(prompts, need, strict=True):
        seqs.append(_prepare(model, prompt, free[:n]))
        free = free[n:]
    kv = allocate_kv_cache(model.config, sum(need), block_size, device, dtype)
    image_id = model.config.image_token_id

    while any(len(s.output) < max_new_tokens for s in seqs):
        active = [s for s in seqs if len(s.output) < max_new_tokens]
        ids: list[int] = []
        pos_parts: list[torch.Tensor] = []
        embed_parts: list[torch.Tensor] = []
        qlens: list[int] = []
        for s in active:
            remaining = len(s.tokens) - s.computed
            n = remaining if prefill_chunk is None else min(remaining, prefill_chunk)
            start, end = s.computed, s.computed + n
            chunk = torch.tensor(s.tokens[start:end])
            ids += chunk.tolist()
            in_prompt = max(0, min(end, len(s.prompt)) - start)
            decode_pos = torch.arange(start + in_prompt, end) + s.delta
            pos_parts.append(
                torch.cat([s.positions[:, start : start + in_prompt], decode_pos.expand(3, -1)], 1)
            )
            rows = model.embed(chunk.to(device))
            mask = (chunk == image_id).to(device)
            if bool(mask.any()):
                rows[mask] = s.image_rows[s.image_ordinal[start:end][mask.cpu()]].to(rows)
            embed_parts.append(rows)
            qlens.append(n)
        meta = AttentionMetadata.build(
            qlens, [s.computed for s in active], [s.blocks for s in active], block_size, device
        )
        hidden = model(
            torch.tensor(ids, device=device),
            torch.cat(pos_parts, 1).to(device),
            meta,
            kv,
            inputs_embeds=torch.cat(embed_parts),
        )
        record_step(model, hidden, active, qlens)
    return [s.output for s in seqs], [torch.cat(s.prompt_logits) for s in seqs]
