"""One request as the scheduler tracks it: its tokens, KV blocks, progress and stop rules."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from core.codec import Buffer
from protocols.messages import ImageInput, SamplingParams, TokenizedRequest


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    eos_token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    mrope_positions: Buffer | None = None
    mrope_position_delta: int = 0
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0
    on_executor: bool = False  # the executor holds per-request state for it
    announced: bool = False  # the detokenizer has seen its first delta
    first_token_time: float | None = None
    scheduled_time: float | None = None
    queued_time: float = field(default_factory=time.time)  # reached the scheduler
    num_preemptions: int = 0

    @classmethod
    def from_tokenized(cls, req: TokenizedRequest) -> RequestState:
        return cls(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling=req.sampling,
            max_tokens=req.max_tokens,
            eos_token_ids=req.eos_token_ids,
            images=req.images,
            mrope_positions=req.mrope_positions,
            mrope_position_delta=req.mrope_position_delta,
            arrival_time=req.arrival_time or time.time(),
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    def mm_info(self) -> dict | None:
        """Image sizes the client needs to map boxes back to its original image."""
        if not self.images:
            return None
        return {
            "images": [
                {"original_size": im.original_size, "resized_size": im.resized_size}
                for im in self.images
            ]
        }

    def image_keys(self, start: int, end: int) -> list[str]:
        """Content hashes of the images whose placeholder tokens overlap [start, end)."""
        return [
            im.content_hash
            for im in self.images
            if im.offset < end and im.offset + im.length > start
        ]

    def check_stop(self, token_id: int) -> tuple[str | None, int | str | None]:
        """Finish reason and stop reason after `token_id` was appended, or (None, None)."""
        n_out = len(self.output_token_ids)
        sp = self.sampling
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token_id in self.eos_token_ids:
                return "stop", None
            if token_id in sp.stop_token_ids:
                return "stop", token_id
        if n_out >= self.max_tokens:
            return "length", None
        return None, None
