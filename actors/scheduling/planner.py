"""Step planning: continuous batching under one token budget, chunked prefill, prefix reuse,
preemption by recompute, and overlapped scheduling. Pure Python; the scheduler stage wraps it.

Overlap: step N+1 is planned while step N runs. A request whose step-N chunk samples (a decode, or
a prompt's last chunk) is assumed to go on: its next decode is planned at the position after step
N, before step N's token is known (the executor reads that token from its own state). At most
`max_steps_in_flight` plans are out; results come back in plan order and are applied by `apply`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from actors.scheduling.block_pool import BlockPool, block_hash
from actors.scheduling.request_state import RequestState
from protocols.messages import EngineRequest, ScheduledSequence, StepPlan, StepResult, TokenDelta


@dataclass
class PlannerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    max_steps_in_flight: int = 2  # 1: no overlap, each plan waits for the previous result


@dataclass
class StepStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0


@dataclass
class Finished:
    state: RequestState
    reason: str  # "stop" | "length" | "error"
    stop_reason: int | str | None = None


@dataclass
class Update:
    """What one step's result produced: a delta per sampled token, and the requests it ended."""

    deltas: list[tuple[RequestState, TokenDelta]] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)


@dataclass
class Planned:
    """One sequence of a step in flight, as planned: whose, in which epoch, up to where."""

    state: RequestState
    epoch: int  # the request's num_preemptions when planned: a preemption voids the progress
    end: int  # start_pos + num_tokens
    sample: bool


@dataclass
class StepInFlight:
    step_id: int
    planned: list[Planned]


