"""Prompt logprobs (`echo`, vLLM's `prompt_logprobs`): after a step's forward, the logprob of
each prompt token at the position before it, its rank and the top k, for the requests that asked.
Called by the model runner; the executor sends the results with the step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from actors.execution.sequence import SequenceState
from protocols.messages import PositionLogprobs, PromptLogprobs, StepPlan, TokenLogprob

PROMPT_LOGPROB_ROWS = 512  # prompt rows per log-softmax over the vocabulary (bounds fp32 memory)


def score_prompts(
    plan: StepPlan,
    states: list[SequenceState],
    hidden: torch.Tensor,
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
) -> list[PromptLogprobs]:
    """For each sequence whose request asked prompt_logprobs: the logprob (fp32 log-softmax) of
    prompt token p + 1 read at each prompt position p the step ran (`hidden` rows in plan order),
    with its rank and the top k. A position is scored once: a recompute after a preemption skips
    those done."""
    out: list[PromptLogprobs] = []
    row = 0
    for s, state in zip(plan.sequences, states, strict=True):
        k = state.sampling.prompt_logprobs
        if k is None:  # the common case: nothing to score
            row += s.num_tokens
            continue
        first, end = s.start_pos, s.start_pos + s.num_tokens
        lo = max(first, state.prompt_logprobs_upto - 1)
        hi = min(end, len(state.prompt_token_ids) - 1)
        if lo < hi:
            state.prompt_logprobs_upto = hi + 1
            positions = []
            for at in range(lo, hi, PROMPT_LOGPROB_ROWS):
                upto = min(at + PROMPT_LOGPROB_ROWS, hi)
                rows = hidden[row + at - first : row + upto - first]
                targets = state.prompt_token_ids[at + 1 : upto + 1]
                positions += _positions(compute_logits(rows), targets, k)
            out.append(PromptLogprobs(state.request_id, lo + 1, positions))
        row += s.num_tokens
    return out


def _positions(logits: torch.Tensor, targets: list[int], k: int) -> list[PositionLogprobs]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, index)
    ranks = (logprobs > chosen).sum(dim=1) + 1
    chosen_l, ranks_l = chosen.squeeze(1).tolist(), ranks.tolist()
    top_v: list[list[float]] = [[] for _ in targets]
    top_i: list[list[int]] = [[] for _ in targets]
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        top_v, top_i = values.tolist(), ids.tolist()
    return [
        PositionLogprobs(
            TokenLogprob(t, chosen_l[i], rank=ranks_l[i]),
            [
                TokenLogprob(tid, v, rank=r + 1)
                for r, (tid, v) in enumerate(zip(top_i[i], top_v[i]))
            ],
        )
        for i, t in enumerate(targets)
    ]
