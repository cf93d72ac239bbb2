"""Overlapped scheduling in the pure planner: step N+1 is planned before step N's result, a
request stopped by step N drops the token of its extra decode, and nothing is planned past
max_tokens."""

from __future__ import annotations

import pytest

from actors.scheduling.block_pool import BlockPool
from actors.scheduling.planner import Planner, PlannerLimits
from protocols.messages import (
    EngineRequest,
    SampledToken,
    SamplingParams,
    ScheduledSequence,
    StepPlan,
    StepResult,
)


def make(rid: str, prompt: list[int], max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(), max_tokens, [0])


def planner(blocks: int = 32, bs: int = 4, budget: int = 64) -> tuple[Planner, BlockPool]:
    pool = BlockPool(blocks, bs)
    return Planner(pool, PlannerLimits(8, budget, 1024)), pool


def result(plan: StepPlan, tokens: dict[str, int] | None = None) -> StepResult:
    tokens = tokens or {}
    sampled = [SampledToken(s.request_id, tokens.get(s.request_id, 7)) for s in plan.sequences]
    return StepResult(plan.step_id, [t for t, s in zip(sampled, plan.sequences) if s.sample])


def spans(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start_pos, s.num_tokens, s.sample) for s in plan.sequences]


def schedule(p: Planner) -> StepPlan:
    plan = p.schedule()
    assert plan is not None
    return plan


def test_next_decode_is_planned_before_the_last_token_is_known() -> None:
    p, pool = planner()
    p.add(make("a", [1, 2, 3], max_tokens=4))
    plan1 = schedule(p)
    plan2 = schedule(p)
    assert spans(plan1) == [("a", 0, 3, True)]
    assert spans(plan2) == [("a", 3, 1, True)]  # decodes the token step 1 will sample
    assert plan2.new_requests == []
    assert p.schedule() is None  # two plans out: the third waits for a result
    up = p.apply(result(plan1, {"a": 11}))
    assert [d.token_ids for _, d in up.deltas] == [[11]]
    plan3 = schedule(p)
    assert spans(plan3) == [("a", 4, 1, True)]
    up = p.apply(result(plan2, {"a": 12}))
    plan4 = schedule(p)
    assert spans(plan4) == [("a", 5, 1, True)]
    p.apply(result(plan3))
    # Four tokens asked: three known, the fourth is in flight, so nothing more is planned.
    assert p.schedule() is None
    up = p.apply(result(plan4))
    assert [f.reason for f in up.finished] == ["length"]
    assert p.requests == {} and pool.num_free == pool.num_blocks
    assert schedule(p).finished_ids == ["a"]


def test_max_tokens_bounds_the_look_ahead() -> None:
    p, _ = planner()
    p.add(make("a", [1, 2, 3], max_tokens=1))
    schedule(p)
    assert p.schedule() is None  # its only token is in flight


def test_stop_in_step_n_drops_the_token_of_its_extra_decode() -> None:
    p, pool = planner()
    p.add(make("a", [1, 2, 3], max_tokens=8))
    p.add(make("b", [4, 5, 6], max_tokens=8))
    plan1 = schedule(p)
    plan2 = schedule(p)
    up = p.apply(result(plan1, {"a": 0}))  # EOS for "a"
    assert [(f.state.request_id, f.reason) for f in up.finished] == [("a", "stop")]
    assert pool.num_free == pool.num_blocks - 1  # "a" gave its block back; "b" holds one
    plan3 = schedule(p)
    # "a" ran in step 2 (planned before its stop was known): it is finished only after it.
    assert spans(plan3) == [("b", 4, 1, True)] and plan3.finished_ids == ["a"]
    up = p.apply(result(plan2, {"a": 42, "b": 9}))
    assert [(d.request_id, d.token_ids) for _, d in up.deltas] == [("b", [9])]


def test_prompt_chunks_are_planned_ahead_as_before() -> None:
    p, _ = planner(budget=4)
    p.add(make("a", list(range(10, 20))))
    plans = [schedule(p), schedule(p)]
    assert [spans(pl) for pl in plans] == [[("a", 0, 4, False)], [("a", 4, 4, False)]]
    assert p.apply(result(plans[0])).deltas == []
    plans.append(schedule(p))
    assert spans(plans[2]) == [("a", 8, 2, True)]
    p.apply(result(plans[1]))
    assert spans(schedule(p)) == [("a", 10, 1, True)]


