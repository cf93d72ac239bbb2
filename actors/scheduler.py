"""Scheduler stage: admits engine requests, plans each step, applies results and stop rules.

It owns the block tables; the executor owns the KV memory. One plan goes to every tensor-parallel
rank, the next one planned while the executor runs the last (see scheduling.planner); new tokens
go to the detokenizer replica that owns the request.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from actors import metrics
from actors.scheduling.block_pool import BlockPool
from actors.scheduling.planner import Finished, Planner, PlannerLimits
from actors.scheduling.request_state import RequestState
from actors.scheduling.step_times import StepTimes
from core.launch.addresses import owner
from protocols.messages import (
    AbortRequest,
    EngineRequest,
    ErrorInfo,
    RequestError,
    RequestMoved,
    StepResult,
    TokenBatch,
    TokenDelta,
)
from protocols.stage import Stage


class SchedulerActor(Stage):
    async def setup(self) -> dict[str, Any]:
        facts, c = self.facts, self.config
        self.pool = BlockPool(facts.num_blocks, facts.block_size, c.enable_prefix_caching)
        self.planner = Planner(
            self.pool,
            PlannerLimits(
                max_num_seqs=c.max_num_seqs,
                max_num_batched_tokens=max(c.max_num_batched_tokens, 1),
                max_model_len=facts.max_model_len,
                enable_chunked_prefill=c.enable_chunked_prefill,
            ),
        )
        a = self.addresses
        self.inbox = self.transport.mailbox(a.scheduler)
        self.results = self.transport.mailbox(a.results)
        self.plans = [self.transport.outbox(addr, bind=True) for addr in a.plans]
        self.detoks = [self.transport.outbox(addr) for addr in a.detokenizers]
        self.to_gateway = self.transport.outbox(a.gateway)
        self.wake = anyio.Event()
        self.times = StepTimes()
        self._seen = {"prompt": 0, "gen": 0, "preempt": 0, "queries": 0, "hits": 0}
        return {}

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                self.serve,
                self.inbox,
                {EngineRequest: self.on_request, AbortRequest: self.on_abort},
            )
            tg.start_soon(self._step_loop)
            tg.start_soon(self._stats_loop)

    async def on_request(self, req: EngineRequest) -> None:
        # Every request fits the pool: its stage bounds it by max_model_len, and the executor
        # only starts with a pool that holds max_model_len tokens.
        try:
            self.planner.add(req)
        except ValueError as exc:
            self.log.warning("duplicate request dropped", request_id=req.request_id, error=str(exc))
            return
        await self.to_gateway.send(RequestMoved(req.request_id, "engine"))  # it is here now
        self.wake.set()

    async def on_abort(self, msg: AbortRequest) -> None:
        """End a request. An abort for a request not here is ignored: aborts follow the request's
        own path, so it either ended already or is not coming (an early copy, see CONTRACT)."""
        if self.planner.abort(msg.request_id) is None:
            return
        self.log.debug("request aborted", request_id=msg.request_id, reason=msg.reason)
        if msg.reason == "abort":  # client gone: the detokenizer drops the request's stream
            closing = TokenDelta(msg.request_id, [], finish_reason="abort")
            await self.detoks[owner(msg.request_id, len(self.detoks))].send(TokenBatch([closing]))
        self.wake.set()  # its finished_ids go out with the next plan

    async def _step_loop(self) -> None:
        """Keep up to two plans with the executor; apply each result as it comes back."""
        while True:
            await self._send_plans()
            if not self.planner.in_flight:
                self.times.idle()
                self._record([])  # idle: the gauges show an empty engine
                self.wake = anyio.Event()
                await self.wake.wait()
                continue
            result: StepResult = await self.results.recv()
            await self._apply(result)

    async def _send_plans(self) -> None:
        while True:
            preempted_before = self.planner.stats.preemptions
            plan = self.planner.schedule()
            if self.planner.stats.preemptions > preempted_before:
                self.log.warning(
                    "KV cache full: preempted requests for recompute",
                    count=self.planner.stats.preemptions - preempted_before,
                    kv_blocks=self.pool.num_blocks,
                )
            if plan is None:
                return
            for out in self.plans:
                await out.send(plan)

    async def _apply(self, result: StepResult) -> None:
        gap = self.times.add(result)
        metrics.step_forward_time.observe(result.elapsed_s)
        if gap is not None:
            metrics.step_gap_time.observe(gap)
        update = self.planner.apply(result)
        batches: dict[int, list[tuple[RequestState, TokenDelta]]] = {}
        now, model = time.time(), self.config.model_names[0]
        for state, delta in update.deltas:
            if delta.token_ids:
                if state.last_token_time is not None:
                    metrics.record_token_gap(model, now - state.last_token_time)
                state.last_token_time = now
            batches.setdefault(owner(state.request_id, len(self.detoks)), []).append((state, delta))
        for idx, pairs in batches.items():
            # A request aborted while an earlier batch was sent has had its stream closed: its
            # remaining deltas would reach a detokenizer that no longer knows it.
            deltas = [d for st, d in pairs if not (st.finished and d.finish_reason is None)]
            if deltas:
                await self.detoks[idx].send(TokenBatch(deltas))
        for fin in update.finished:
            if fin.reason == "error":  # the executor could not run the step: a 500, others go on
                message = f"the model step failed: {result.error or 'no token sampled'}"
                info = ErrorInfo(message, type="InternalServerError", code=500)
                await self.to_gateway.send(RequestError(fin.state.request_id, info))
        self._record(update.finished)

    def _record(self, finished: list[Finished]) -> None:
        """Prometheus figures (actors/metrics.py): finished requests, counters, gauges."""
        now = time.time()
        model = self.config.model_names[0]
        for fin in finished:
            r = fin.state
            n_out = len(r.output_token_ids)
            self.log.debug(
                "request finished", request_id=r.request_id, reason=fin.reason, tokens=n_out
            )
            metrics.record_finished(
                model,
                metrics.FinishedRequest(
                    reason=fin.reason,
                    arrival=r.arrival_time,
                    queued=r.queued_time,
                    scheduled=r.scheduled_time,
                    first_token=r.first_token_time,
                    finished=now,
                    prompt_tokens=len(r.request.prompt_token_ids),
                    output_tokens=n_out,
                    max_tokens=r.request.max_tokens,
                ),
            )
        s, pool = self.planner.stats, self.pool
        seen = {
            "prompt": s.prompt_tokens,
            "gen": s.generation_tokens,
            "preempt": s.preemptions,
            "queries": pool.queries,
            "hits": pool.hits,
        }
        metrics.record_counts(model, {k: seen[k] - self._seen[k] for k in seen})
        self._seen = seen
        metrics.record_gauges(
            model,
            len(self.planner.running),
            len(self.planner.waiting),
            pool.usage,
            pool.hit_rate,
        )

    async def _stats_loop(self) -> None:
        """The periodic log line: throughput, batch, KV usage, prefix-cache hit rate, and the
        executor's mean forward time and idle gap between forwards."""
        interval = self.config.log_stats_interval_s
        if interval <= 0:
            return
        last = (0, 0)
        while True:
            await anyio.sleep(interval)
            s = self.planner.stats
            prompt, gen = s.prompt_tokens - last[0], s.generation_tokens - last[1]
            last = (s.prompt_tokens, s.generation_tokens)
            if not (prompt or gen or self.planner.has_work):
                continue
            self.log.info(
                "engine stats",
                prompt_tps=round(prompt / interval, 1),
                gen_tps=round(gen / interval, 1),
                running=len(self.planner.running),
                waiting=len(self.planner.waiting),
                kv_usage=f"{self.pool.usage:.1%}",
                prefix_hit_rate=f"{self.pool.hit_rate:.1%}",
                preemptions=s.preemptions,
                **self.times.summary(),
            )
