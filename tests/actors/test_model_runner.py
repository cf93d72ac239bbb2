"""The executor's ModelRunner on tiny random checkpoints: request state across preemption, pixels
apart from requests, seeded sampling, plan errors, and loading with a CPU-sized KV pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.execution import KVLimits, ModelRunner
from devices.cpu import CpuPlatform
from models import load_model
from models.decoder import Decoder
from models.qwen2_5_vl import Qwen2_5_VLModel
from models.tokenizer import TextTokenizer
from protocols.messages import ScheduledSequence, StepPlan
from tests.fixtures.checkpoints import make_qwen2_checkpoint
from tests.fixtures.vl_checkpoint import (
    IMAGE_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    make_qwen2_5_vl_checkpoint,
)
from tests.models.paged_runner import greedy_request, paged_runner, run_plans
from tests.models.test_gguf_smollm2 import default_gguf_path
from tests.models.vl_runner import VLPrompt, vl_request

torch.set_num_threads(2)

PROMPT = [9707, 11, 1879, 0, 3555, 374, 279, 6722, 315]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("qwen2"), num_hidden_layers=1)


@pytest.fixture(scope="module")
def model(qwen2: Path) -> Decoder:
    return load_model(str(qwen2), CPU, torch.float32)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory: pytest.TempPathFactory) -> Qwen2_5_VLModel:
    path = make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("vl"))
    loaded = load_model(str(path), CPU, torch.float32)
    assert isinstance(loaded, Qwen2_5_VLModel)
    return loaded


def decode_until(
    runner: ModelRunner, rid: str, blocks: list[int], count: int, step: int = 100
) -> None:
    """Decode steps for `rid` until it has `count` output tokens."""
    state = runner.requests[rid]
    while len(state.output_token_ids) < count:
        pos = state.num_tokens - 1
        runner.execute(StepPlan(step, [ScheduledSequence(rid, pos, 1, blocks, True)]))
        step += 1


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.5, "seed": 7}])
def test_preemption_keeps_state_and_the_recompute_continues_the_same_tokens(
    model: Decoder, sampling: dict[str, object]
) -> None:
    want = run_plans(paged_runner(model, 16), [greedy_request("a", PROMPT, 8, **sampling)], 8)
    runner = paged_runner(model, 16)
    request = greedy_request("a", PROMPT, 8, **sampling)
    first = ScheduledSequence("a", 0, len(PROMPT), [3, 0, 5, 9], True)
    runner.execute(StepPlan(0, [first], [request]))
    decode_until(runner, "a", [3, 0, 5, 9], 4)
    state = runner.requests["a"]
    before = list(state.output_token_ids)
    # Preempted: its blocks were taken; later it is recomputed over prompt + outputs in other
    # blocks, from the runner's own state (the request is not sent again).
    other = [11, 2, 14, 7, 1]
    recompute = ScheduledSequence("a", 0, state.num_tokens - 1, other, False)
    runner.execute(StepPlan(10, [recompute]))
    assert runner.requests["a"] is state and state.output_token_ids == before
    decode_until(runner, "a", other, 8)
    assert state.output_token_ids == want[0].output


def test_recompute_in_chunks_samples_only_at_the_last_token(model: Decoder) -> None:
    want = run_plans(paged_runner(model, 16), [greedy_request("a", PROMPT, 6)], 6)[0].output
    runner = paged_runner(model, 16)
    runner.execute(
        StepPlan(
            0, [ScheduledSequence("a", 0, 9, [0, 1, 2], True)], [greedy_request("a", PROMPT, 6)]
        )
    )
    decode_until(runner, "a", [0, 1, 2], 3)
    table = [8, 6, 4, 10]
    chunks = [(0, 5, False), (5, 7, True)]  # all 12 tokens recomputed, the 13th sampled
    for i, (start, n, sample) in enumerate(chunks):
        out = runner.execute(StepPlan(20 + i, [ScheduledSequence("a", start, n, table, sample)]))
        assert [t.request_id for t in out] == (["a"] if sample else [])
    decode_until(runner, "a", table, 6)
    assert runner.requests["a"].output_token_ids == want


def test_seeded_sampling_is_reproducible_whatever_the_batch(model: Decoder) -> None:
    def run(requests: list[tuple[str, int | None]]) -> dict[str, list[int]]:
        reqs = [greedy_request(rid, PROMPT, 6, temperature=2.0, seed=s) for rid, s in requests]
        jobs = run_plans(paged_runner(model, 32), reqs, 6)
        return {j.request.request_id: j.output for j in jobs}

    alone = run([("x", 1234)])["x"]
    mixed = run([("a", None), ("x", 1234), ("b", 99)])
    assert mixed["x"] == alone
    assert run([("x", 4321)])["x"] != alone


def test_logprobs_come_with_the_alternatives_asked_for(model: Decoder) -> None:
    runner = paged_runner(model, 8)
    request = greedy_request("a", PROMPT, 4, logprobs=3)
    (token,) = runner.execute(
        StepPlan(0, [ScheduledSequence("a", 0, 9, [0, 1, 2], True)], [request])
    )
    assert token.logprobs is not None and len(token.logprobs.top) == 3
    assert token.logprobs.top[0].token_id == token.token_id  # greedy: the best one
    assert token.logprobs.sampled.logprob == pytest.approx(token.logprobs.top[0].logprob)


def test_plans_the_runner_cannot_follow_are_refused(model: Decoder) -> None:
    runner = paged_runner(model, 8)
    with pytest.raises(ValueError, match="unknown to this executor"):
        runner.execute(StepPlan(0, [ScheduledSequence("zz", 0, 9, [0, 1, 2], True)]))
    request = greedy_request("a", PROMPT, 4)
    early = ScheduledSequence("a", 0, 5, [0, 1, 2], True)  # samples mid-prompt
    with pytest.raises(ValueError, match="sampling after position 5"):
        runner.execute(StepPlan(1, [early], [request]))
    past = ScheduledSequence("a", 0, 10, [0, 1, 2], False)  # one token past the prompt
    with pytest.raises(ValueError, match=r"tokens \[0, 10\) asked, it has 9"):
        runner.execute(StepPlan(2, [past]))
    with pytest.raises(ValueError, match="already running"):
        runner.execute(StepPlan(3, [], [request]))
    runner.execute(StepPlan(4, [], [], ["a"]))
    assert not runner.requests


def test_pixels_arrive_apart_and_are_dropped_when_their_last_request_ends(
    vl_model: Qwen2_5_VLModel,
) -> None:
    image = (
        torch.randn(16, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0)),
        (1, 4, 4),
    )
    ids = [100, VISION_START_ID, *[IMAGE_TOKEN_ID] * 4, VISION_END_ID, 200, 300]
    a, a_pixels = vl_request("a", VLPrompt(ids, [image]), 4, IMAGE_TOKEN_ID)
    b, b_pixels = vl_request("b", VLPrompt(ids, [image]), 4, IMAGE_TOKEN_ID)  # the same image
    digest = a.images[0].content_hash
    runner = paged_runner(vl_model, 16)
    plan = StepPlan(0, [ScheduledSequence("a", 0, len(ids), [0, 1, 2], True)], [a])
    assert runner.missing_pixels(plan) == {digest}
    runner.add_pixels(b_pixels[0])  # b's copy does not count for a
    assert runner.missing_pixels(plan) == {digest}
    runner.add_pixels(a_pixels[0])
    assert runner.missing_pixels(plan) == set() and len(runner.pixels) == 1
    (first,) = runner.execute(plan)
    assert runner.encoder_cache.encoded == 1
    runner.execute(StepPlan(1, [], [], ["a"]))  # b still holds the image
    assert "a" not in runner.requests and len(runner.pixels) == 1
    plan = StepPlan(2, [ScheduledSequence("b", 0, len(ids), [5, 4, 3], True)], [b])
    assert runner.missing_pixels(plan) == set()
    assert [t.token_id for t in runner.execute(plan)] == [first.token_id]
    runner.execute(StepPlan(3, [], [], ["b"]))
    assert len(runner.pixels) == 0 and not runner.requests


def test_pixels_of_a_request_that_ended_before_it_ran_are_dropped(
    vl_model: Qwen2_5_VLModel,
) -> None:
    image = (torch.zeros(16, 1176), (1, 4, 4))
    ids = [VISION_START_ID, *[IMAGE_TOKEN_ID] * 4, VISION_END_ID]
    request, pixels = vl_request("gone", VLPrompt(ids, [image]), 4, IMAGE_TOKEN_ID)
    runner = paged_runner(vl_model, 4)
    runner.add_pixels(pixels[0])
    plan = StepPlan(0, [], [request], ["gone"])  # finished in the plan that would admit it
    assert runner.missing_pixels(plan) == set()
    runner.execute(plan)
    assert len(runner.pixels) == 0 and not runner.requests


def test_vl_runner_computes_mrope_positions_from_the_image_grids(
    vl_model: Qwen2_5_VLModel,
) -> None:
    image = (torch.zeros(16, 1176), (1, 4, 4))
    ids = [7, VISION_START_ID, *[IMAGE_TOKEN_ID] * 4, VISION_END_ID, 8]
    request, pixels = vl_request("a", VLPrompt(ids, [image]), 4, IMAGE_TOKEN_ID)
    runner = paged_runner(vl_model, 4)
    runner.add_pixels(pixels[0])
    runner.execute(StepPlan(0, [], [request]))
    state = runner.requests["a"]
    assert state.mrope_positions is not None
    assert state.mrope_positions[:, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]
    assert state.mrope_positions[:, -1].tolist() == [5, 5, 5] and state.mrope_delta == -2
    assert runner.facts.image_token_id == IMAGE_TOKEN_ID and runner.facts.accepts_images


def test_load_sizes_a_cpu_pool_for_max_num_seqs_sequences(qwen2: Path) -> None:
    limits = KVLimits(max_model_len=64, max_num_seqs=3)
    runner = ModelRunner.load(
        str(qwen2), CpuPlatform(), dtype="float32", block_size=8, limits=limits
    )
    facts = runner.facts
    assert (facts.num_blocks, facts.block_size, facts.max_model_len) == (24, 8, 64)
    assert (facts.architecture, facts.dtype, facts.image_token_id) == ("qwen2", "float32", None)
    assert facts.eos_token_ids == runner.model.config.eos_token_ids
    assert not any(isinstance(m, torch.nn.Linear) for m in runner.model.modules())  # packed


def test_bf16_runner_answers_like_the_fp32_one() -> None:
    """The CPU's bf16 kernels (matrix-vector for one row, W @ x.T for 2-63 rows, F.linear from
    64) keep the real SmolLM2's greedy answer: one request (a 37-row prefill, then one-row
    decodes) and three together (a 111-row prefill, then three-row decodes). A layout slip in
    one kernel once changed this answer while every fp32 parity test still passed."""
    path = default_gguf_path()
    tokenizer = TextTokenizer.load(path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.encode(
        tokenizer.apply_chat_template(chat, add_generation_prompt=True), add_special_tokens=False
    )
    answers: dict[torch.dtype, list[str]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        runner = paged_runner(load_model(path, CPU, dtype), 64)
        answers[dtype] = []
        for batch in (1, 3):
            requests = [greedy_request(f"r{batch}-{i}", ids, 8) for i in range(batch)]
            jobs = run_plans(runner, requests, 8, prefill_chunk=None)
            answers[dtype] += [tokenizer.decode(j.output) for j in jobs]
    assert answers[torch.float32] == ["The capital of France is Paris."] * 4
    assert answers[torch.bfloat16] == answers[torch.float32]
