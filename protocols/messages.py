"""Every message that crosses a process boundary in the request path, declared in one place.

Client -> gateway -> tokenizer -> (image preprocessor) -> scheduler <-> executor -> detokenizer ->
gateway -> client. Headers are orjson; tensors ride as `Buffer` frames (see core.codec).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from core.codec import Buffer, Record, wire


@dataclass
class StructuredOutput:
    """A constraint on the whole output (vLLM's structured_outputs): `kind` json (spec: a JSON
    schema as text), regex, choice (spec: a JSON list of strings) or grammar (Lark or GBNF).
    Checked against the tokenizer by the tokenizer stage; enforced by the sampler as a mask."""

    kind: str
    spec: str


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
    # None: off; k >= 0: each prompt token's logprob plus k alternatives (vLLM's name). Such a
    # request reads no prefix-cache blocks, so every prompt position is computed.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, [-100, 100]
    structured: StructuredOutput | None = None  # the output must follow this (models/grammar.py)


@dataclass
class ErrorInfo:
    """An OpenAI-shaped error: message, type, param, code, plus the HTTP status it maps to."""

    message: str
    type: str = "BadRequestError"
    param: str | None = None
    code: int = 400

    def __post_init__(self) -> None:
        self.message = public_text(self.message)
        if self.param is not None:
            self.param = utf8_text(self.param)


_OBJECT_REPR = re.compile(r"<[^<>\n]{0,200}? at 0x[0-9a-fA-F]+>")  # <_io.BytesIO object at 0x..>
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{8,}\b")
_TRACEBACK = "Traceback (most recent call last)"


def public_text(message: str) -> str:
    """An error message as a client may see it: no tracebacks, object reprs or heap addresses
    (the last net; each stage words its own errors without them)."""
    if not isinstance(message, str):
        return "error"
    at = message.find(_TRACEBACK)
    if at >= 0:
        message = message[:at].rstrip() or "internal error"
    return utf8_text(_ADDRESS.sub("0x…", _OBJECT_REPR.sub("<object>", message)))


def utf8_text(text: str) -> str:
    """`text` with any lone surrogate (which UTF-8 cannot carry) written as its escape."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
    continue_final_message: bool = False  # leave the last message open for the model to go on
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, for the chat template
    chat_template: str | None = None  # replaces the server's; --trust-request-chat-template only
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
    request_id: str  # PING + a unique suffix: a client's keep-alive (see actors/request_table.py)


PING = "ping-"


@wire("health_reply")
@dataclass
class HealthReply(Record):
    request_id: str
    ready: bool
    facts: EngineFacts | None = None
    gateway: str = ""  # the answering gateway's instance: a new one lost every earlier request


@wire("tokenize")
@dataclass
class TokenizeRequest(Record):
    """Token ids of a prompt or of chat messages, made exactly as generation makes them (same
    tokenizer, chat template and rules). Client -> gateway -> tokenizer stage -> TokenizeReply.

    Exactly one of prompt or messages is set; `add_special_tokens` None means as generation does
    (BOS and the like added to a prompt, not to a rendered chat)."""

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None
    chat_template: str | None = None  # replaces the server's; --trust-request-chat-template only
    return_token_strs: bool = False


@wire("detokenize")
@dataclass
class DetokenizeRequest(Record):
    """The text of token ids (special tokens kept). Client -> gateway -> tokenizer stage."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)


@wire("tokenize_reply")
@dataclass
class TokenizeReply(Record):
    """The answer to a TokenizeRequest (token_ids, token_strs) or a DetokenizeRequest (text),
    or the error that refused it."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    token_strs: list[str] | None = None
    text: str = ""
    max_model_len: int = 0
    error: ErrorInfo | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    token: str = ""
    rank: int | None = None  # 1: the likeliest token; None: not computed (sampled tokens)


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
    # With SamplingParams.prompt_logprobs, on the first increment only: entry i is prompt token
    # i's (None for the first, which nothing predicts, as vLLM), the prompt's ids, and the name
    # of each prompt token (what `echo` lists as its tokens).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_token_strs: list[str] | None = None


@wire("outputs")
@dataclass
class OutputBatch(Record):
    """Outputs for several requests at once (detokenizer -> gateway -> client)."""

    outputs: list[RequestOutput]


# ---------------------------------------------------------------- engine facts


