"""Step planning on pure CPU: chunked prefill under a token budget, prefix reuse, preemption,
abort, and no KV block leaked afterwards."""

from __future__ import annotations

from actors.scheduling.block_pool import BlockPool
from actors.scheduling.planner import Planner, PlannerLimits
from actors.scheduling.request_state import RequestState
from protocols.messages import ImageInput, SampledToken, SamplingParams


def make(rid: str, prompt: list[int], max_tokens: int = 4, images=None) -> RequestState:
    return RequestState(rid, prompt, SamplingParams(), max_tokens, [0], images=images or [])


def planner(blocks: int = 32, bs: int = 4, budget: int = 64, seqs: int = 8, cache=True):
    pool = BlockPool(blocks, bs, cache)
    return Planner(pool, PlannerLimits(seqs, budget, 1024)), pool


def run_step(p: Planner, token: int = 7):
    plan = p.schedule()
    assert plan is not None
    sampled = [SampledToken(s.request_id, token) for s in plan.sequences if s.sample]
    return plan, p.update(sampled)


def test_long_prompt_is_chunked_and_decodes_keep_running() -> None:
    p, pool = planner(budget=8)
    p.add(make("short", [1, 2, 3]))
    plan, _ = run_step(p)
    assert [(s.request_id, len(s.token_ids)) for s in plan.sequences] == [("short", 3)]
    p.add(make("long", list(range(10, 30))))
    plan, _ = run_step(p)
    # The decode of "short" comes first; "long" gets the rest of the 8-token budget.
    assert [(s.request_id, len(s.token_ids), s.sample) for s in plan.sequences] == [
        ("short", 1, True),
        ("long", 7, False),
    ]
    plan, _ = run_step(p)
    assert plan.sequences[1].start_pos == 7 and len(plan.sequences[1].token_ids) == 7
    while p.has_work:
        run_step(p)
    assert pool.num_free == pool.num_blocks


def test_finished_request_frees_blocks_and_is_forgotten_by_executor() -> None:
    p, pool = planner()
    p.add(make("a", [1, 2, 3, 4, 5], max_tokens=2))
    _, up1 = run_step(p)
    assert up1.finished == []
    _, up2 = run_step(p)
    assert [f.reason for f in up2.finished] == ["length"]
    assert pool.num_free == pool.num_blocks
    plan = p.schedule()
    assert plan is not None and plan.finished_ids == ["a"] and plan.sequences == []


def test_eos_stops_unless_ignore_eos_or_min_tokens() -> None:
    p, _ = planner()
    r = make("a", [1, 2], max_tokens=5)
    p.add(r)
    _, up = run_step(p, token=0)
    assert up.finished[0].reason == "stop"
    r2 = make("b", [1, 2], max_tokens=3)
    r2.sampling.ignore_eos = True
    p.add(r2)
    for _ in range(2):
        _, up = run_step(p, token=0)
        assert up.finished == []
    _, up = run_step(p, token=0)
    assert up.finished[0].reason == "length"


def test_prefix_cache_shares_full_blocks_between_requests() -> None:
    p, pool = planner()
    shared = list(range(100, 112))  # three full blocks
    p.add(make("a", shared + [1, 2]))
    while p.has_work:
        run_step(p)
    p.add(make("b", shared + [3]))
    plan, _ = run_step(p)
    seq = plan.sequences[0]
    assert seq.start_pos == 12 and seq.token_ids == [3]
    assert p.requests["b"].num_cached_tokens == 12
    while p.has_work:
        run_step(p)
    assert pool.num_free == pool.num_blocks


def test_same_tokens_with_a_different_image_do_not_share_blocks() -> None:
    p, _ = planner()
    prompt = [5] * 12 + [6]
    p.add(make("a", prompt, images=[ImageInput("img-1", 2, 6, [1, 2, 2])]))
    while p.has_work:
        run_step(p)
    p.add(make("b", prompt, images=[ImageInput("img-2", 2, 6, [1, 2, 2])]))
    plan, _ = run_step(p)
    assert plan.sequences[0].start_pos == 0  # image sits in blocks 0-1: nothing reusable
    while p.has_work:
        run_step(p)
    p.add(make("c", prompt, images=[ImageInput("img-1", 2, 6, [1, 2, 2])]))
    plan, _ = run_step(p)
    assert plan.sequences[0].start_pos == 12


def test_preemption_recomputes_newest_request_and_frees_everything() -> None:
    p, pool = planner(blocks=4, bs=4, budget=64)
    p.add(make("old", [1] * 8, max_tokens=6))
    p.add(make("new", [2] * 8, max_tokens=6))
    run_step(p)  # both prefilled: 2 blocks each, pool full
    assert pool.num_free == 0
    plan, _ = run_step(p)
    # Both need a third block for position 8: the newest, "new", is preempted to make room.
    assert [s.request_id for s in plan.sequences] == ["old"]
    assert p.requests["new"].num_computed == 0 and p.requests["new"] in p.waiting
    assert plan.finished_ids == ["new"]  # the executor drops its state
    outputs_before = list(p.requests["new"].output_token_ids)
    while p.has_work:
        plan, _ = run_step(p)
        for s in plan.new_sequences:
            if s.request_id == "new":
                assert s.output_token_ids == outputs_before  # resumed with its outputs
    assert pool.num_free == pool.num_blocks


def test_abort_frees_blocks_of_waiting_and_running_requests() -> None:
    p, pool = planner(budget=4, seqs=1)
    p.add(make("run", list(range(12))))
    p.add(make("wait", [1, 2, 3]))
    run_step(p)
    assert p.abort("wait") is not None
    assert p.abort("run") is not None
    assert p.abort("nope") is None
    assert pool.num_free == pool.num_blocks and not p.has_work
    plan = p.schedule()
    assert plan is not None and plan.finished_ids == ["run"]


def test_max_num_seqs_limits_the_running_batch() -> None:
    p, _ = planner(seqs=2)
    for i in range(4):
        p.add(make(f"r{i}", [1, 2, 3]))
    plan, _ = run_step(p)
    assert len(plan.sequences) == 2 and len(p.waiting) == 2
