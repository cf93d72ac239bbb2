"""The planner against a model executor that checks every KV read: overlapped steps, preemption
under a small pool, shared prefixes, EOS and aborts, with plans run strictly in order."""

from __future__ import annotations

import random
from collections import deque

import pytest

from actors.scheduling.block_pool import BlockPool
from actors.scheduling.planner import Planner, PlannerLimits
from protocols.messages import EngineRequest, SampledToken, SamplingParams, StepPlan, StepResult

EOS = 0


class ModelExecutor:
    """Keeps each request's tokens (prompt plus its own samples) like the real executor, and a
    KV cache whose slot holds a digest of the tokens up to its position: a step reads every
    slot of its context and fails on one that is missing or written for other tokens."""

    def __init__(self, block_size: int, rng: random.Random) -> None:
        self.bs = block_size
        self.rng = rng
        self.tokens: dict[str, list[int]] = {}
        self.prompt_len: dict[str, int] = {}
        self.outputs: dict[str, list[int]] = {}  # of forgotten requests
        self.kv: dict[tuple[int, int], int] = {}

    def run(self, plan: StepPlan) -> StepResult | None:
        for rid in plan.finished_ids:
            if rid in self.tokens:
                self.outputs[rid] = self.tokens.pop(rid)[self.prompt_len[rid] :]
        for req in plan.new_requests:
            assert req.request_id not in self.tokens and req.request_id not in self.outputs
            self.tokens[req.request_id] = list(req.prompt_token_ids)
            self.prompt_len[req.request_id] = len(req.prompt_token_ids)
        if not plan.sequences:
            return None
        sampled = []
        for s in plan.sequences:
            toks = self.tokens[s.request_id]  # KeyError: planned after it was forgotten
            end = s.start_pos + s.num_tokens
            assert (end == len(toks)) if s.sample else (end < len(toks))
            assert len(s.block_table) * self.bs >= end
            for pos in range(s.start_pos, end):
                self.kv[(s.block_table[pos // self.bs], pos % self.bs)] = hash(
                    tuple(toks[: pos + 1])
                )
            for pos in range(end):
                slot = (s.block_table[pos // self.bs], pos % self.bs)
                assert self.kv.get(slot) == hash(tuple(toks[: pos + 1])), (s, pos)
            if s.sample:
                tok = EOS if self.rng.random() < 0.08 else self.rng.randint(1, 3)
                toks.append(tok)
                sampled.append(SampledToken(s.request_id, tok))
        return StepResult(plan.step_id, sampled)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_every_kv_read_is_right_and_every_request_ends_once(depth: int, seed: int) -> None:
    rng = random.Random(seed)
    bs = 4
    pool = BlockPool(8, bs)
    p = Planner(pool, PlannerLimits(6, 24, 32, max_steps_in_flight=depth))
    ex = ModelExecutor(bs, rng)
    prefixes = [[rng.randint(1, 9) for _ in range(8)] for _ in range(3)]
    requests: dict[str, EngineRequest] = {}
    streamed: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    sent: deque[StepPlan] = deque()  # plans the executor has yet to run, in order
    to_add = 40

    def next_result() -> StepResult:
        while True:
            res = ex.run(sent.popleft())
            if res is not None:
                return res

    while to_add or p.has_work or p.in_flight:
        if to_add and rng.random() < 0.6:
            to_add -= 1
            rid = f"r{to_add}"
            prompt = rng.choice(prefixes)[: rng.randint(1, 8)] + [rng.randint(1, 9)]
            req = EngineRequest(rid, prompt, SamplingParams(), rng.randint(1, 16), [EOS])
            requests[rid] = req
            streamed[rid] = []
            p.add(req)
        if p.requests and rng.random() < 0.03:
            rid = rng.choice(sorted(p.requests))
            assert p.abort(rid) is not None
            reasons[rid] = "abort"
        while (plan := p.schedule()) is not None:
            sent.append(plan)
        if not p.in_flight:
            continue
        update = p.apply(next_result())
        for state, delta in update.deltas:
            assert state.request_id not in reasons
            streamed[delta.request_id] += delta.token_ids
        for fin in update.finished:
            reasons[fin.state.request_id] = fin.reason
    while (plan := p.schedule()) is not None:
        sent.append(plan)
    while sent:
        ex.run(sent.popleft())

    assert pool.num_free == pool.num_blocks and not p.requests
    assert ex.tokens == {}  # every request the executor held was finished there
    assert set(reasons) == set(requests)
    for rid, req in requests.items():
        out, executed = streamed[rid], ex.outputs.get(rid, [])
        assert executed[: len(out)] == out  # the stream is what the executor sampled
        assert len(executed) <= req.max_tokens  # never planned past max_tokens
        assert len(executed) - len(out) <= depth - 1 or reasons[rid] == "abort"
        if reasons[rid] == "length":
            assert len(out) == req.max_tokens and EOS not in out
        elif reasons[rid] == "stop":
            assert out[-1] == EOS and EOS not in out[:-1]
    assert p.stats.preemptions > 0 and pool.hits > 0  # the small pool preempts; prefixes hit