class Planner:
    def __init__(self, pool: BlockPool, limits: PlannerLimits) -> None:
        self.pool = pool
        self.limits = limits
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.requests: dict[str, RequestState] = {}
        self.in_flight: deque[StepInFlight] = deque()  # plans sent, results not yet applied
        self.to_finish: list[str] = []  # ended requests the executor may hold: next plan
        self.step_id = 0
        self.stats = StepStats()

    # ---------------------------------------------------------------- admission and end
    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.pool.block_size)

    def add(self, request: EngineRequest) -> RequestState:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} is already scheduled")
        state = RequestState(request)
        self.requests[request.request_id] = state
        self.waiting.append(state)
        return state

    def abort(self, request_id: str) -> RequestState | None:
        """End a request now; None (and nothing done) for a request this planner does not know."""
        state = self.requests.get(request_id)
        if state is not None:
            self._finish(state)
        return state

    def _finish(self, state: RequestState) -> None:
        """End a request and give its blocks back at once, even while a step that writes them is
        in flight (the decode planned before its stop was known, or any step when aborted).

        Safe because the executor runs plans in order: a later plan that gets these blocks runs
        after that step's writes, and its request reads only positions it wrote itself or blocks
        of the prefix cache. A step in flight never writes a cached block: blocks are hashed only
        when a result confirms their KV, and a step writes only past its request's progress."""
        del self.requests[state.request_id]
        if state in self.running:
            self.running.remove(state)
        else:
            self.waiting.remove(state)
        self._release(state)
        state.finished = True
        if state.sent or state.request.images:  # executor state or pixels to drop
            self.to_finish.append(state.request_id)

    def _release(self, state: RequestState) -> None:
        self.pool.release(state.block_ids)
        state.block_ids = []
        state.block_hashes = []
        state.num_computed = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- planning
    def schedule(self) -> StepPlan | None:
        """The next step's plan; None when there is nothing to send or enough plans are out.

        A plan with no sequences only carries finished_ids (the executor sends no result)."""
        if len(self.in_flight) >= self.limits.max_steps_in_flight:
            return None
        budget = self.limits.max_num_batched_tokens
        chosen: list[tuple[RequestState, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            state = self.running[i]
            n = self._chunk(state, budget)
            if n == 0:
                i += 1
                continue
            while not self._grow(state, n):
                victim = self.running[-1]  # the newest; never one already chosen (index >= i)
                self._preempt(victim)
                if victim is state:
                    n = 0
                    break
            if n == 0:
                break
            chosen.append((state, n))
            budget -= n
            i += 1
        new: list[EngineRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.limits.max_num_seqs:
            state = self.waiting[0]
            if state.num_pending:
                break  # preempted while its step ran: that step's token comes first
            if not state.block_ids:
                self._reuse_prefix(state)
            n = self._chunk(state, budget)
            if n == 0 or not self._grow(state, n):
                self._release(state)  # hold no blocks while waiting
                break
            self.waiting.popleft()
            self.running.append(state)
            if state.scheduled_time is None:
                state.scheduled_time = time.time()
            if not state.sent:  # the first time it runs; a preempted request is not re-sent
                state.sent = True
                new.append(state.request)
            chosen.append((state, n))
            budget -= n
        finished, self.to_finish = self.to_finish, []
        if not chosen:
            return StepPlan(-1, [], [], finished) if finished else None
        self.step_id += 1
        seqs, planned = [], []
        for state, n in chosen:
            start = state.num_computed
            sample = start + n == state.num_tokens + state.num_pending
            seqs.append(
                ScheduledSequence(state.request_id, start, n, list(state.block_ids), sample)
            )
            planned.append(Planned(state, state.num_preemptions, start + n, sample))
            state.num_computed += n
            state.num_pending += sample
            if start < state.num_prompt_tokens:
                self.stats.prompt_tokens += min(n, state.num_prompt_tokens - start)
        self.in_flight.append(StepInFlight(self.step_id, planned))
        return StepPlan(self.step_id, seqs, new, finished)

    def _chunk(self, state: RequestState, budget: int) -> int:
        """How many of its tokens `state` runs next within `budget`; 0: it sits this step out.

        Its tokens are the known ones plus one per sampling step in flight. It never samples
        past its length limit: with that many tokens pending it waits for their results."""
        remaining = state.num_tokens + state.num_pending - state.num_computed
        n_out = len(state.output_token_ids) + state.num_pending
        if remaining <= 0 or state.at_length(n_out, self.limits.max_model_len):
            return 0
        n = min(remaining, budget)
        if n < remaining and not self.limits.enable_chunked_prefill:
            return 0
        return n

    def _grow(self, state: RequestState, n: int) -> bool:
        need = self.blocks_needed(state.num_computed + n) - len(state.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        state.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, state: RequestState) -> None:
        """Recompute later: blocks and KV progress go, executor state stays (see _finish on why
        releasing blocks a step in flight still writes is safe)."""
        self.running.remove(state)
        self._release(state)
        state.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(state)

    def _reuse_prefix(self, state: RequestState) -> None:
        """Take cached blocks for the longest hashed prefix; one token is always left to run.
        A request that asked prompt_logprobs takes none: each prompt position must run."""
        if state.prompt_logprobs is not None:
            return
        bs = self.pool.block_size
        full = (state.num_tokens - 1) // bs
        parent = None
        hits: list[int] = []
        for b in range(full):
            h = block_hash(
                parent, state.tokens(b * bs, (b + 1) * bs), state.image_keys(b * bs, (b + 1) * bs)
            )
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
            state.block_hashes.append(h)
            parent = h
        for block in hits:
            self.pool.share(block)
        state.block_ids = hits
        state.num_computed = len(hits) * bs
        if not state.sent:
            state.num_cached_tokens = state.num_computed
            self.pool.record_lookup(state.num_prompt_tokens, state.num_computed)

    def _cache_full_blocks(self, state: RequestState, upto: int) -> None:
        """Hash the blocks a result confirmed full (KV of positions [0, upto) is computed)."""
        bs = self.pool.block_size
        while len(state.block_hashes) < upto // bs:
            b = len(state.block_hashes)
            parent = state.block_hashes[-1] if state.block_hashes else None
            h = block_hash(
                parent, state.tokens(b * bs, (b + 1) * bs), state.image_keys(b * bs, (b + 1) * bs)
            )
            state.block_hashes.append(h)
            self.pool.mark_cached(state.block_ids[b], h)

    # ---------------------------------------------------------------- results
    def apply(self, result: StepResult) -> Update:
        """Apply the oldest step in flight: confirm its KV, append its tokens, apply stop rules.

        A request that ended while the step ran (aborted, or stopped by the step before, when
        this decode was planned without knowing) has its token dropped. A request preempted
        while the step ran keeps its token: the executor appended it to its own state."""
        step = self.in_flight.popleft()
        if step.step_id != result.step_id:
            raise RuntimeError(f"result of step {result.step_id}, expected {step.step_id}")
        out = Update()
        for part in result.prompt_logprobs:
            owner = self.requests.get(part.request_id)
            if owner is not None:
                owner.add_prompt_logprobs(part)
        tokens = {s.request_id: s for s in result.sampled}
        now = time.time()
        for p in step.planned:
            state = p.state
            if state.finished:
                continue
            if result.error is not None:
                self._end(state, out, "error")
                continue
            if p.epoch == state.num_preemptions:
                self._cache_full_blocks(state, p.end)
            if not p.sample:
                continue
            state.num_pending -= 1
            s = tokens.get(state.request_id)
            if s is None:  # the executor sampled nothing for it: its token streams disagree
                self._end(state, out, "error")
                continue
            state.output_token_ids.append(s.token_id)
            self.stats.generation_tokens += 1
            if state.first_token_time is None:
                state.first_token_time = now
            reason, stop_reason = state.check_stop(s.token_id, self.limits.max_model_len)
            delta = TokenDelta(
                request_id=state.request_id,
                token_ids=[s.token_id],
                logprobs=[s.logprobs] if s.logprobs is not None else None,
                finish_reason=reason,
                stop_reason=stop_reason,
                prompt_tokens=state.num_prompt_tokens,
                cached_tokens=state.num_cached_tokens,
            )
            if state.prompt_logprobs is not None:  # the first delta carries them, once
                delta.prompt_logprobs, state.prompt_logprobs = state.prompt_logprobs, None
                delta.prompt_token_ids = list(state.request.prompt_token_ids)
            out.deltas.append((state, delta))
            if reason is not None:
                self._end(state, out, reason, stop_reason)
        return out

    def _end(
        self, state: RequestState, out: Update, reason: str, stop_reason: int | str | None = None
    ) -> None:
        out.finished.append(Finished(state, reason, stop_reason))
        self._finish(state)
