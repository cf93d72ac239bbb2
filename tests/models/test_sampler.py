"""Tests for the batched sampler: greedy, truncation, seeds, penalties, min_tokens, logit bias,
logprobs.

Pure CPU; reference values come from transformers' logits processors or are computed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from models import sampler
from models.sampler import (
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    sample,
)
from protocols.messages import SamplingParams

CPU = torch.device("cpu")


@dataclass
class Row:
    """One request, as models.sampler.SamplingRow asks; plain random sampling."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    min_tokens_stop_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


# make_batch's per-request columns (plural) -> the Row attribute each fills.
COLUMNS = {
    "temperatures": "temperature",
    "top_ps": "top_p",
    "top_ks": "top_k",
    "min_ps": "min_p",
    "presence_penalties": "presence_penalty",
    "frequency_penalties": "frequency_penalty",
    "repetition_penalties": "repetition_penalty",
    "min_tokens": "min_tokens",
    "stop_ids_for_min_tokens": "min_tokens_stop_ids",
    "prompt_token_ids": "prompt_token_ids",
    "output_token_ids": "output_token_ids",
    "generators": "generator",
    "logit_biases": "logit_bias",
}


def make_rows(n: int, max_logprobs: int = -1, **columns: list[Any]) -> list[Row]:
    """`n` plain random-sampling rows; each column gives one value per row; every row asks for
    `max_logprobs` alternatives (-1: none)."""
    logprobs = None if max_logprobs < 0 else max_logprobs
    rows = [Row(SamplingParams(logprobs=logprobs)) for _ in range(n)]
    for name, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            attribute = COLUMNS[name]
            setattr(row.sampling if hasattr(row.sampling, attribute) else row, attribute, value)
    return rows


def make_batch(n: int, vocab: int, **overrides: Any) -> SamplingBatch:
    """A batch of `n` plain random-sampling rows, with any per-request column overridden."""
    return SamplingBatch.build(make_rows(n, **overrides), vocab, CPU)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def random_logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=seeded(seed)) * 3


def test_zero_temperature_is_argmax() -> None:
    logits = random_logits(5, 100)
    out = sample(logits, make_batch(5, 100, temperatures=[0.0] * 5))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None
    assert make_batch(5, 100, temperatures=[0.0] * 5).all_greedy


def test_top_k_one_matches_greedy() -> None:
    logits = random_logits(8, 300, seed=1)
    for top_ps in ([1.0] * 8, [0.9] * 8):  # top-k alone and the sorted top-k + top-p path
        batch = make_batch(8, 300, top_ks=[1] * 8, top_ps=top_ps, temperatures=[1.5] * 8)
        assert torch.equal(sample(logits, batch).token_ids, logits.argmax(-1))


def test_tiny_top_p_matches_greedy() -> None:
    logits = random_logits(8, 300, seed=2)
    batch = make_batch(8, 300, top_ps=[1e-6] * 8, temperatures=[2.0] * 8)
    assert torch.equal(sample(logits, batch).token_ids, logits.argmax(-1))


def test_mixed_greedy_and_random_rows() -> None:
    vocab = 50
    logits = torch.zeros(4, vocab)  # uniform: random rows almost surely leave the argmax (0)
    temps = [0.0, 1.0, 0.0, 1.0]
    torch.manual_seed(0)
    outs = torch.stack(
        [sample(logits, make_batch(4, vocab, temperatures=temps)).token_ids for _ in range(20)]
    )
    assert (outs[:, 0] == 0).all() and (outs[:, 2] == 0).all()
    assert (outs[:, 1] != 0).any() and (outs[:, 3] != 0).any()


def test_top_k_and_top_p_keep_the_expected_tokens() -> None:
    probs = torch.tensor([[0.05, 0.4, 0.3, 0.15, 0.1]] * 2)
    logits = probs.log()
    kept_k = apply_top_k_top_p(logits, make_batch(2, 5, top_ks=[2, 0]))
    assert torch.isfinite(kept_k[0]).tolist() == [False, True, True, False, False]
    assert torch.isfinite(kept_k[1]).all()  # top_k=0 is disabled
    # p=0.8 needs 0.4 + 0.3 + 0.15 (0.85); p=0.5 needs 0.4 + 0.3 (0.7)
    kept_p = apply_top_k_top_p(logits, make_batch(2, 5, top_ps=[0.8, 0.5]))
    assert torch.isfinite(kept_p[0]).tolist() == [False, True, True, True, False]
    assert torch.isfinite(kept_p[1]).tolist() == [False, True, True, False, False]
    kept_min_p = apply_min_p(logits, make_batch(2, 5, min_ps=[0.5, 0.0]))
    assert torch.isfinite(kept_min_p[0]).tolist() == [False, True, True, False, False]
    assert torch.isfinite(kept_min_p[1]).all()


