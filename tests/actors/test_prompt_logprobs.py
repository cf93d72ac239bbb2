"""Prompt logprobs from the model runner (SamplingParams.prompt_logprobs) against transformers'
log-softmax of the same prompt, in one chunk, in chunks mixed with other requests, and across
a recompute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.execution import ModelRunner
from models import load_model
from models.decoder import Decoder
from protocols.messages import PositionLogprobs, PromptLogprobs, ScheduledSequence, StepPlan
from tests.fixtures.checkpoints import make_qwen2_checkpoint
from tests.models.paged_runner import greedy_request, paged_runner, run_plans

PROMPT = [9707, 11, 1879, 0, 3555, 374, 279, 6722, 315, 1207, 42, 17]
OTHER = [3555, 374, 279, 6722, 315]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("qwen2"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def model(qwen2: Path) -> Decoder:
    return load_model(str(qwen2), CPU, torch.float32)


def hf_prompt_logprobs(ckpt: Path, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each prompt position [L, V] (fp32)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def joined(parts: list[PromptLogprobs], request_id: str) -> list[PromptLogprobs]:
    return [p for p in parts if p.request_id == request_id]


def check_against(want: torch.Tensor, prompt: list[int], parts: list[PromptLogprobs], k: int):
    """Parts cover prompt tokens 1..L-1 once, in order, with transformers' values."""
    assert parts and parts[0].start == 1
    positions: list[PositionLogprobs] = []
    for part in parts:
        assert part.start == len(positions) + 1
        positions += part.positions
    assert len(positions) == len(prompt) - 1
    for i, pos in enumerate(positions):
        token = prompt[i + 1]
        row = want[i]
        assert pos.sampled.token_id == token
        assert pos.sampled.logprob == pytest.approx(row[token].item(), abs=1e-4)
        value = row[token]  # rank: 1 + how many tokens are likelier (near-ties either way)
        assert pos.sampled.rank is not None
        assert (
            int((row > value + 1e-4).sum())
            < pos.sampled.rank
            <= int((row > value - 1e-4).sum()) + 1
        )
        values, ids = row.topk(k)
        assert [t.token_id for t in pos.top] == ids.tolist()
        assert [t.logprob for t in pos.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert [t.rank for t in pos.top] == list(range(1, k + 1))


@pytest.mark.parametrize("prefill_chunk", [None, 5, 1])
def test_prompt_logprobs_match_transformers_whatever_the_chunks(
    qwen2: Path, model: Decoder, prefill_chunk: int | None
) -> None:
    runner = paged_runner(model, 32)
    requests = [
        greedy_request("a", PROMPT, 3, prompt_logprobs=2),
        greedy_request("b", OTHER, 3),  # no prompt logprobs: none reported
        greedy_request("c", OTHER, 3, prompt_logprobs=0),
    ]
    run_plans(runner, requests, 3, prefill_chunk)
    parts = runner.take_prompt_logprobs()
    assert runner.take_prompt_logprobs() == []
    assert joined(parts, "b") == []
    check_against(hf_prompt_logprobs(qwen2, PROMPT), PROMPT, joined(parts, "a"), 2)
    check_against(hf_prompt_logprobs(qwen2, OTHER), OTHER, joined(parts, "c"), 0)


def test_a_recompute_reports_no_prompt_position_twice(qwen2: Path, model: Decoder) -> None:
    runner: ModelRunner = paged_runner(model, 16)
    request = greedy_request("a", PROMPT, 4, prompt_logprobs=1)
    table = [3, 0, 5, 9]
    runner.execute(StepPlan(0, [ScheduledSequence("a", 0, 7, table, False)], [request]))
    # Preempted after its first chunk: recomputed from 0 in other blocks, then the rest.
    other = [11, 2, 14, 7]
    runner.execute(StepPlan(1, [ScheduledSequence("a", 0, 9, other, False)]))
    runner.execute(StepPlan(2, [ScheduledSequence("a", 9, 3, other, True)]))
    check_against(hf_prompt_logprobs(qwen2, PROMPT), PROMPT, runner.take_prompt_logprobs(), 1)
