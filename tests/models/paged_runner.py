"""A minimal scheduler for tests: StepPlans with random non-contiguous block tables and chunked
prefill mixed with decodes, run through the product ModelRunner (actors/execution); no actors."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from actors.execution import KVPool, ModelRunner
from devices import Platform, get_platform
from models.decoder import Decoder
from protocols.messages import (
    EngineRequest,
    ImagePixels,
    SamplingParams,
    ScheduledSequence,
    StepPlan,
)


def paged_runner(
    model: Decoder,
    num_blocks: int,
    block_size: int = 4,
    *,
    enforce_eager: bool = False,
    platform: Platform | None = None,
) -> ModelRunner:
    """A runner around an already loaded model, on the platform of the model's device (CPU, or
    CUDA with recorded decode steps unless enforce_eager), with a pool of `num_blocks` blocks."""
    max_len = model.config.max_position_embeddings
    platform = platform or get_platform(model.embed_tokens.weight.device.type)
    pool = KVPool(num_blocks, block_size, max_len)
    return ModelRunner(model, platform, pool, max_num_seqs=8, enforce_eager=enforce_eager)


def greedy_request(
    request_id: str, prompt: list[int], max_new_tokens: int, **sampling: object
) -> EngineRequest:
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    for name, value in sampling.items():
        setattr(params, name, value)
    return EngineRequest(request_id, list(prompt), params, max_new_tokens)


@dataclass
class Job:
    """One request as this test scheduler tracks it."""

    request: EngineRequest
    blocks: list[int]
    computed: int = 0  # tokens already in the KV cache
    sent: bool = False  # its EngineRequest went out in a plan's new_requests
    output: list[int] = field(default_factory=list)
    prompt_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output)

    def next_chunk(self, prefill_chunk: int | None) -> ScheduledSequence:
        """Its next prompt chunk (the rest of the prompt when prefill_chunk is None) or decode."""
        remaining = self.num_tokens - self.computed
        n = remaining if prefill_chunk is None else min(remaining, prefill_chunk)
        end = self.computed + n
        rid = self.request.request_id
        return ScheduledSequence(rid, self.computed, n, self.blocks, end == self.num_tokens)


def block_tables(lengths: list[int], block_size: int, shuffle: bool = True) -> list[list[int]]:
    """Enough blocks for each length, drawn from one shuffled pool (non-contiguous tables)."""
    need = [-(-n // block_size) for n in lengths]
    free = list(range(sum(need)))
    if shuffle:
        random.Random(0).shuffle(free)
    tables = []
    for n in need:
        tables.append(free[:n])
        free = free[n:]
    return tables


def run_plans(
    runner: ModelRunner,
    requests: list[EngineRequest],
    max_new_tokens: int,
    prefill_chunk: int | None = None,
    pixels: dict[str, list[ImagePixels]] | None = None,
    shuffle_blocks: bool = True,
) -> list[Job]:
    """Runs all requests together until each has max_new_tokens, then finishes them.

    Every step packs, for each unfinished request, its next prompt chunk or its decode token,
    so chunked steps mix prefill and decode. A request's pixels (`pixels[request_id]`) are
    handed to the runner only after it reported them missing for the plan that first runs it.
    """
    lengths = [len(r.prompt_token_ids) + max_new_tokens for r in requests]
    tables = block_tables(lengths, runner.pool.block_size, shuffle_blocks)
    jobs = [Job(r, t) for r, t in zip(requests, tables, strict=True)]
    finished: list[str] = []
    step = 0
    while any(len(j.output) < max_new_tokens for j in jobs):
        active = [j for j in jobs if len(j.output) < max_new_tokens]
        seqs = [j.next_chunk(prefill_chunk) for j in active]
        new = [j.request for j in active if not j.sent]
        plan = StepPlan(step, seqs, new, finished)
        _deliver_pixels(runner, plan, pixels or {})
        sampled, hidden = runner.execute_with_hidden(plan)
        assert hidden is not None
        by_id = {t.request_id: t.token_id for t in sampled}
        assert len(by_id) == len(sampled) == sum(s.sample for s in seqs)
        row = 0
        for j, s in zip(active, seqs, strict=True):
            j.sent = True
            rows = hidden[row : row + s.num_tokens]
            row += s.num_tokens
            in_prompt = max(0, min(s.num_tokens, len(j.request.prompt_token_ids) - j.computed))
            if in_prompt:
                j.prompt_logits.append(runner.model.compute_logits(rows[:in_prompt]))
            j.computed += s.num_tokens
            if s.sample:
                j.output.append(by_id[j.request.request_id])
                assert runner.requests[j.request.request_id].output_token_ids == j.output
        finished = [j.request.request_id for j in active if len(j.output) == max_new_tokens]
        step += 1
    runner.execute(StepPlan(step, [], [], finished))
    assert not runner.requests and len(runner.pixels) == 0
    return jobs


def _deliver_pixels(
    runner: ModelRunner, plan: StepPlan, pixels: dict[str, list[ImagePixels]]
) -> None:
    due = [p for r in plan.new_requests for p in pixels.get(r.request_id, [])]
    assert runner.missing_pixels(plan) == {p.content_hash for p in due}
    for p in due:
        runner.add_pixels(p)
    assert runner.missing_pixels(plan) == set()


def greedy_generate(
    model: Decoder,
    prompts: list[list[int]],
    max_new_tokens: int,
    block_size: int = 4,
    prefill_chunk: int | None = None,
    shuffle_blocks: bool = True,
    platform: Platform | None = None,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Runs all prompts together; returns per prompt (greedy output ids, prompt logits [L, V])."""
    requests = [greedy_request(f"r{i}", p, max_new_tokens) for i, p in enumerate(prompts)]
    blocks = sum(-(-(len(p) + max_new_tokens) // block_size) for p in prompts)
    runner = paged_runner(model, blocks, block_size, platform=platform)
    jobs = run_plans(runner, requests, max_new_tokens, prefill_chunk, None, shuffle_blocks)
    return [j.output for j in jobs], [torch.cat(j.prompt_logits) for j in jobs]
