"""Structured outputs in the model runner (models/grammar.py): a random-weight model, which left
to itself writes gibberish, writes exactly what the format allows — schema-valid JSON, one of
the choices, a regex match — while an unconstrained request in the same batch is untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from models import load_model
from models.decoder import Decoder
from models.grammar import check, grammar_tokenizer
from models.tokenizer import TextTokenizer
from protocols.messages import EngineRequest, StructuredOutput
from tests.fixtures.checkpoints import make_qwen2_checkpoint
from tests.models.paged_runner import greedy_request, paged_runner, run_plans

torch.set_num_threads(2)

PROMPT = [9707, 11, 1879, 0, 3555, 374, 279, 6722, 315]
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "count": {"enum": [1, 2, 3]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["answer", "count", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Decoder:
    return load_model(str(checkpoint), torch.device("cpu"), torch.float32)


def generate(model: Decoder, checkpoint: Path, formats: list[StructuredOutput | None]) -> list[str]:
    """Greedy texts of one batch, one request per format, each cut at its first EOS."""
    tokenizer = TextTokenizer.load(str(checkpoint))
    requests = []
    for i, fmt in enumerate(formats):
        request = greedy_request(f"r{i}", PROMPT, 40, structured=fmt)
        request.eos_token_ids = tokenizer.eos_token_ids
        requests.append(request)
    runner = paged_runner(model, 128)
    runner.tokenizer = str(checkpoint)
    texts = []
    for job in run_plans(runner, requests, 40):
        ids = job.output
        for eos in tokenizer.eos_token_ids:
            if eos in ids:
                ids = ids[: ids.index(eos)]
        texts.append(tokenizer.decode(ids))
    return texts


def test_formats_are_followed_in_a_mixed_batch(model: Decoder, checkpoint: Path) -> None:
    formats = [
        StructuredOutput("json", json.dumps(SCHEMA)),
        None,
        StructuredOutput("choice", json.dumps(["positive", "negative"])),
        StructuredOutput("regex", r"[0-9]{3}-[a-z]{2}"),
    ]
    constrained, free, choice, regex = generate(model, checkpoint, formats)
    value = json.loads(constrained)
    assert value["answer"] in ("yes", "no") and value["count"] in (1, 2, 3)
    assert set(value) == {"answer", "count", "tags"} and len(value["tags"]) <= 2
    assert choice in ("positive", "negative")
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex)
    (alone,) = generate(model, checkpoint, [None])
    assert free == alone  # the unconstrained request of the batch is untouched


def test_formats_that_cannot_be_enforced_are_explained(checkpoint: Path) -> None:
    vocab = grammar_tokenizer(str(checkpoint), (151645,))
    assert check("json", json.dumps(SCHEMA), vocab) is None
    assert "not valid JSON" in (check("json", "{oops", vocab) or "")
    assert "regex" in (check("regex", "[unclosed", vocab) or "")
    assert "non-empty list of strings" in (check("choice", "[]", vocab) or "")
    assert check("grammar", 'start: "a" | "b"', vocab) is None
    assert check("grammar", "start: undefined_rule", vocab) is not None
    assert "unknown structured output kind" in (check("xml", "<a/>", vocab) or "")


def test_formats_hold_under_chunked_prefill_and_preemption(
    model: Decoder, checkpoint: Path
) -> None:
    """The matcher follows the tokens drawn, not the steps: prompt chunks of 3 and a recompute
    after a preemption give the same constrained answer as one plain run."""
    from protocols.messages import ScheduledSequence, StepPlan

    fmt = StructuredOutput("json", json.dumps(SCHEMA))
    tokenizer = TextTokenizer.load(str(checkpoint))
    (want,) = generate(model, checkpoint, [fmt])

    def request() -> EngineRequest:
        r = greedy_request("a", PROMPT, 40, structured=fmt)
        r.eos_token_ids = tokenizer.eos_token_ids
        return r

    chunked = paged_runner(model, 128)
    chunked.tokenizer = str(checkpoint)
    (job,) = run_plans(chunked, [request()], 40, prefill_chunk=3)
    ids = job.output
    cut = min(ids.index(e) for e in tokenizer.eos_token_ids if e in ids)
    assert tokenizer.decode(ids[:cut]) == want

    runner = paged_runner(model, 128)
    runner.tokenizer = str(checkpoint)
    blocks, other = list(range(0, 13)), list(range(20, 33))  # 4-token blocks, 49 tokens
    runner.execute(StepPlan(0, [ScheduledSequence("a", 0, len(PROMPT), blocks, True)], [request()]))
    state = runner.requests["a"]
    for step in range(1, 6):
        pos = state.num_tokens - 1
        runner.execute(StepPlan(step, [ScheduledSequence("a", pos, 1, blocks, True)]))
    # preempted, then recomputed over prompt + outputs in other blocks, and decoding goes on
    runner.execute(StepPlan(9, [ScheduledSequence("a", 0, state.num_tokens - 1, other, False)]))
    while len(state.output_token_ids) < 40:
        pos = state.num_tokens - 1
        runner.execute(StepPlan(10 + pos, [ScheduledSequence("a", pos, 1, other, True)]))
    ids = state.output_token_ids
    cut = min(ids.index(e) for e in tokenizer.eos_token_ids if e in ids)
    assert tokenizer.decode(ids[:cut]) == want
