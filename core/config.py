"""Engine configuration: one dataclass built once from the command line and handed to every actor.

Flag names follow vLLM where one exists; the seeds' aliases are accepted too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

import orjson


@dataclass
class EngineConfig:
    model: str = ""  # HF checkpoint folder or .gguf file; "" = the embedded default
    served_model_name: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "auto"  # auto | cpu | cuda | npu | tpu
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes; overrides memory_utilization
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    tokenizer_workers: int = 1
    detokenizer_workers: int = 1
    image_workers: int = 1
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] = field(default_factory=list)
    threads: int | None = None  # torch intra-op threads on CPU
    seed: int = 0
    run_dir: str = ""  # private 0700 folder for ipc:// sockets; made by the supervisor
    transport: str = "ipc"  # ipc | tcp
    tcp_host: str = "127.0.0.1"
    tcp_base_port: int = 0  # 0: pick free ports
    http: bool = True  # start the OpenAI HTTP server
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 60.0
    log_level: str = "info"
    log_stats_interval_s: float = 5.0

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes | str) -> EngineConfig:
        raw = orjson.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @property
    def model_names(self) -> list[str]:
        if self.served_model_name:
            return self.served_model_name
        return [os.path.basename(self.model.rstrip("/")) or self.model]


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(prog="python -m core.launch", description="Start a Tessera engine.")
    p.add_argument(
        "--model",
        default=d.model,
        help="HF checkpoint folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--served-model-name", nargs="+", default=[], help="names clients may use")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"))
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda", "npu", "tpu"])
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["auto", "float32", "float16", "bfloat16", "half", "float", "bf16"],
    )
    p.add_argument("--max-model-len", "--max_model_len", type=int, default=None)
    p.add_argument("--max-num-seqs", "--max_num_seqs", type=int, default=d.max_num_seqs)
    p.add_argument(
        "--max-num-batched-tokens",
        "--max_num_batched_tokens",
        type=int,
        default=d.max_num_batched_tokens,
    )
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument(
        "--memory-utilization",
        "--gpu-memory-utilization",
        "--max_memory_utilization",
        "--max-memory-utilization",
        dest="memory_utilization",
        type=float,
        default=d.memory_utilization,
    )
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool size in bytes")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
    )
    p.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=d.enable_chunked_prefill,
    )
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size)
    p.add_argument("--tokenizer-workers", type=int, default=d.tokenizer_workers)
    p.add_argument("--detokenizer-workers", type=int, default=d.detokenizer_workers)
    p.add_argument("--image-workers", type=int, default=d.image_workers)
    p.add_argument("--allowed-local-media-path", default=None)
    p.add_argument("--allowed-media-domains", nargs="*", default=[])
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-dir", default="", help="folder for ipc sockets (default: private tmp)")
    p.add_argument("--transport", choices=["ipc", "tcp"], default=d.transport)
    p.add_argument("--tcp-host", default=d.tcp_host)
    p.add_argument("--tcp-base-port", type=int, default=d.tcp_base_port)
    p.add_argument("--no-http", dest="http", action="store_false", help="engine only (ZMQ SDK)")
    p.add_argument("--log-level", default=d.log_level)
    p.add_argument(
        "--log-stats-interval",
        dest="log_stats_interval_s",
        type=float,
        default=d.log_stats_interval_s,
    )
    return p


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cfg = EngineConfig(**vars(ns))
    for name in (
        "max_num_seqs",
        "max_num_batched_tokens",
        "block_size",
        "tokenizer_workers",
        "detokenizer_workers",
        "image_workers",
        "tensor_parallel_size",
    ):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.max_model_len is not None and cfg.max_model_len < 1:
        parser.error("--max-model-len must be at least 1")
    if not 0 < cfg.memory_utilization <= 1:
        parser.error("--memory-utilization must be in (0, 1]")
    if cfg.tensor_parallel_size > 1:
        parser.error(
            "--tensor-parallel-size > 1 is not implemented yet (the wire and the "
            "supervisor already plan one executor per rank; weight sharding is missing)"
        )
    if cfg.dtype in ("half",):
        cfg.dtype = "float16"
    elif cfg.dtype in ("float",):
        cfg.dtype = "float32"
    elif cfg.dtype == "bf16":
        cfg.dtype = "bfloat16"
    return cfg
