"""Step planning on pure CPU: chunked prefill under a token budget, prefix reuse, preemption,
abort, stop rules, what the executor is told, and no KV block leaked afterwards."""

from __future__ import annotations

from typing import Any

from actors.scheduling.block_pool import BlockPool
from actors.scheduling.planner import Planner, PlannerLimits, Update
from actors.scheduling.request_state import RequestState
from protocols.messages import (
    EngineRequest,
    ImageRef,
    PositionLogprobs,
    PromptLogprobs,
    SampledToken,
    SamplingParams,
    StepPlan,
    StepResult,
    TokenLogprob,
)


def make(
    rid: str,
    prompt: list[int],
    max_tokens: int = 4,
    images: list[ImageRef] | None = None,
    **sampling: Any,
) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingParams(**sampling), max_tokens, [0], images or [])


def planner(
    blocks: int = 32, bs: int = 4, budget: int = 64, seqs: int = 8, cache: bool = True
) -> tuple[Planner, BlockPool]:
    pool = BlockPool(blocks, bs, cache)
    return Planner(pool, PlannerLimits(seqs, budget, 1024)), pool


def result(plan: StepPlan, token: int = 7) -> StepResult:
    sampled = [SampledToken(s.request_id, token) for s in plan.sequences if s.sample]
    return StepResult(plan.step_id, sampled)


def run_step(p: Planner, token: int = 7) -> tuple[StepPlan, Update]:
    """One step without overlap: plan, then apply its result before planning the next."""
    plan = p.schedule()
    assert plan is not None
    return plan, p.apply(result(plan, token))


def drain(p: Planner) -> list[StepPlan]:
    plans = []
    while p.has_work:
        plans.append(run_step(p)[0])
    return plans


def test_long_prompt_is_chunked_and_decodes_keep_running() -> None:
    p, pool = planner(budget=8)
    p.add(make("short", [1, 2, 3]))
    plan, _ = run_step(p)
    assert [(s.request_id, s.num_tokens) for s in plan.sequences] == [("short", 3)]
    p.add(make("long", list(range(10, 30))))
    plan, _ = run_step(p)
    # The decode of "short" comes first; "long" gets the rest of the 8-token budget.
    assert [(s.request_id, s.start_pos, s.num_tokens, s.sample) for s in plan.sequences] == [
        ("short", 3, 1, True),
        ("long", 0, 7, False),
    ]
    plan, _ = run_step(p)
    assert plan.sequences[1].start_pos == 7 and plan.sequences[1].num_tokens == 7
    drain(p)
    assert pool.num_free == pool.num_blocks


def test_request_is_sent_once_and_forgotten_when_finished() -> None:
    p, pool = planner()
    req = make("a", [1, 2, 3, 4, 5], max_tokens=2)
    p.add(req)
    plan1, up1 = run_step(p)
    assert plan1.new_requests == [req] and up1.finished == []
    plan2, up2 = run_step(p)
    assert plan2.new_requests == [] and plan2.finished_ids == []
    assert [f.reason for f in up2.finished] == ["length"]
    assert pool.num_free == pool.num_blocks
    plan = p.schedule()
    assert plan is not None and plan.finished_ids == ["a"] and plan.sequences == []
    assert p.schedule() is None


def test_eos_stops_unless_ignore_eos() -> None:
    p, _ = planner()
    p.add(make("a", [1, 2], max_tokens=5))
    _, up = run_step(p, token=0)
    assert up.finished[0].reason == "stop" and up.deltas[0][1].finish_reason == "stop"
    p.add(make("b", [1, 2], max_tokens=3, ignore_eos=True))
    for _ in range(2):
        _, up = run_step(p, token=0)
        assert up.finished == []
    _, up = run_step(p, token=0)
    assert up.finished[0].reason == "length"