def test_preempted_while_in_flight_keeps_its_token_and_waits_for_it() -> None:
    p, pool = planner(blocks=4)
    p.add(make("old", [1] * 8, max_tokens=6))
    p.add(make("new", [2] * 8, max_tokens=6))
    plan1 = schedule(p)  # both prefilled, both sample: pool full
    plan2 = schedule(p)  # both decode position 8: "new" is preempted for "old"'s third block
    assert spans(plan2) == [("old", 8, 1, True)]
    new = p.requests["new"]
    assert new in p.waiting and new.num_pending == 1
    up = p.apply(result(plan1, {"old": 5, "new": 6}))
    # The executor sampled "new"'s token and kept it: the scheduler keeps it too.
    assert new.output_token_ids == [6] and new.num_pending == 0
    assert ("new", [6]) in [(d.request_id, d.token_ids) for _, d in up.deltas]
    plan3 = schedule(p)
    assert [s.request_id for s in plan3.sequences] == ["old"]  # no room for "new" yet
    assert plan3.new_requests == [] and plan3.finished_ids == []
    assert pool.num_free == 1


def test_preempted_request_is_not_readmitted_before_its_token_is_known() -> None:
    pool = BlockPool(4, 4)
    p = Planner(pool, PlannerLimits(8, 64, 1024, max_steps_in_flight=3))
    p.add(make("old", [1] * 8, max_tokens=6))
    p.add(make("new", [2] * 8, max_tokens=6))
    plan1 = schedule(p)
    schedule(p)  # "new" preempted with its step-1 token in flight
    p.abort("old")  # room again, but the last token of "new" is not known yet
    assert spans(schedule(p)) == []  # only tells the executor "old" ended
    p.apply(result(plan1, {"new": 6}))
    plan = schedule(p)
    assert spans(plan) == [("new", 0, 9, True)]  # recomputed over prompt and its one output
    assert plan.new_requests == [] and plan.finished_ids == []


def test_abort_while_in_flight_drops_its_token() -> None:
    p, pool = planner()
    p.add(make("a", [1, 2, 3]))
    plan1 = schedule(p)
    assert p.abort("a") is not None and pool.num_free == pool.num_blocks
    assert p.apply(result(plan1)).deltas == []
    assert schedule(p).finished_ids == ["a"]


def test_failed_step_ends_its_requests_and_the_next_step_goes_on() -> None:
    p, pool = planner()
    p.add(make("a", [1, 2, 3], max_tokens=8))
    plan1 = schedule(p)
    p.add(make("b", [4, 5], max_tokens=8))
    plan2 = schedule(p)
    assert [s.request_id for s in plan2.sequences] == ["a", "b"]
    up = p.apply(StepResult(plan1.step_id, [], error="RuntimeError: boom"))
    assert [(f.state.request_id, f.reason) for f in up.finished] == [("a", "error")]
    up = p.apply(result(plan2))
    assert [d.request_id for _, d in up.deltas] == ["b"]  # "a"'s extra decode is dropped
    assert p.requests.keys() == {"b"} and pool.num_free == pool.num_blocks - 1


def test_results_must_come_back_in_plan_order() -> None:
    p, _ = planner()
    p.add(make("a", [1, 2, 3]))
    schedule(p)
    plan2 = schedule(p)
    with pytest.raises(RuntimeError):
        p.apply(result(plan2))


def test_no_overlap_when_one_step_in_flight_is_the_limit() -> None:
    pool = BlockPool(8, 4)
    p = Planner(pool, PlannerLimits(8, 64, 1024, max_steps_in_flight=1))
    p.add(make("a", [1, 2, 3]))
    plan1 = schedule(p)
    assert p.schedule() is None
    p.apply(result(plan1))
    assert schedule(p).sequences == [ScheduledSequence("a", 3, 1, p.requests["a"].block_ids, True)]
