"""Scheduler stage: admits tokenized requests, plans each step, applies results and stop rules.

It owns the block tables; the executor owns the KV memory. One plan goes to every tensor-parallel
rank; new tokens go to the detokenizer replica that owns the request.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import anyio

from actors import metrics
from actors.scheduling.block_pool import BlockPool
from actors.scheduling.planner import Finished, Planner, PlannerLimits
from actors.scheduling.request_state import RequestState
from core.actor import Actor
from protocols.messages import (
    AbortRequest,
    ErrorInfo,
    RequestError,
    StepPlan,
    StepResult,
    TokenBatch,
    TokenDelta,
    TokenizedRequest,
)

EARLY_ABORT_TTL_S = 60.0


class SchedulerActor(Actor):
    async def setup(self) -> dict[str, Any]:
        info = self.engine_info
        c = self.config
        self.pool = BlockPool(
            int(info["num_blocks"]), int(info["block_size"]), c.enable_prefix_caching
        )
        self.max_model_len = int(info["max_model_len"])
        self.planner = Planner(
            self.pool,
            PlannerLimits(
                max_num_seqs=c.max_num_seqs,
                max_num_batched_tokens=max(c.max_num_batched_tokens, 1),
                max_model_len=self.max_model_len,
                enable_chunked_prefill=c.enable_chunked_prefill,
            ),
        )
        a = self.addresses
        self.inbox = self.transport.mailbox(a.scheduler)
        self.results = self.transport.mailbox(a.results)
        self.plans = [self.transport.outbox(addr, bind=True) for addr in a.plans]
        self.detoks = [self.transport.outbox(addr, bind=True) for addr in a.detokenizers]
        self.to_gateway = self.transport.outbox(a.gateway)
        self.wake = anyio.Event()
        self.early_aborts: dict[str, float] = {}
        self._step_times: list[tuple[float, float]] = []  # (executor, round trip) seconds
        self._seen = {"prompt": 0, "gen": 0, "preempt": 0, "queries": 0, "hits": 0}
        return {}

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                self.serve,
                self.inbox,
                {TokenizedRequest: self.on_request, AbortRequest: self.on_abort},
            )
            tg.start_soon(self._step_loop)
            tg.start_soon(self._stats_loop)

    async def on_request(self, req: TokenizedRequest) -> None:
        if self.early_aborts.pop(req.request_id, None) is not None:
            return
        # Every request fits the pool: the tokenizer bounds it by max_model_len, and the executor
        # only starts with a pool that holds max_model_len tokens.
        self.planner.add(RequestState.from_tokenized(req))
        self.wake.set()

    async def on_abort(self, msg: AbortRequest) -> None:
        if self.planner.abort(msg.request_id) is None and msg.reason == "abort":
            now = time.monotonic()
            self.early_aborts[msg.request_id] = now
            for rid, t in list(self.early_aborts.items()):
                if now - t > EARLY_ABORT_TTL_S:
                    del self.early_aborts[rid]
        self.log.debug("request aborted", request_id=msg.request_id, reason=msg.reason)
        self.wake.set()

    def _detok_for(self, request_id: str) -> int:
        return zlib.crc32(request_id.encode()) % len(self.detoks)

    async def _step_loop(self) -> None:
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
                self._record([])  # idle: the gauges show an empty engine
                self.wake = anyio.Event()
                await self.wake.wait()
                continue
            for out in self.plans:
                await out.send(plan)
            if not plan.sequences:
                continue
            sent = time.perf_counter()
            result: StepResult = await self.results.recv()
            self._step_times.append((result.elapsed_s, time.perf_counter() - sent))
            if result.error is not None:
                await self._fail_step(plan, result.error)
                continue
            update = self.planner.update(result.sampled)
            batches: dict[int, list[TokenDelta]] = {}
            for req, delta in update.deltas:
                batches.setdefault(self._detok_for(req.request_id), []).append(delta)
            for idx, deltas in batches.items():
                await self.detoks[idx].send(TokenBatch(deltas))
            self._record(update.finished)

    async def _fail_step(self, plan: StepPlan, error: str) -> None:
        """The executor could not run this step: its requests end with a 500, others go on."""
        self.planner.in_flight = {}
        for seq in plan.sequences:
            if self.planner.abort(seq.request_id) is not None:
                info = ErrorInfo(
                    f"the model step failed: {error}", type="InternalServerError", code=500
                )
                await self.to_gateway.send(RequestError(seq.request_id, info))

    def _record(self, finished: list[Finished]) -> None:
        """Prometheus figures: latencies of finished requests, counters, gauges."""
        now = time.time()
        for fin in finished:
            r = fin.request
            self.log.debug(
                "request finished",
                request_id=r.request_id,
                reason=fin.reason,
                tokens=len(r.output_token_ids),
            )
            metrics.requests_finished.labels(fin.reason).inc()
            metrics.e2e_latency.observe(now - r.arrival_time)
            if r.first_token_time is not None:
                metrics.ttft.observe(r.first_token_time - r.arrival_time)
                if len(r.output_token_ids) > 1:
                    metrics.tpot.observe((now - r.first_token_time) / (len(r.output_token_ids) - 1))
            if r.scheduled_time is not None:
                metrics.stage_latency.labels("scheduler_queue").observe(
                    r.scheduled_time - r.queued_time
                )
                metrics.stage_latency.labels("executor").observe(now - r.scheduled_time)
        s, pool = self.planner.stats, self.pool
        seen = {
            "prompt": s.prompt_tokens,
            "gen": s.generation_tokens,
            "preempt": s.preemptions,
            "queries": pool.queries,
            "hits": pool.hits,
        }
        for key, counter in (
            ("prompt", metrics.prompt_tokens),
            ("gen", metrics.generation_tokens),
            ("preempt", metrics.preemptions),
            ("queries", metrics.prefix_cache_queries),
            ("hits", metrics.prefix_cache_hits),
        ):
            if seen[key] > self._seen[key]:
                counter.inc(seen[key] - self._seen[key])
        self._seen = seen
        metrics.requests_running.set(len(self.planner.running))
        metrics.requests_waiting.set(len(self.planner.waiting))
        metrics.kv_cache_usage.set(pool.usage)
        metrics.prefix_cache_hit_rate.set(pool.hit_rate)

    def _step_summary(self) -> dict[str, float]:
        """Mean forward time and scheduler round trip per step since the last stats line."""
        times, self._step_times = self._step_times, []
        if not times:
            return {}
        return {
            "steps": len(times),
            "forward_ms": round(1000 * sum(t[0] for t in times) / len(times), 1),
            "step_ms": round(1000 * sum(t[1] for t in times) / len(times), 1),
        }

    async def _stats_loop(self) -> None:
        """The periodic log line: throughput, batch, KV usage, prefix-cache hit rate."""
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
                **self._step_summary(),
            )