def test_stop_rules_live_in_check_stop() -> None:
    state = RequestState(make("a", [1, 2, 3], max_tokens=10, min_tokens=2, stop_token_ids=[9]))
    state.output_token_ids = [9]
    assert state.check_stop(9, 1024) == (None, None)  # min_tokens holds the stop id back
    state.output_token_ids = [9, 9]
    assert state.check_stop(9, 1024) == ("stop", 9)
    state.output_token_ids = [0, 0]
    assert state.check_stop(0, 1024) == ("stop", None)  # EOS: no stop_reason
    state.output_token_ids = [5, 5]
    assert state.check_stop(5, 5) == ("length", None)  # the context window is full
    assert state.at_length(10, 1024) and not state.at_length(9, 1024)


def test_prefix_cache_shares_full_blocks_between_requests() -> None:
    p, pool = planner()
    shared = list(range(100, 112))  # three full blocks
    p.add(make("a", shared + [1, 2]))
    drain(p)
    p.add(make("b", shared + [3]))
    plan, _ = run_step(p)
    seq = plan.sequences[0]
    assert seq.start_pos == 12 and seq.num_tokens == 1
    assert p.requests["b"].num_cached_tokens == 12
    drain(p)
    assert pool.num_free == pool.num_blocks


def test_same_tokens_with_a_different_image_do_not_share_blocks() -> None:
    p, _ = planner()
    prompt = [5] * 12 + [6]
    p.add(make("a", prompt, images=[ImageRef("img-1", 2, 6, [1, 2, 2])]))
    drain(p)
    p.add(make("b", prompt, images=[ImageRef("img-2", 2, 6, [1, 2, 2])]))
    plan, _ = run_step(p)
    assert plan.sequences[0].start_pos == 0  # image sits in blocks 0-1: nothing reusable
    drain(p)
    p.add(make("c", prompt, images=[ImageRef("img-1", 2, 6, [1, 2, 2])]))
    plan, _ = run_step(p)
    assert plan.sequences[0].start_pos == 12


def test_preempted_request_is_recomputed_but_neither_forgotten_nor_resent() -> None:
    p, pool = planner(blocks=4, bs=4, budget=64)
    p.add(make("old", [1] * 8, max_tokens=6))
    p.add(make("new", [2] * 8, max_tokens=6))
    plan, _ = run_step(p)  # both prefilled: 2 blocks each, pool full
    assert [r.request_id for r in plan.new_requests] == ["old", "new"]
    assert pool.num_free == 0
    plan, _ = run_step(p)
    # Both need a third block for position 8: the newest, "new", is preempted to make room.
    assert [s.request_id for s in plan.sequences] == ["old"]
    new = p.requests["new"]
    assert new.num_computed == 0 and new in p.waiting and new.num_preemptions == 1
    assert plan.finished_ids == []  # the executor keeps its state
    outputs = list(new.output_token_ids)
    plans = drain(p)
    assert all(r.request_id != "new" for pl in plans for r in pl.new_requests)
    resumed = next(s for pl in plans for s in pl.sequences if s.request_id == "new")
    # Recomputed from position 0 over the prompt and the outputs it already had.
    assert resumed.start_pos == 0 and resumed.num_tokens == 8 + len(outputs) and resumed.sample
    assert pool.num_free == pool.num_blocks
    last = p.schedule()
    assert last is not None
    assert sorted(rid for pl in [*plans, last] for rid in pl.finished_ids) == ["new", "old"]


def test_abort_frees_blocks_of_waiting_and_running_requests() -> None:
    p, pool = planner(budget=4, seqs=1)
    p.add(make("run", list(range(12))))
    p.add(make("wait", [1, 2, 3]))
    run_step(p)
    assert p.abort("wait") is not None
    assert p.abort("run") is not None
    assert pool.num_free == pool.num_blocks and not p.has_work
    plan = p.schedule()
    # "wait" never reached the executor and has no pixels there: nothing to tell it.
    assert plan is not None and plan.finished_ids == ["run"]


