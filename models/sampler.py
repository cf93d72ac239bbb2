"""Batched token sampler: logit bias, min-tokens bans, penalties, temperature, min-p, top-k/top-p,
seeded draws.

Runs in the executor's model runner on the device, once per step, on the final-position logits of
every sequence that samples.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Protocol

import torch

SAMPLING_EPS = 1e-5  # a temperature below this means greedy (vLLM's convention)
TOP_P_CANDIDATES = 1024  # top-p looks among this many best tokens before sorting them all


class SamplingSettings(Protocol):
    """What a client asked of sampling (protocols.messages.SamplingParams is one). Disabled
    values follow vLLM: top_k <= 0, top_p 1.0, min_p 0.0, penalties 0.0 / 1.0, logprobs None."""

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_p(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def logprobs(self) -> int | None: ...
    @property
    def logit_bias(self) -> dict[int, float] | None: ...


class SamplingRow(Protocol):
    """What the sampler reads of one request (one logits row); the runner's request state is one.

    `min_tokens_stop_ids` (eos + stop ids) are banned while the output is shorter than
    `sampling.min_tokens`. `generator` (on the sampling device) makes the row's draws
    reproducible."""

    @property
    def sampling(self) -> SamplingSettings: ...
    @property
    def min_tokens_stop_ids(self) -> Sequence[int]: ...
    @property
    def prompt_token_ids(self) -> Sequence[int]: ...
    @property
    def output_token_ids(self) -> Sequence[int]: ...
    @property
    def generator(self) -> torch.Generator | None: ...


@dataclass
class SamplingBatch:
    """Per-request sampling settings of one step as device tensors; features nobody uses are None.

    Row i of every tensor belongs to row i of the logits. Built once per step by `build`.
    """

    vocab_size: int
    temperatures: torch.Tensor  # [B] float; 1.0 on greedy rows so division is harmless
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    all_random: bool
    max_logprobs: int  # top-k logprobs to return; -1 = no request asked for logprobs
    top_ks: torch.Tensor | None = None  # [B] long; vocab_size where disabled
    top_k_max: int = 0  # largest enabled top-k
    top_ps: torch.Tensor | None = None  # [B] float; 1.0 where disabled
    min_ps: torch.Tensor | None = None  # [B] float; 0.0 where disabled
    repetition_penalties: torch.Tensor | None = None  # [B] float; 1.0 where disabled
    seen_mask: torch.Tensor | None = None  # [B, V] bool: token occurs in prompt or output
    presence_penalties: torch.Tensor | None = None  # [B] float
    frequency_penalties: torch.Tensor | None = None  # [B] float
    output_counts: torch.Tensor | None = None  # [B, V] float: occurrences in the output
    ban_rows: torch.Tensor | None = None  # [N] long: (row, token) pairs forced to -inf
    ban_ids: torch.Tensor | None = None  # [N] long
    bias_rows: torch.Tensor | None = None  # [M] long: (row, token) pairs whose logit is biased
    bias_ids: torch.Tensor | None = None  # [M] long
    bias_values: torch.Tensor | None = None  # [M] float: added to those logits
    generators: list[tuple[int, torch.Generator]] = field(default_factory=list)  # seeded rows

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        """Turn per-request settings (row i of `rows` samples row i of the logits) into device
        tensors. A row's generator is advanced only when that row samples randomly."""
        n = len(rows)
        temperatures = [r.sampling.temperature for r in rows]
        top_ps = [r.sampling.top_p for r in rows]
        top_ks = [r.sampling.top_k for r in rows]
        min_ps = [r.sampling.min_p for r in rows]
        presence_penalties = [r.sampling.presence_penalty for r in rows]
        frequency_penalties = [r.sampling.frequency_penalty for r in rows]
        repetition_penalties = [r.sampling.repetition_penalty for r in rows]
        prompt_token_ids = [r.prompt_token_ids for r in rows]
        output_token_ids = [r.output_token_ids for r in rows]
        generators = [r.generator for r in rows]
        asked = [lp for r in rows if (lp := r.sampling.logprobs) is not None]
        max_logprobs = max(asked) if asked else -1

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        greedy = [t < SAMPLING_EPS for t in temperatures]
        random_rows = [i for i in range(n) if not greedy[i]]
        if random_rows:
            temps = floats([1.0 if g else t for g, t in zip(greedy, temperatures, strict=True)])
            greedy_mask = torch.tensor(greedy, dtype=torch.bool, device=device)
        else:  # the common all-greedy batch: no host-to-device copy per step
            temps, greedy_mask = _all_greedy(n, device)
        batch = cls(
            vocab_size=vocab_size,
            temperatures=temps,
            greedy=greedy_mask,
            all_greedy=not random_rows,
            all_random=len(random_rows) == n,
            max_logprobs=max_logprobs,
            generators=[(i, g) for i in random_rows if (g := generators[i]) is not None],
        )

        # Truncation only shapes random draws, so greedy rows count as disabled.
        ks = [
            vocab_size if g or k <= 0 or k >= vocab_size else k
            for g, k in zip(greedy, top_ks, strict=True)
        ]
        if any(k < vocab_size for k in ks):
            batch.top_ks = torch.tensor(ks, dtype=torch.long, device=device)
            batch.top_k_max = max(k for k in ks if k < vocab_size)
        ps = [1.0 if g or p >= 1.0 else p for g, p in zip(greedy, top_ps, strict=True)]
        if any(p < 1.0 for p in ps):
            batch.top_ps = floats(ps)
        mps = [0.0 if g or m <= 0.0 else m for g, m in zip(greedy, min_ps, strict=True)]
        if any(m > 0.0 for m in mps):
            batch.min_ps = floats(mps)

        # Penalties change the argmax too, so they apply to greedy rows as well.
        use_repetition = any(r != 1.0 for r in repetition_penalties)
        use_additive = any(p != 0.0 for p in presence_penalties) or any(
            f != 0.0 for f in frequency_penalties
        )
        if use_repetition:
            batch.repetition_penalties = floats(repetition_penalties)
            seen = torch.zeros(n, vocab_size + 1, dtype=torch.bool, device=device)
            seen.scatter_(1, _padded(prompt_token_ids, vocab_size, device), True)
            seen.scatter_(1, _padded(output_token_ids, vocab_size, device), True)
            batch.seen_mask = seen[:, :vocab_size]
        if use_additive:
            batch.presence_penalties = floats(presence_penalties)
            batch.frequency_penalties = floats(frequency_penalties)
            ids = _padded(output_token_ids, vocab_size, device)
            counts = torch.zeros(n, vocab_size + 1, dtype=torch.float32, device=device)
            counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=torch.float32, device=device))
            batch.output_counts = counts[:, :vocab_size]

        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, r in enumerate(rows):
            if len(output_token_ids[i]) < r.sampling.min_tokens:
                ids_in_vocab = [t for t in r.min_tokens_stop_ids if 0 <= t < vocab_size]
                ban_rows += [i] * len(ids_in_vocab)
                ban_ids += ids_in_vocab
        if ban_ids:
            batch.ban_rows = torch.tensor(ban_rows, dtype=torch.long, device=device)
            batch.ban_ids = torch.tensor(ban_ids, dtype=torch.long, device=device)

        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        for i, r in enumerate(rows):
            for token, bias in (r.sampling.logit_bias or {}).items():
                if 0 <= token < vocab_size:
                    bias_rows.append(i)
                    bias_ids.append(token)
                    bias_values.append(bias)
        if bias_ids:
            batch.bias_rows = torch.tensor(bias_rows, dtype=torch.long, device=device)
            batch.bias_ids = torch.tensor(bias_ids, dtype=torch.long, device=device)
            batch.bias_values = floats(bias_values)
        return batch


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None  # [B] raw-logit logprob of the sampled token; None if unasked
    top_ids: torch.Tensor | None  # [B, max_logprobs] long, most likely first
    top_logprobs: torch.Tensor | None  # [B, max_logprobs] float


