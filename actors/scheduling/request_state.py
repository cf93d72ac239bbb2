"""One request as the scheduler tracks it: the EngineRequest it holds, plus KV progress, outputs,
timings and the token-level stop rules (the one place they are decided)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protocols.messages import EngineRequest, PositionLogprobs, PromptLogprobs


@dataclass(eq=False)  # identity: found in and removed from the queues by object
class RequestState:
    request: EngineRequest
    output_token_ids: list[int] = field(default_factory=list)  # tokens known to the scheduler
    num_computed: int = 0  # positions whose KV is computed or planned in a step in flight
    num_pending: int = 0  # planned sampling steps whose token is not known yet
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the confirmed full blocks
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    sent: bool = False  # the executor holds its EngineRequest (sent in StepPlan.new_requests)
    finished: bool = False
    num_preemptions: int = 0  # also the epoch of its KV progress: steps planned before are void
    queued_time: float = field(default_factory=time.time)  # reached the scheduler
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None  # for the inter-token latency figure
    # prompt_logprobs asked: prompt tokens 1.. in order as steps report them; sent, with the
    # prompt's ids, on the first delta (None after)
    prompt_logprobs: list[PositionLogprobs] | None = None

    def __post_init__(self) -> None:
        if self.request.sampling.prompt_logprobs is not None:
            self.prompt_logprobs = []

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def arrival_time(self) -> float:
        return self.request.arrival_time or self.queued_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus the outputs known so far."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        prompt = self.request.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_token_ids)[start:end]

    def add_prompt_logprobs(self, part: PromptLogprobs) -> None:
        """Keep a step's prompt logprobs; positions already held (a recompute) are skipped."""
        held = self.prompt_logprobs
        if held is None:
            return
        skip = len(held) + 1 - part.start  # prompt token 1 is held[0]
        if skip < 0:
            raise RuntimeError(
                f"request {self.request_id}: prompt logprobs from token {part.start}, "
                f"expected {len(held) + 1}"
            )
        held.extend(part.positions[skip:])

    def image_keys(self, start: int, end: int) -> list[str]:
        """Content hashes of the images whose placeholder tokens overlap [start, end)."""
        return [
            im.content_hash
            for im in self.request.images
            if im.offset < end and im.offset + im.length > start
        ]

    def at_length(self, num_outputs: int, max_model_len: int) -> bool:
        """Whether `num_outputs` output tokens end the request: max_tokens, or a full context."""
        return (
            num_outputs >= self.request.max_tokens
            or self.num_prompt_tokens + num_outputs >= max_model_len
        )

    def check_stop(self, token_id: int, max_model_len: int) -> tuple[str | None, int | str | None]:
        """Finish reason and stop reason after `token_id` was appended, or (None, None)."""
        n_out = len(self.output_token_ids)
        sp = self.request.sampling
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token_id in self.request.eos_token_ids:
                return "stop", None
            if token_id in sp.stop_token_ids:
                return "stop", token_id
        if self.at_length(n_out, max_model_len):
            return "length", None
        return None, None
