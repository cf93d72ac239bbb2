"""One request as the executor's model runner knows it: the EngineRequest, the tokens sampled for it,
its seeded generator and (M-RoPE models) its prompt's 3-D positions. Read by the sampler."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.grammar import Constraint
from protocols.messages import EngineRequest, SamplingParams


@dataclass
class SequenceState:
    """Lives from the request's first step until it appears in a plan's finished_ids; a
    preemption leaves it untouched (the recompute reads the same tokens). Satisfies
    models.sampler.SamplingRow."""

    request: EngineRequest
    generator: torch.Generator | None = None
    mrope_positions: torch.Tensor | None = None  # int64 [3, prompt_len]; None for text models
    mrope_delta: int = 0  # a generated token at index i has M-RoPE position i + delta
    output_token_ids: list[int] = field(default_factory=list)
    constraint: Constraint | None = None  # structured output: the tokens allowed next
    prompt_logprobs_upto: int = 1  # prompt tokens [1, upto) have had their logprobs computed

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output; raises if the request has not got that far."""
        if not 0 <= start < end <= self.num_tokens:
            raise ValueError(
                f"request {self.request_id}: tokens [{start}, {end}) asked, "
                f"it has {self.num_tokens}"
            )
        prompt = self.request.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        outputs = self.output_token_ids[max(start - len(prompt), 0) : end - len(prompt)]
        return prompt[start:] + outputs if start < len(prompt) else outputs

    # ------------------------------------------------------------ models.sampler.SamplingRow

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def min_tokens_stop_ids(self) -> list[int]:
        return self.request.eos_token_ids + self.request.sampling.stop_token_ids
