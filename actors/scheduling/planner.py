"""Step planning: continuous batching under one token budget, chunked prefill, prefix reuse,
preemption by recompute. Pure Python; the scheduler actor wraps it with sockets.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from actors.scheduling.block_pool import BlockPool, block_hash
from actors.scheduling.request_state import RequestState
from protocols.messages import NewSequence, SampledToken, ScheduledSequence, StepPlan, TokenDelta


@dataclass
class PlannerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True


@dataclass
class StepStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0


@dataclass
class Finished:
    request: RequestState
    reason: str
    stop_reason: int | str | None = None


@dataclass
class Update:
    deltas: list[tuple[RequestState, TokenDelta]] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)


class Planner:
    def __init__(self, pool: BlockPool, limits: PlannerLimits) -> None:
        self.pool = pool
        self.limits = limits
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.requests: dict[str, RequestState] = {}
        self.to_forget: list[str] = []  # executor state to drop at the next step
        self.step_id = 0
        self.stats = StepStats()
        self.in_flight: dict[str, int] = {}  # request id -> tokens scheduled in the current step

    # ---------------------------------------------------------------- admission and abort
    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.pool.block_size)

    def add(self, req: RequestState) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> RequestState | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._free(req)
        return req

    def _free(self, req: RequestState) -> None:
        self.pool.release(req.block_ids)
        req.block_ids = []
        req.block_hashes = []
        req.num_computed = 0
        if req.on_executor:
            self.to_forget.append(req.request_id)
            req.on_executor = False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- planning
    def schedule(self) -> StepPlan | None:
        budget = self.limits.max_num_batched_tokens
        chosen: list[tuple[RequestState, int]] = []
        new: list[NewSequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self.limits.enable_chunked_prefill and n < req.num_tokens - req.num_computed:
                i += 1
                continue
            while not self._grow(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    n = 0
                    break
            if n == 0:
                break
            chosen.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            req = self.waiting[0]
            if not req.block_ids:
                self._reuse_prefix(req)
            remaining = req.num_tokens - req.num_computed
            n = min(remaining, budget)
            if (not self.limits.enable_chunked_prefill and n < remaining) or not self._grow(req, n):
                self._free(req)  # hold no blocks while waiting
                break
            self.waiting.popleft()
            self.running.append(req)
            if req.scheduled_time is None:
                req.scheduled_time = time.time()
            chosen.append((req, n))
            budget -= n
            if not req.on_executor:
                req.on_executor = True
                new.append(
                    NewSequence(
                        request_id=req.request_id,
                        prompt_token_ids=req.prompt_token_ids,
                        sampling=req.sampling,
                        eos_token_ids=req.eos_token_ids,
                        images=req.images,
                        mrope_positions=req.mrope_positions,
                        mrope_position_delta=req.mrope_position_delta,
                        output_token_ids=list(req.output_token_ids),
                    )
                )
        forget, self.to_forget = self.to_forget, []
        if not chosen:
            return StepPlan(-1, [], [], forget) if forget else None
        seqs = []
        self.in_flight = {}
        for req, n in chosen:
            start = req.num_computed
            seqs.append(
                ScheduledSequence(
                    request_id=req.request_id,
                    token_ids=req.tokens(start, start + n),
                    start_pos=start,
                    block_table=list(req.block_ids),
                    sample=start + n == req.num_tokens,
                )
            )
            self.in_flight[req.request_id] = n
            if start < len(req.prompt_token_ids):
                self.stats.prompt_tokens += min(n, len(req.prompt_token_ids) - start)
        self.step_id += 1
        return StepPlan(self.step_id, seqs, new, forget)

    def _grow(self, req: RequestState, n: int) -> bool:
        need = self.blocks_needed(req.num_computed + n) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: RequestState) -> None:
        self.running.remove(req)
        self._free(req)
        req.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def _reuse_prefix(self, req: RequestState) -> None:
        """Take cached blocks for the longest hashed prefix; one token is always left to run."""
        bs = self.pool.block_size
        full = (req.num_tokens - 1) // bs
        parent = None
        hits: list[int] = []
        for b in range(full):
            h = block_hash(
                parent, req.tokens(b * bs, (b + 1) * bs), req.image_keys(b * bs, (b + 1) * bs)
            )
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
            req.block_hashes.append(h)
            parent = h
        for block in hits:
            self.pool.share(block)
        req.block_ids = hits
        req.num_computed = len(hits) * bs
        if not req.on_executor and req.num_preemptions == 0:
            req.num_cached_tokens = req.num_computed
            self.pool.record_lookup(len(req.prompt_token_ids), req.num_computed)

    def _cache_full_blocks(self, req: RequestState) -> None:
        bs = self.pool.block_size
        while len(req.block_hashes) < req.num_computed // bs:
            b = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else None
            h = block_hash(
                parent, req.tokens(b * bs, (b + 1) * bs), req.image_keys(b * bs, (b + 1) * bs)
            )
            req.block_hashes.append(h)
            self.pool.mark_cached(req.block_ids[b], h)

    # ---------------------------------------------------------------- results
    def update(self, sampled: list[SampledToken]) -> Update:
        """Apply one step's results: advance progress, append tokens, apply stop rules."""
        out = Update()
        for rid, n in self.in_flight.items():
            req = self.requests.get(rid)
            if req is not None:
                req.num_computed += n
                self._cache_full_blocks(req)
        self.in_flight = {}
        now = time.time()
        for s in sampled:
            req = self.requests.get(s.request_id)
            if req is None:
                continue  # aborted while its step ran
            req.output_token_ids.append(s.token_id)
            self.stats.generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            reason, stop_reason = req.check_stop(s.token_id)
            if reason is None and req.num_tokens >= self.limits.max_model_len:
                reason = "length"
            delta = TokenDelta(
                request_id=req.request_id,
                token_ids=[s.token_id],
                logprobs=[s.logprobs] if s.logprobs is not None else None,
                finish_reason=reason,
                stop_reason=stop_reason,
                prompt_tokens=len(req.prompt_token_ids),
                cached_tokens=req.num_cached_tokens,
                sampling=None if req.announced else req.sampling,
                mm_info=None if req.announced else req.mm_info(),
            )
            req.announced = True
            out.deltas.append((req, delta))
            if reason is not None:
                out.finished.append(Finished(req, reason, stop_reason))
                self.abort(req.request_id)
        return out