@pytest.mark.parametrize(
    ("candidates", "flat_row", "uses_candidates"),
    [(1024, True, True), (64, False, True), (64, True, False)],
)
def test_top_p_candidate_path_matches_full_sort(
    monkeypatch: pytest.MonkeyPatch, candidates: int, flat_row: bool, uses_candidates: bool
) -> None:
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", candidates)
    vocab = 300
    logits = random_logits(6, vocab, seed=6)
    if flat_row:  # its 0.9 nucleus spans most of the vocabulary, past 64 candidates
        logits[5] = 0.01 * logits[5]
    batch = make_batch(
        6,
        vocab,
        top_ps=[0.9, 0.5, 1.0, 0.95, 1.0, 0.9],
        top_ks=[0, 10, 20, 0, 0, 0],
    )
    candidate_result = sampler._top_k_top_p_among_candidates(logits, batch)
    assert (candidate_result is not None) == uses_candidates
    got = apply_top_k_top_p(logits, batch)
    want = sampler._top_k_top_p_sorted(logits, batch)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert torch.equal(got[torch.isfinite(got)], want[torch.isfinite(want)])
    assert torch.isfinite(got[4]).all()  # neither top-k nor top-p: untouched
    assert int(torch.isfinite(got[2]).sum()) == 20


def test_seed_reproducible_across_batch_compositions() -> None:
    vocab, steps = 1000, 12
    row = torch.zeros(vocab)  # uniform: every draw depends on the noise alone

    def run(batch_rows: int, seeded_row: int, companions: dict[int, int]) -> list[int]:
        gens: list[torch.Generator | None] = [None] * batch_rows
        gens[seeded_row] = seeded(1234)
        for index, seed in companions.items():
            gens[index] = seeded(seed)
        temps = [1.0] * batch_rows
        temps[(seeded_row + 1) % batch_rows] = 0.0 if batch_rows > 1 else 1.0
        tokens = []
        for _ in range(steps):
            batch = make_batch(batch_rows, vocab, temperatures=temps, generators=gens)
            tokens.append(int(sample(row.expand(batch_rows, vocab), batch).token_ids[seeded_row]))
        return tokens

    alone = run(1, 0, {})
    assert run(4, 2, {0: 7}) == alone
    assert run(6, 5, {1: 99, 3: 1234 + 1}) == alone
    assert run(1, 0, {}) == alone  # a fresh generator with the same seed replays the tokens
    other = seeded(4321)
    others = [
        int(sample(row[None], make_batch(1, vocab, generators=[other])).token_ids[0])
        for _ in range(steps)
    ]
    assert others != alone


