"""Executor stage: one per device (tensor-parallel rank), between the scheduler and its results.
It takes step plans from the scheduler and image pixels from the image stage, runs each plan
through its ModelRunner (actors/execution) and, on rank 0, sends the sampled tokens back.

The forward runs on the loop's (main) thread on purpose: torch's OpenMP kernels run ~35% slower
when called from a worker thread (86 vs 117 ms per decode step measured here). Nothing else waits
on this loop while a step runs; heartbeats come from their own thread.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from actors.execution import KVLimits, ModelRunner
from actors.execution.fault_hook import FaultHook
from actors.execution.rank_agreement import check_same_flags
from actors.execution.tp_group import join_group
from core.codec import CodecError
from devices import get_platform
from devices.cpu_threads import ThreadGovernor, usable_cores
from protocols.messages import ImagePixels, StepPlan, StepResult
from protocols.stage import Stage

TRIM_EVERY_S = 30.0  # how often freed host heap goes back to the OS (Platform.trim_host_memory)


class ExecutorActor(Stage):
    async def setup(self) -> dict[str, Any]:
        c = self.config
        platform = get_platform(c.device)
        tp_size = c.tensor_parallel_size
        local_ranks = c.local_ranks  # this host's ranks: they share its cores and devices
        device_index = self.index - local_ranks.start
        cores = max(1, usable_cores() // len(local_ranks))
        platform.set_threads(c.threads or cores)
        self.platform = platform
        # On a shared CPU the pool follows the cores other tasks leave free; --threads fixes it.
        # Tensor-parallel ranks keep a fixed pool: they wait for each other at every all-reduce.
        adapts = platform.adapts_threads and not c.threads and tp_size == 1
        self.governor = ThreadGovernor(cores) if adapts else None
        if c.multi_node:  # what env:// would read: the leader's MASTER_ADDR and MASTER_PORT
            rendezvous = f"tcp://{c.master_addr}:{c.master_port}"
        else:
            rendezvous = os.path.join(c.run_dir, "tensor-parallel")
        tp = join_group(platform, self.index, tp_size, rendezvous)
        check_same_flags(c, platform.torch_device(device_index))
        torch.manual_seed(c.seed)  # every rank draws the same unseeded samples
        t0 = time.monotonic()
        # Loaded on the loop (main) thread too: weights packed from a worker thread made decode
        # ~15% slower here (100 vs 86 ms per step); heartbeats come from their own thread.
        self.runner = ModelRunner.load(
            c.model,
            platform,
            rank=device_index,  # the device on this host
            dtype=c.dtype,
            block_size=c.block_size,
            limits=KVLimits(
                max_model_len=c.max_model_len,
                max_num_seqs=c.max_num_seqs,
                memory_utilization=c.memory_utilization,
                kv_cache_memory=c.kv_cache_memory,
            ),
            enforce_eager=c.enforce_eager,
            tp=tp,
            tokenizer=c.tokenizer,
            quantization=c.quantization,
        )
        pool = self.runner.pool
        if pool.capped:
            self.log.warning(
                "max_model_len capped to the KV cache size", max_model_len=pool.max_model_len
            )
        self.log.info(
            "model loaded",
            model=c.model,
            device=str(self.runner.device),
            tensor_parallel=f"rank {self.index} of {tp_size}",
            dtype=str(self.runner.dtype),
            quantization=c.quantization,
            weight_bytes=self.runner.weight_bytes,
            kv_bytes=self.runner.kv_bytes,
            seconds=round(time.monotonic() - t0, 2),
            kv_blocks=pool.num_blocks,
            block_size=pool.block_size,
            max_model_len=pool.max_model_len,
            max_concurrency=round(pool.num_blocks * pool.block_size / pool.max_model_len, 2),
        )
        a = self.addresses
        self.plans = self.transport.mailbox(a.plans[self.index], bind=False)
        self.media = self.transport.mailbox([row[self.index] for row in a.media], bind=False)
        self.results = self.transport.outbox(a.results) if self.index == 0 else None
        self.trimmed_at = time.monotonic()
        self.faults = FaultHook()  # tests only: TESSERA_FAULT_FILE makes a forward raise
        return self.runner.facts.to_info()  # only rank 0's reach the other stages

    async def run(self) -> None:
        while True:
            plan: StepPlan = await self.plans.recv()
            await self._take_pixels(plan)
            t0 = time.perf_counter()
            error = None
            try:
                if plan.sequences:
                    self.faults.check()
                sampled = self.runner.execute(plan)
            except Exception as exc:  # one failed step fails its requests, not the engine
                # Their state stays until the scheduler lists them in finished_ids: the next
                # plan, already on its way, may still name them.
                self.log.exception("step failed", step_id=plan.step_id)
                sampled, error = [], f"{type(exc).__name__}: {exc}"
            prompt_logprobs = self.runner.take_prompt_logprobs()
            if time.monotonic() - self.trimmed_at > TRIM_EVERY_S:
                self.platform.trim_host_memory()
                self.trimmed_at = time.monotonic()
            if self.governor is not None and plan.sequences:
                threads = self.governor.sample(own_threads_busy=self.governor.threads)
                if threads is not None:
                    self.platform.set_threads(threads)
                    self.log.info("compute threads changed", threads=threads)
            if self.results is not None and plan.sequences:
                elapsed = time.perf_counter() - t0
                result = StepResult(
                    plan.step_id, sampled, elapsed, error, t0, prompt_logprobs if not error else []
                )
                await self.results.send(result)

    async def _take_pixels(self, plan: StepPlan) -> None:
        """Take in the pixels already delivered, then wait for any the plan still lacks (the
        image stage sends them before the request, but on another socket)."""
        while await self.media.ready():
            await self._receive_pixels()
        missing = self.runner.missing_pixels(plan)
        if missing:
            self.log.debug("waiting for pixels", step_id=plan.step_id, images=len(missing))
        while self.runner.missing_pixels(plan):
            await self._receive_pixels()

    async def _receive_pixels(self) -> None:
        try:
            msg = await self.media.recv()
        except CodecError as exc:
            self.log.warning("dropped undecodable message", error=str(exc))
            return
        if isinstance(msg, ImagePixels):
            self.runner.add_pixels(msg)
        else:
            self.log.warning("no handler", kind=type(msg).__name__)
