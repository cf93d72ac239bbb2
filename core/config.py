"""Engine configuration: one dataclass, built once from the command line (core/cli.py) and handed
to every actor.

Flag names follow vLLM where one exists, and vLLM's serving flags are accepted: the ones Tessera
implements act, the others are logged at start as having no effect. The seeds' aliases work too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import orjson


@dataclass
class EngineConfig:
    model: str = ""  # HF checkpoint folder or .gguf file; "" = the embedded default
    served_model_name: list[str] = field(default_factory=list)  # listed by /v1/models
    model_aliases: list[str] = field(default_factory=list)  # accepted too, not listed
    tokenizer: str = ""  # tokenizer folder or .gguf file; "" = the model's own
    chat_template: str | None = None  # template text replacing the checkpoint's; None = keep it
    trust_request_chat_template: bool = False  # vLLM's: a request's own chat_template is rendered
    generation_config: str = "auto"  # sampling defaults: auto (the model's) | vllm (none) | folder
    enable_auto_tool_choice: bool = False  # tool_choice "auto": parse the calls in answers
    tool_call_parser: str | None = None  # hermes | llama3_json (protocols/openai/tool_parsers.py)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    public_metrics: bool = False  # with api_key: /metrics answers without it too
    device: str = "auto"  # auto | cpu | cuda | npu | tpu
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    quantization: str = "none"  # none | int8 | int4 (at load) | a checkpoint format (models/quant)
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; overrides memory_utilization
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False  # vLLM's: no graph capture / compilation
    tensor_parallel_size: int = 1
    # Hosts: one launcher per host, each running its share of the tensor-parallel ranks; the
    # leader (node 0) runs every other stage. >1 puts every stage socket on tcp:// at master_addr.
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"  # the leader's address: stage sockets and the rendezvous
    master_port: int = 29500  # torch.distributed's rendezvous; stage sockets follow it
    tokenizer_workers: int = 1
    detokenizer_workers: int = 1
    image_workers: int = 1
    max_logprobs: int = 20  # most top logprobs a request may ask for; -1 = the vocabulary
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)  # {"image": 2}; {} = 64
    # Request caps, checked before any costly work (protocols/limits.py, protocols/openai/gate.py)
    max_num_queued_requests: int = 1024  # HTTP generation requests beyond max_num_seqs; then 429
    max_request_body_bytes: int = 32 << 20  # larger bodies get 413
    max_request_headers: int = 100  # more header lines get 431
    max_request_header_bytes: int = 16 << 10  # names and values together; more gets 431
    request_body_timeout_s: float = 30.0  # a body not whole by then gets 408
    max_messages: int = 2048  # chat messages per request
    max_prompt_chars: int = 1_000_000  # prompt text characters per request (all prompts, messages)
    max_n: int = 128  # choices per prompt (OpenAI's n)
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] = field(default_factory=list)
    threads: int | None = None  # torch intra-op threads on CPU
    seed: int = 0
    run_dir: str = ""  # private 0700 folder for ipc:// sockets; made by the supervisor
    transport: str = "ipc"  # ipc | tcp
    tcp_host: str = "127.0.0.1"
    tcp_base_port: int = 0  # 0: pick free ports
    http: bool = True  # start the OpenAI HTTP server
    root_path: str = ""  # the path prefix a proxy serves the API under
    allowed_origins: list[str] = field(default_factory=list)  # CORS; [] = no CORS headers
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    uvicorn_log_level: str = "warning"
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 3.0  # a stage silent this long is lost (frozen), as if it died
    restart_engine: bool = True  # a lost executor, scheduler or gateway restarts the engine
    request_timeout_s: float = 1800.0  # whole-request deadline at the gateway; 0 = none
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long requests in flight may take to finish
    log_level: str = "info"
    log_stats_interval_s: float = 5.0
    no_effect_flags: list[str] = field(default_factory=list)  # vLLM flags given; logged at start

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> EngineConfig:
        raw = orjson.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def model_names(self) -> list[str]:
        """The names /v1/models lists: --served-model-name, else --model as given (as vLLM)."""
        return self.served_model_name or [self.model]

    @property
    def accepted_model_names(self) -> list[str]:
        """Every name a request may send as `model`: the listed ones, then the aliases."""
        names = list(self.model_names)
        return names + [a for a in self.model_aliases if a not in names]

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def bind_host(self) -> str | None:
        """Where tcp:// stage sockets bind: on every interface when other hosts connect to the
        leader (a private network, as torch.distributed's own sockets need); else as named."""
        return "0.0.0.0" if self.multi_node else None

    @property
    def local_ranks(self) -> range:
        """The tensor-parallel ranks this launcher runs (an equal share per host)."""
        per_node = self.tensor_parallel_size // self.nnodes
        return range(self.node_rank * per_node, (self.node_rank + 1) * per_node)

    @property
    def uses_tls(self) -> bool:
        return bool(self.ssl_certfile)