@dataclass
class EngineFacts:
    """What the engine learns at start (from executor rank 0) and every stage is handed.

    Travels inside the kernel's readiness info as a plain dict; `from_info` is the one reader.
    """

    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int
    eos_token_ids: list[int]
    architecture: str
    dtype: str
    image_token_id: int | None = None  # None: a text-only model
    spatial_merge_size: int = 2

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> EngineFacts:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in info.items() if k in names})

    def to_info(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def accepts_images(self) -> bool:
        return self.image_token_id is not None


# ---------------------------------------------------------------- engine internals


@dataclass
class ImageRef:
    """One image of a request: where its placeholder tokens sit in the prompt, its content hash
    (the key of its pixels on the executor and of its prefix-cache blocks) and its sizes."""

    content_hash: str
    offset: int
    length: int
    grid_thw: list[int]
    original_size: list[int] = field(default_factory=list)  # width, height
    resized_size: list[int] = field(default_factory=list)


@wire("pending_images")
@dataclass
class PendingImages(Record):
    """A tokenized request whose images are still to fetch (tokenizer -> image preprocessor).

    The prompt holds one image placeholder token per source, expanded by the image stage."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    image_sources: list[str]
    eos_token_ids: list[int] = field(default_factory=list)
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    arrival_time: float = 0.0


@wire("engine_request")
@dataclass
class EngineRequest(Record):
    """The one record of a request that is ready to schedule: the scheduler keeps it, and sends
    it unchanged to every executor rank the first time the request runs."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int  # resolved against max_model_len by the stage that knew the prompt length
    eos_token_ids: list[int] = field(default_factory=list)
    images: list[ImageRef] = field(default_factory=list)
    arrival_time: float = 0.0


@wire("image_pixels")
@dataclass
class ImagePixels(Record):
    """Preprocessed pixels of one image (image preprocessor -> every executor rank, directly).

    Sent before the request reaches the scheduler; the executor keeps them until the request
    that referenced them ends, so a preempted request never needs them sent again."""

    request_id: str
    content_hash: str
    grid_thw: list[int]
    pixel_values: Buffer  # float32 inputs, or uint8 samples mapped through value_table
    value_table: Buffer | None = None  # float32 [C, 256]: a channel's 8-bit value -> its input


@wire("stream_open")
@dataclass
class StreamOpen(Record):
    """What the detokenizer needs to know of a request before its first token (sent by the stage
    that emits the EngineRequest, to the detokenizer replica that owns the request)."""

    request_id: str
    sampling: SamplingParams
    prompt_tail_ids: list[int] = field(default_factory=list)  # last prompt ids, for spacing
    mm_info: dict[str, Any] | None = None  # {"images": [{"original_size", "resized_size"}]}


@wire("request_error")
@dataclass
class RequestError(Record):
    """A request refused by a stage before or during generation."""

    request_id: str
    error: ErrorInfo


@wire("request_moved")
@dataclass
class RequestMoved(Record):
    """A stage took a request in (image stage: hop "images", scheduler: hop "engine" -> the
    gateway). The gateway's table (actors/request_table.py) learns from it which stage holds the
    request, so the death of a stage fails the requests it held and leaves the others be."""

    request_id: str
    hop: str


@dataclass
class ScheduledSequence:
    """One request's share of a step: which of its tokens to run and where their KV lives.

    The executor knows every token of a request (its prompt, and each token it sampled itself),
    so a plan names positions, not ids: a decode can be planned before its token is known."""

    request_id: str
    start_pos: int  # tokens of this request already in the KV cache
    num_tokens: int  # run positions [start_pos, start_pos + num_tokens)
    block_table: list[int]
    sample: bool  # the last of these tokens ends the prompt or is a decode token


@wire("step_plan")
@dataclass
class StepPlan(Record):
    """The scheduler's plan for one forward step, sent to every executor rank.

    `new_requests` arrive the first time a request runs (not again after a preemption);
    `finished_ids` have ended and their executor state (and pixels) can be dropped."""

    step_id: int
    sequences: list[ScheduledSequence]
    new_requests: list[EngineRequest] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)


@dataclass
class SampledToken:
    request_id: str
    token_id: int
    logprobs: PositionLogprobs | None = None


@dataclass
class PromptLogprobs:
    """Logprobs of a run of one request's prompt tokens, computed by one step: positions[i]
    is prompt token start + i's (`sampled` is that token), read at position start + i - 1."""

    request_id: str
    start: int  # >= 1: the first prompt token has none
    positions: list[PositionLogprobs]


@wire("step_result")
@dataclass
class StepResult(Record):
    step_id: int
    sampled: list[SampledToken]
    elapsed_s: float = 0.0
    error: str | None = None  # the step raised: its requests fail, the engine carries on
    started_s: float = 0.0  # executor's time.perf_counter() as the forward began (0: unknown)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # filled by rank 0


@dataclass
class TokenDelta:
    """New tokens of one request; an empty delta with finish_reason "abort" closes its stream."""

    request_id: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    # With SamplingParams.prompt_logprobs, on the request's first delta: prompt tokens 1..n-1's
    # logprobs in order, and the prompt's ids (the detokenizer names them).
    prompt_logprobs: list[PositionLogprobs] | None = None
    prompt_token_ids: list[int] | None = None


@wire("token_batch")
@dataclass
class TokenBatch(Record):
    """New tokens of several requests (scheduler -> detokenizer)."""

    deltas: list[TokenDelta]
