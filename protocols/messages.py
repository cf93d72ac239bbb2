"""Every message that crosses a process boundary in the request path, declared in one place.

Client -> gateway -> tokenizer -> (image preprocessor) -> scheduler <-> executor -> detokenizer ->
gateway -> client. Headers are orjson; tensors ride as `Buffer` frames (see core.codec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.codec import Buffer, Record, wire


@dataclass
class SamplingParams:
    """What a client asks of sampling; mirrors vLLM's SamplingParams names."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # None: off; k >= 0: sampled token plus k alternatives
    skip_special_tokens: bool = True


@dataclass
class ErrorInfo:
    """An OpenAI-shaped error: message, type, param, code, plus the HTTP status it maps to."""

    message: str
    type: str = "BadRequestError"
    param: str | None = None
    code: int = 400


# ---------------------------------------------------------------- client <-> gateway


@wire("generate")
@dataclass
class GenerateRequest(Record):
    """A client's request: exactly one of prompt, prompt_token_ids or messages is set."""

    request_id: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    arrival_time: float = 0.0


@wire("abort")
@dataclass
class AbortRequest(Record):
    """Stop a request everywhere and free its KV blocks (client cancel, stop string, error)."""

    request_id: str
    reason: str = "abort"


@wire("health")
@dataclass
class HealthRequest(Record):
    request_id: str


@wire("health_reply")
@dataclass
class HealthReply(Record):
    request_id: str
    ready: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    token: str = ""


@dataclass
class PositionLogprobs:
    """Logprob of the sampled token at one position, and the top alternatives there."""

    sampled: TokenLogprob
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One increment of a request's output, as the client sees it."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: ErrorInfo | None = None
    mm_info: dict[str, Any] | None = None  # {"images": [{"original_size", "resized_size"}]}


@wire("outputs")
@dataclass
class OutputBatch(Record):
    """Outputs for several requests at once (detokenizer -> gateway -> client)."""

    outputs: list[RequestOutput]


# ---------------------------------------------------------------- engine internals


@dataclass
class ImageInput:
    """One preprocessed image and where its placeholder tokens sit in the prompt."""

    content_hash: str
    offset: int
    length: int
    grid_thw: list[int]
    pixel_values: Buffer | None = None
    original_size: list[int] = field(default_factory=list)  # width, height
    resized_size: list[int] = field(default_factory=list)


@wire("tokenized")
@dataclass
class TokenizedRequest(Record):
    """A request ready to schedule: prompt ids, resolved limits and stop ids, images if any."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    eos_token_ids: list[int] = field(default_factory=list)
    images: list[ImageInput] = field(default_factory=list)
    mrope_positions: Buffer | None = None  # int64 [3, prompt_len] for M-RoPE models
    mrope_position_delta: int = 0
    arrival_time: float = 0.0
    image_sources: list[str] = field(default_factory=list)  # still to fetch (image stage)
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)


@wire("request_error")
@dataclass
class RequestError(Record):
    """A request refused by a stage before or during generation."""

    request_id: str
    error: ErrorInfo


@dataclass
class ScheduledSequence:
    """One request's share of a step: the tokens to run and where their KV lives."""

    request_id: str
    token_ids: list[int]
    start_pos: int  # tokens of this request already in the KV cache
    block_table: list[int]
    sample: bool  # the last token of this chunk ends the prompt or is a decode token


@dataclass
class NewSequence:
    """Executor-side state for a request it sees for the first time."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    mrope_positions: Buffer | None = None
    mrope_position_delta: int = 0
    output_token_ids: list[int] = field(default_factory=list)  # after preemption: recompute


@wire("step_plan")
@dataclass
class StepPlan(Record):
    """The scheduler's plan for one forward step, sent to every executor rank."""

    step_id: int
    sequences: list[ScheduledSequence]
    new_sequences: list[NewSequence] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)


@dataclass
class SampledToken:
    request_id: str
    token_id: int
    logprobs: PositionLogprobs | None = None


@wire("step_result")
@dataclass
class StepResult(Record):
    step_id: int
    sampled: list[SampledToken]
    elapsed_s: float = 0.0
    error: str | None = None  # the step raised: its requests fail, the engine carries on


@dataclass
class TokenDelta:
    request_id: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    sampling: SamplingParams | None = None  # sent with the first delta of a request
    mm_info: dict[str, Any] | None = None  # first delta: image sizes (original, resized)


@wire("token_batch")
@dataclass
class TokenBatch(Record):
    """New tokens of several requests (scheduler -> detokenizer)."""

    deltas: list[TokenDelta]
