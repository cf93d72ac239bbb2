"""The scheduler stage on real ipc sockets, with the test as executor, detokenizers and gateway:
overlapped plans, tokens to the owning detokenizer, client aborts, failed steps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from actors.scheduler import SchedulerActor
from core.actor import ActorSpec
from core.config import EngineConfig
from core.launch.addresses import make_addresses, owner
from core.transport import Mailbox, Outbox, Transport
from protocols.messages import (
    AbortRequest,
    EngineFacts,
    EngineRequest,
    RequestError,
    RequestMoved,
    SampledToken,
    SamplingParams,
    StepPlan,
    StepResult,
    TokenBatch,
)

FACTS = EngineFacts(
    max_model_len=64,
    num_blocks=16,
    block_size=4,
    vocab_size=100,
    eos_token_ids=[0],
    architecture="test",
    dtype="float32",
)
DETOKENIZERS = 2


@dataclass
class Peers:
    scheduler: Outbox
    results: Outbox
    plans: Mailbox
    detoks: list[Mailbox]
    gateway: Mailbox

    async def plan(self) -> StepPlan:
        plan = await self.plans.recv()
        assert isinstance(plan, StepPlan)
        return plan

    async def batch(self, rid: str) -> TokenBatch:
        batch = await self.detoks[owner(rid, DETOKENIZERS)].recv()
        assert isinstance(batch, TokenBatch)
        return batch

    async def result(self, plan: StepPlan, token: int = 5) -> None:
        sampled = [SampledToken(s.request_id, token) for s in plan.sequences if s.sample]
        await self.results.send(StepResult(plan.step_id, sampled, elapsed_s=0.01, started_s=1.0))


def with_scheduler(tmp_path: Path, body: Callable[[Peers], Awaitable[None]]) -> None:
    a, control = make_addresses("ipc", str(tmp_path), 1, 1, 1, DETOKENIZERS)
    spec = ActorSpec("scheduler", "actors.scheduler:SchedulerActor", 0, FACTS.to_info(), control)
    config = EngineConfig(log_stats_interval_s=0, log_level="warning")

    async def main() -> None:
        actor = SchedulerActor(spec, config, a.to_dict())
        await actor.setup()
        t = Transport()
        peers = Peers(
            scheduler=t.outbox(a.scheduler),
            results=t.outbox(a.results),
            plans=t.mailbox(a.plans[0], bind=False),
            detoks=[t.mailbox(addr) for addr in a.detokenizers],
            gateway=t.mailbox(a.gateway),
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(actor.run)
                with anyio.fail_after(20):
                    await body(peers)
                tg.cancel_scope.cancel()
        finally:
            t.close()
            actor.transport.close()

    anyio.run(main)


def owned_by(index: int, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(100) if owner(f"{prefix}{i}", DETOKENIZERS) == index)


def request(rid: str, max_tokens: int = 3) -> EngineRequest:
    return EngineRequest(rid, [1, 2, 3], SamplingParams(), max_tokens, [0])


def test_next_plan_goes_out_before_the_result_and_tokens_reach_the_owner(tmp_path: Path) -> None:
    rid = owned_by(1, "req")

    async def body(peers: Peers) -> None:
        req = request(rid)
        await peers.scheduler.send(req)
        plan1, plan2 = await peers.plan(), await peers.plan()  # no result sent yet
        assert plan1.new_requests == [req] and plan2.new_requests == []
        assert [(s.start_pos, s.num_tokens, s.sample) for s in plan2.sequences] == [(3, 1, True)]
        await peers.result(plan1, token=5)
        batch = await peers.batch(rid)
        assert [(d.request_id, d.token_ids, d.finish_reason) for d in batch.deltas] == [
            (rid, [5], None)
        ]
        plan3 = await peers.plan()
        assert plan3.sequences[0].start_pos == 4
        await peers.result(plan2, token=6)
        await peers.result(plan3, token=7)
        assert (await peers.batch(rid)).deltas[0].token_ids == [6]
        last = (await peers.batch(rid)).deltas[0]
        assert last.token_ids == [7] and last.finish_reason == "length" and last.prompt_tokens == 3
        tail = await peers.plan()
        assert tail.sequences == [] and tail.finished_ids == [rid]

    with_scheduler(tmp_path, body)


def test_client_abort_closes_the_stream_and_an_unknown_abort_is_ignored(tmp_path: Path) -> None:
    gone, ghost, later = owned_by(0, "gone"), owned_by(0, "ghost"), owned_by(0, "later")

    async def body(peers: Peers) -> None:
        await peers.scheduler.send(AbortRequest(ghost))  # never came: nothing to close
        await peers.scheduler.send(request(gone, max_tokens=8))
        plan1, plan2 = await peers.plan(), await peers.plan()
        assert plan1.finished_ids == [] and plan2.finished_ids == []
        await peers.scheduler.send(AbortRequest(gone, reason="abort"))
        closing = (await peers.batch(gone)).deltas
        assert [(d.request_id, d.token_ids, d.finish_reason) for d in closing] == [
            (gone, [], "abort")
        ]
        await peers.result(plan1)
        await peers.result(plan2)  # tokens of an aborted request go nowhere
        assert (await peers.plan()).finished_ids == [gone]
        await peers.scheduler.send(request(later, max_tokens=1))
        plan = await peers.plan()
        await peers.result(plan, token=9)
        nxt = (await peers.batch(later)).deltas  # the same detokenizer: nothing came between
        assert [(d.request_id, d.token_ids) for d in nxt] == [(later, [9])]

    with_scheduler(tmp_path, body)


def test_failed_step_ends_its_requests_with_a_500(tmp_path: Path) -> None:
    rid = owned_by(0, "fail")

    async def body(peers: Peers) -> None:
        await peers.scheduler.send(request(rid, max_tokens=8))
        moved = await peers.gateway.recv()  # the gateway learns the request is in the engine
        assert moved == RequestMoved(rid, "engine")
        plan1, plan2 = await peers.plan(), await peers.plan()
        await peers.results.send(StepResult(plan1.step_id, [], error="RuntimeError: boom"))
        err = await peers.gateway.recv()
        assert isinstance(err, RequestError) and err.request_id == rid
        assert err.error.code == 500 and "boom" in err.error.message
        await peers.result(plan2)
        assert (await peers.plan()).finished_ids == [rid]

    with_scheduler(tmp_path, body)