@functools.lru_cache(maxsize=128)
def _all_greedy(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperatures (all 1.0) and the greedy mask (all True) of an all-greedy batch of n rows;
    shared between steps, never written."""
    return torch.ones(n, device=device), torch.ones(n, dtype=torch.bool, device=device)


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[B, longest] long tensor of `rows`, right-padded with `pad`, from one host tensor."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    width = int(lengths.max()) if len(rows) else 0
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    out[torch.arange(width) < lengths[:, None]] = torch.tensor(
        list(chain.from_iterable(rows)), dtype=torch.long
    )
    return out.to(device)


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """OpenAI's logit_bias: each request's biases added to its own row (greedy rows too)."""
    if batch.bias_rows is None or batch.bias_ids is None or batch.bias_values is None:
        return logits
    values = batch.bias_values.to(logits.dtype)
    return logits.index_put((batch.bias_rows, batch.bias_ids), values, accumulate=True)


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Stop tokens of requests still short of min_tokens become impossible."""
    if batch.ban_rows is None or batch.ban_ids is None:
        return logits
    minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    return logits.index_put((batch.ban_rows, batch.ban_ids), minus_inf)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (HF: over prompt + output), then frequency and presence (OpenAI: output only)."""
    if batch.repetition_penalties is not None and batch.seen_mask is not None:
        penalty = batch.repetition_penalties[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, penalised, logits)
    if (
        batch.output_counts is not None
        and batch.frequency_penalties is not None
        and batch.presence_penalties is not None
    ):
        counts = batch.output_counts
        logits = (
            logits
            - batch.frequency_penalties[:, None] * counts
            - batch.presence_penalties[:, None] * (counts > 0).to(logits.dtype)
        )
    return logits


def apply_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's most likely token's."""
    if batch.min_ps is None:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * batch.min_ps[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Keep the k best tokens, then the smallest set whose probability reaches p (ties kept)."""
    if batch.top_ks is None and batch.top_ps is None:
        return logits
    vocab = logits.shape[-1]
    if batch.top_ps is None and batch.top_ks is not None:
        # Top-k alone: the k-th largest value per row from one topk, no full-vocabulary sort.
        best = logits.topk(batch.top_k_max, dim=-1).values
        kth = best.gather(1, (batch.top_ks.clamp(max=batch.top_k_max) - 1)[:, None])
        kth = kth.masked_fill(batch.top_ks[:, None] >= vocab, float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
    truncated = _top_k_top_p_among_candidates(logits, batch)
    return truncated if truncated is not None else _top_k_top_p_sorted(logits, batch)


def _top_k_top_p_among_candidates(
    logits: torch.Tensor, batch: SamplingBatch
) -> torch.Tensor | None:
    """Top-p over the best TOP_P_CANDIDATES tokens only; None when some row's nucleus is wider.

    A full sort of [B, V] costs about a second on a small CPU at V = 152k; a topk costs ~20 ms.
    """
    assert batch.top_ps is not None
    vocab = logits.shape[-1]
    count = min(vocab, max(batch.top_k_max, TOP_P_CANDIDATES))
    values, ids = logits.topk(count, dim=-1)  # descending
    top_ps = batch.top_ps
    no_top_k = torch.ones_like(top_ps, dtype=torch.bool)
    if batch.top_ks is not None:
        no_top_k = batch.top_ks >= vocab
        kth = values.gather(1, (batch.top_ks.clamp(max=count) - 1)[:, None])
        values = values.masked_fill((values < kth) & ~no_top_k[:, None], float("-inf"))
    # Top-p renormalises over the top-k survivors, over the whole vocabulary otherwise.
    log_total = torch.where(no_top_k, logits.logsumexp(dim=-1), values.logsumexp(dim=-1))
    probs = (values - log_total[:, None]).exp()
    cumulative = probs.cumsum(dim=-1)
    if bool((no_top_k & (top_ps < 1.0) & (cumulative[:, -1] < top_ps)).any()):
        return None  # a flat distribution: the nucleus reaches past the candidates
    drop = cumulative - probs >= top_ps[:, None]  # the mass above this token already reaches p
    drop[:, 0] = False  # the best token always survives
    values = values.masked_fill(drop, float("-inf"))
    truncated = torch.full_like(logits, float("-inf")).scatter_(1, ids, values)
    unrestricted = no_top_k & (top_ps >= 1.0)
    return torch.where(unrestricted[:, None], logits, truncated)


def _top_k_top_p_sorted(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Reference path over a full ascending sort (vLLM's formulation)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending: the best token is last
    if batch.top_ks is not None:
        kth = sorted_logits.gather(1, (vocab - batch.top_ks).clamp(min=0)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if batch.top_ps is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - batch.top_ps[:, None]
        drop[:, -1] = False  # the best token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def random_sample(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Exponential race: argmax(p / Exp(1)) draws from p. Seeded rows use only their generator.

    Exp(1) noise is -log(U), U ~ [0, 1): never 0 (so a masked token can never win by 0 / 0),
    and uniform_ + log is ~3x faster than exponential_ on CPU.
    """
    noise = torch.empty_like(probs)
    if len(batch.generators) < probs.shape[0]:
        noise.uniform_()
    for row, generator in batch.generators:
        noise[row].uniform_(generator=generator)
    noise = noise.log_().neg_()
    return probs.div_(noise).argmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Pick one token per row of fp32 `logits` [B, V]; `logits` itself is left unchanged."""
    if logits.shape[-1] != batch.vocab_size:
        raise ValueError(
            f"logits have {logits.shape[-1]} columns, batch expects {batch.vocab_size}"
        )
    if logits.shape[0] != batch.temperatures.shape[0]:
        raise ValueError(
            f"logits have {logits.shape[0]} rows, batch has {batch.temperatures.shape[0]}"
        )
    raw_logprobs = logits.log_softmax(dim=-1) if batch.max_logprobs >= 0 else None

    logits = apply_penalties(apply_min_tokens(apply_logit_bias(logits, batch), batch), batch)
    greedy_ids = None if batch.all_random else logits.argmax(dim=-1)
    if greedy_ids is not None and batch.all_greedy:
        token_ids = greedy_ids
    else:
        logits = logits / batch.temperatures[:, None]
        logits = apply_top_k_top_p(apply_min_p(logits, batch), batch)
        random_ids = random_sample(logits.softmax(dim=-1), batch)
        token_ids = (
            random_ids if greedy_ids is None else torch.where(batch.greedy, greedy_ids, random_ids)
        )

    if raw_logprobs is None:
        return SamplerOutput(token_ids, None, None, None)
    logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
    top_logprobs, top_ids = raw_logprobs.topk(min(batch.max_logprobs, batch.vocab_size), dim=-1)
    return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)
