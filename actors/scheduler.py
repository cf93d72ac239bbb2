"""Scheduler stage: admits tokenized requests, plans each step, applies results and stop rules.

It owns the block tables; the executor owns the KV memory. One plan goes to every tensor-parallel
rank; new tokens go to the detokenizer replica that owns the request.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import anyio

from actors.scheduling.block_pool import BlockPool
from actors.scheduling.planner import Planner, PlannerLimits
from actors.scheduling.request_state import RequestState
from core.actor import Actor
from protocols.messages import (
    AbortRequest,
    ErrorInfo,
    RequestError,
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
        self._last_stats = time.monotonic()
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
        total = len(req.prompt_token_ids) + req.max_tokens
        if self.planner.blocks_needed(min(total, self.max_model_len)) > self.pool.num_blocks:
            err = ErrorInfo(
                f"the request needs {total} tokens of KV cache but the pool holds "
                f"{self.pool.num_blocks * self.pool.block_size}",
                param="max_tokens",
            )
            await self.to_gateway.send(RequestError(req.request_id, err))
            return
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
                self.wake = anyio.Event()
                await self.wake.wait()
                continue
            for out in self.plans:
                await out.send(plan)
            if not plan.sequences:
                continue
            result: StepResult = await self.results.recv()
            update = self.planner.update(result.sampled)
            batches: dict[int, list[TokenDelta]] = {}
            for req, delta in update.deltas:
                batches.setdefault(self._detok_for(req.request_id), []).append(delta)
            for idx, deltas in batches.items():
                await self.detoks[idx].send(TokenBatch(deltas))
            for fin in update.finished:
                self.log.debug(
                    "request finished",
                    request_id=fin.request.request_id,
                    reason=fin.reason,
                    tokens=len(fin.request.output_token_ids),
                )

    async def _stats_loop(self) -> None:
        interval = self.config.log_stats_interval_s
        if interval <= 0:
            return
        while True:
            await anyio.sleep(interval)
            s = self.planner.stats
            if not (s.prompt_tokens or s.generation_tokens or self.planner.has_work):
                continue
            self.log.info(
                "engine stats",
                prompt_tps=round(s.prompt_tokens / interval, 1),
                gen_tps=round(s.generation_tokens / interval, 1),
                running=len(self.planner.running),
                waiting=len(self.planner.waiting),
                kv_usage=f"{self.pool.usage:.1%}",
                prefix_hit_rate=f"{self.pool.hit_rate:.1%}",
                preemptions=s.preemptions,
            )
            s.prompt_tokens = s.generation_tokens = s.preemptions = 0