def test_repetition_penalty_matches_transformers() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    vocab = 40
    logits = random_logits(2, vocab, seed=3)
    prompts = [[1, 2, 3, 3], [5, 6]]
    outputs = [[7, 1, 30], []]
    penalty = 1.3
    batch = make_batch(
        2,
        vocab,
        repetition_penalties=[penalty] * 2,
        prompt_token_ids=prompts,
        output_token_ids=outputs,
    )
    ours = apply_penalties(logits, batch)
    for i in range(2):
        input_ids = torch.tensor([prompts[i] + outputs[i]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=0, atol=0)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    vocab = 10
    logits = torch.arange(vocab, dtype=torch.float32).repeat(2, 1)
    batch = make_batch(
        2,
        vocab,
        presence_penalties=[0.5, 0.0],
        frequency_penalties=[0.25, -1.0],
        prompt_token_ids=[[9, 9, 9], [9]],
        output_token_ids=[[2, 2, 2, 4], [4]],
    )
    expected = logits.clone()
    expected[0, 2] -= 0.25 * 3 + 0.5
    expected[0, 4] -= 0.25 * 1 + 0.5
    expected[1, 4] -= -1.0 * 1
    assert torch.equal(apply_penalties(logits, batch), expected)
    no_penalty = make_batch(2, vocab)
    assert no_penalty.output_counts is None and no_penalty.seen_mask is None


def test_min_tokens_bans_stop_ids_until_reached() -> None:
    vocab, eos = 20, 3
    logits = torch.full((2, vocab), -5.0)
    logits[:, eos] = 10.0
    logits[:, 11] = 9.0
    batch = make_batch(
        2,
        vocab,
        temperatures=[0.0, 0.0],
        min_tokens=[3, 3],
        stop_ids_for_min_tokens=[[eos], [eos]],
        output_token_ids=[[5, 6], [5, 6, 7]],  # row 0 still short, row 1 has reached 3
    )
    assert sample(logits, batch).token_ids.tolist() == [11, eos]


def test_logit_bias_applies_to_its_own_rows_of_a_mixed_batch() -> None:
    vocab = 40
    logits = random_logits(4, vocab, seed=7)
    best = logits.argmax(-1).tolist()
    runner_up = logits.topk(2, dim=-1).indices[:, 1].tolist()
    worst = logits.argmin(-1).tolist()
    batch = make_batch(
        4,
        vocab,
        temperatures=[0.0, 0.0, 0.8, 0.8],
        logit_biases=[{best[0]: -100.0}, None, {worst[2]: 100.0}, {}],
        generators=[None, None, seeded(3), seeded(4)],
        max_logprobs=1,
    )
    greedy_ban = sample(logits, batch)
    assert greedy_ban.token_ids.tolist()[:3] == [runner_up[0], best[1], worst[2]]
    # logprobs stay those of the raw logits (vLLM's default), bias or not
    assert greedy_ban.logprobs is not None
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(
        greedy_ban.logprobs, raw.gather(1, greedy_ban.token_ids[:, None]).squeeze(1)
    )
    # the unbiased random row draws exactly what it draws in a batch without any bias
    plain = make_batch(
        4, vocab, temperatures=[0.0, 0.0, 0.8, 0.8], generators=[None, None, seeded(3), seeded(4)]
    )
    assert sample(logits, plain).token_ids[3] == greedy_ban.token_ids[3]


def test_logit_bias_adds_to_the_logits_before_penalties() -> None:
    vocab = 8
    logits = torch.zeros(2, vocab)
    logits[:, 2] = 1.0
    # +1.5 on token 5 beats token 2; repetition penalty 2 on token 5 (seen in the prompt) halves
    # the biased logit (1.5 -> 0.75), so token 2 wins again, as vLLM orders them
    batch = make_batch(
        2,
        vocab,
        temperatures=[0.0, 0.0],
        logit_biases=[{5: 1.5}, {5: 1.5}],
        repetition_penalties=[1.0, 2.0],
        prompt_token_ids=[[5], [5]],
    )
    assert sample(logits, batch).token_ids.tolist() == [5, 2]
    assert make_batch(2, vocab).bias_rows is None  # no request asked: no work


def test_logprobs_are_raw_log_softmax_and_top_ids_sorted() -> None:
    vocab = 64
    logits = random_logits(3, vocab, seed=4)
    batch = make_batch(
        3,
        vocab,
        temperatures=[0.0, 0.7, 1.0],
        top_ks=[0, 5, 0],
        repetition_penalties=[1.5, 1.0, 1.0],
        prompt_token_ids=[[int(logits[0].argmax())], [], []],
        generators=[None, seeded(1), seeded(2)],
        max_logprobs=4,
    )
    out = sample(logits, batch)
    raw = logits.log_softmax(-1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == (3, 4)
    assert torch.equal(out.top_ids, raw.argsort(-1, descending=True)[:, :4])
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_ids))


def test_temperature_sampling_frequencies_match_softmax() -> None:
    vocab, rows, temperature = 6, 20000, 0.7
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    batch = make_batch(
        rows, vocab, temperatures=[temperature] * rows, generators=[seeded(0)] + [None] * (rows - 1)
    )
    torch.manual_seed(0)  # fixed noise: the check is deterministic
    tokens = sample(logits.expand(rows, vocab), batch).token_ids
    observed = torch.bincount(tokens, minlength=vocab).float() / rows
    expected = (logits / temperature).softmax(-1)
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)


def test_logits_are_not_modified_in_place() -> None:
    logits = random_logits(2, 30, seed=5)
    before = logits.clone()
    batch = make_batch(
        2,
        30,
        temperatures=[0.5, 0.0],
        top_ps=[0.9, 1.0],
        top_ks=[10, 0],
        min_ps=[0.05, 0.0],
        repetition_penalties=[1.2, 1.2],
        presence_penalties=[0.3, 0.3],
        prompt_token_ids=[[1, 2], [3]],
        output_token_ids=[[4], [5]],
        min_tokens=[5, 5],
        stop_ids_for_min_tokens=[[0], [0]],
        logit_biases=[{1: 5.0}, {2: -5.0}],
        max_logprobs=0,
    )
    out = sample(logits, batch)
    assert torch.equal(logits, before)
    assert out.top_ids is not None and out.top_ids.shape == (2, 0)


def test_logits_must_match_the_batch_rows_and_vocab() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(1, 10), make_batch(2, 10))  # one settings row per logits row
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 11), make_batch(2, 10))


def test_max_logprobs_is_the_largest_any_row_asks_for() -> None:
    rows = make_rows(3)
    rows[0].sampling.logprobs, rows[2].sampling.logprobs = 2, 5
    batch = SamplingBatch.build(rows, 10, CPU)
    assert batch.max_logprobs == 5
    assert make_batch(3, 10).max_logprobs == -1
    out = sample(torch.randn(3, 10), batch)
    assert out.top_ids is not None and out.top_ids.shape == (3, 5)