def test_abort_of_an_unknown_request_is_a_no_op() -> None:
    p, pool = planner()
    assert p.abort("nope") is None
    assert p.schedule() is None and p.to_finish == []
    p.add(make("a", [1, 2, 3]))
    plan, _ = run_step(p)
    assert p.abort("nope") is None
    assert p.requests.keys() == {"a"} and p.running[0].num_computed == 3
    assert pool.num_free == pool.num_blocks - 1


def test_image_request_that_never_ran_is_still_finished_on_the_executor() -> None:
    p, _ = planner(seqs=1)
    image = ImageRef("img-1", 1, 2, [1, 2, 2])
    p.add(make("busy", [1, 2, 3]))
    p.add(make("img", [1, 5, 5, 2], images=[image]))
    p.add(make("text", [1, 2]))
    plan, _ = run_step(p)
    assert [s.request_id for s in plan.sequences] == ["busy"]  # the other two wait
    p.abort("img")  # its pixels went to the executor before the request reached the scheduler
    p.abort("text")
    plan, _ = run_step(p)
    assert plan.finished_ids == ["img"]


def test_max_num_seqs_limits_the_running_batch() -> None:
    p, _ = planner(seqs=2)
    for i in range(4):
        p.add(make(f"r{i}", [1, 2, 3]))
    plan, _ = run_step(p)
    assert len(plan.sequences) == 2 and len(p.waiting) == 2


def test_duplicate_request_id_is_refused() -> None:
    p, _ = planner()
    p.add(make("a", [1, 2]))
    try:
        p.add(make("a", [3]))
    except ValueError:
        pass
    else:
        raise AssertionError("a second request with a live id was accepted")
    assert len(p.waiting) == 1


def _prompt_result(plan: StepPlan) -> StepResult:
    """A result whose prompt logprobs name, for each prompt token a sequence scored, its id
    (logprob -position, to tell them apart)."""
    out = result(plan)
    for s in plan.sequences:
        lo, hi = max(s.start_pos, 0), min(s.start_pos + s.num_tokens, 10 - 1)
        if lo < hi:
            positions = [
                PositionLogprobs(TokenLogprob(100 + p + 1, -float(p + 1))) for p in range(lo, hi)
            ]
            out.prompt_logprobs.append(PromptLogprobs(s.request_id, lo + 1, positions))
    return out


def test_prompt_logprobs_skip_the_prefix_cache_and_arrive_once_with_the_first_token() -> None:
    p, _ = planner(bs=4, budget=4)
    prompt = [100 + i for i in range(10)]
    p.add(make("warm", prompt, max_tokens=1))
    drain(p)  # its full blocks are now in the prefix cache
    p.add(make("a", prompt, max_tokens=2, prompt_logprobs=1))
    deltas, starts = [], []
    while p.has_work:
        plan = p.schedule()
        assert plan is not None
        starts += [s.start_pos for s in plan.sequences]
        deltas += [d for _, d in p.apply(_prompt_result(plan)).deltas]
    assert starts[:3] == [0, 4, 8]  # every prompt position runs, none comes from the cache
    assert p.requests == {} and len(deltas) == 2
    first, second = deltas
    assert first.prompt_token_ids == prompt and second.prompt_logprobs is None
    assert first.prompt_logprobs is not None
    assert [pos.sampled.token_id for pos in first.prompt_logprobs] == prompt[1:]
    assert first.cached_tokens == 0


def test_a_recompute_does_not_repeat_prompt_logprobs() -> None:
    state = RequestState(make("a", list(range(10)), prompt_logprobs=0))
    pos = [PositionLogprobs(TokenLogprob(t, -1.0)) for t in range(1, 10)]
    state.add_prompt_logprobs(PromptLogprobs("a", 1, pos[:5]))
    state.add_prompt_logprobs(PromptLogprobs("a", 1, pos[:7]))  # recomputed from the start
    state.add_prompt_logprobs(PromptLogprobs("a", 8, pos[7:]))
    assert state.prompt_logprobs == pos
