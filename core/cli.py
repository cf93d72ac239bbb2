"""The command line of `python -m core.launch`: every flag (vLLM's names and the seeds' aliases),
checked and turned into the one EngineConfig that core/launch hands to every actor."""

from __future__ import annotations

import argparse
import os
from typing import Any

from core.cli_nodes import add_node_flags, apply_node_settings
from core.cli_values import (
    device_name,
    generation_config_source,
    human_readable_int,
    json_string_list,
    load_chat_template,
    modality_limits,
)
from core.config import EngineConfig


class _HelpFormatter(argparse.HelpFormatter):
    """Ends every flag's help with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        default = action.default
        shown = "none" if default in (None, "", []) else str(default).replace("%", "%%")
        return f"{text} (default: {shown})"


class _NoEffect(argparse.Action):
    """A vLLM flag Tessera accepts so vLLM command lines start, but does not act on; the flag
    (and its value) is kept for the start-up log line that says so."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = f"{option_string} {values}" if self.nargs != 0 else str(option_string)
        namespace.no_effect_flags = [*getattr(namespace, "no_effect_flags", []), given]


# --tool-call-parser's values: the parsers of protocols/openai/tool_parsers.py
TOOL_CALL_PARSERS = ("hermes", "llama3_json")
# --quantization: none reads the checkpoint as it is (quantized if its config says so); int8 /
# int4 quantize at load; the rest (vLLM's names) insist on that checkpoint format (models/quant).
QUANTIZATION_CHOICES = (
    *("none", "int8", "int4"),
    *("gptq", "awq", "compressed-tensors", "fp8", "gguf"),
)

# vLLM serving flags that change nothing here: (flags, takes a value, why).
NO_EFFECT_FLAGS: list[tuple[list[str], bool, str]] = [
    (
        ["--trust-remote-code", "--no-trust-remote-code"],
        False,
        "no checkpoint code is ever run: architectures are built in",
    ),
    (
        ["--disable-log-requests", "--no-disable-log-requests"],
        False,
        "request events are logged only at --log-level debug",
    ),
    (["--swap-space"], True, "a preempted request recomputes its KV; nothing is swapped"),
    (
        ["--disable-frontend-multiprocessing", "--no-disable-frontend-multiprocessing"],
        False,
        "the HTTP adapter is always its own process",
    ),
    (["--max-seq-len-to-capture"], True, "no graphs are captured"),
]


def build_parser() -> argparse.ArgumentParser:
    d = EngineConfig()
    p = argparse.ArgumentParser(
        prog="python -m core.launch",
        description="Start a Tessera engine.",
        allow_abbrev=False,  # "--tokenizer X" must never become "--tokenizer-workers X"
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "model_tag",
        nargs="?",
        metavar="MODEL",
        default=None,
        help="the model, as in `vllm serve MODEL`; same as --model (default: --model's)",
    )
    p.add_argument(
        "--model",
        default=d.model,
        help="HF checkpoint folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        help="names clients may send as `model` (default: --model as given, plus its folder or "
        "file name as an unlisted alias)",
    )
    p.add_argument(
        "--tokenizer",
        default=d.tokenizer,
        help="tokenizer folder or .gguf file, with its chat template (default: the model's)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="a chat template file, or the template itself, replacing the checkpoint's "
        "(default: the checkpoint's)",
    )
    p.add_argument(
        "--trust-request-chat-template",
        action=argparse.BooleanOptionalAction,
        default=d.trust_request_chat_template,
        help="render a chat_template sent in a request (as vLLM); without it such a request is "
        "refused with a 400, since a template runs code of the client's choosing on the server "
        "(default: off)",
    )
    p.add_argument(
        "--generation-config",
        type=generation_config_source,
        default=d.generation_config,
        help="sampling defaults a request's unset fields take (temperature, top_p, top_k, min_p, "
        "repetition_penalty): 'auto' from the model folder's generation_config.json, 'vllm' "
        "none (vLLM's defaults), or a folder holding generation_config.json (default: auto)",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=d.enable_auto_tool_choice,
        help='allow tool_choice "auto" (the default when a request has tools): calls in the '
        "answer, parsed by --tool-call-parser, become tool_calls",
    )
    p.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        default=d.tool_call_parser,
        help="how the model writes tool calls: hermes (Qwen2.5, Hermes: <tool_call>{...}"
        "</tool_call>) or llama3_json (Llama 3.x JSON) (default: none)",
    )
    p.add_argument("--host", default=d.host, help="HTTP listen address")
    p.add_argument("--port", type=int, default=d.port, help="HTTP listen port")
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` (default: $TESSERA_API_KEY, else none)",
    )
    p.add_argument(
        "--public-metrics",
        action=argparse.BooleanOptionalAction,
        default=d.public_metrics,
        help="with --api-key, let /metrics answer without the key, as /health and /ping do "
        "(default: off)",
    )
    p.add_argument(
        "--device",
        default=d.device,
        type=device_name,
        help="auto, cpu, cuda, npu, tpu, or an installed plug-in (entry-point group "
        "tessera.platforms); auto picks CUDA, then NPU, then TPU, then plug-ins, then CPU",
    )
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["auto", "float32", "float16", "bfloat16", "half", "float", "bf16"],
        help="weights and activations; auto = bfloat16 where the device computes it natively",
    )
    p.add_argument(
        "--quantization",
        "-q",
        default="none",
        choices=QUANTIZATION_CHOICES,
        type=str.lower,
        help="none: the checkpoint as it is (quantized where config.json's quantization_config "
        "says so; a GGUF file's blocks expanded to --dtype); int8 / int4: quantize the linears "
        "left unquantized at load (weight-only; a GGUF file keeps its Q4_0/Q4_1 blocks); gguf: "
        "keep them and nothing more; gptq, awq, compressed-tensors, fp8: insist on that "
        "format (default: none)",
    )
    p.add_argument(
        "--max-model-len",
        "--max_model_len",
        type=human_readable_int,
        default=None,
        help="longest prompt + completion, e.g. 4096, 32k (32000) or 32K (32768) (default: the "
        "model's max_position_embeddings, capped to the KV pool)",
    )
    p.add_argument(
        "--max-num-seqs",
        "--max_num_seqs",
        type=int,
        default=d.max_num_seqs,
        help="most requests in the running batch",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        "--max_num_batched_tokens",
        type=human_readable_int,
        default=d.max_num_batched_tokens,
        help="token budget of one step, shared by decodes and prefill chunks",
    )
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    p.add_argument(
        "--memory-utilization",
        "--gpu-memory-utilization",
        "--max_memory_utilization",
        "--max-memory-utilization",
        dest="memory_utilization",
        type=float,
        default=d.memory_utilization,
        help="share of free device memory for the KV pool",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=human_readable_int,
        default=None,
        help="KV pool size in bytes (e.g. 4G); overrides --memory-utilization (default: none)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.enable_prefix_caching,
        help="reuse KV blocks of identical prompt prefixes",
    )
    p.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=d.enable_chunked_prefill,
        help="split long prompts across steps",
    )
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=d.enforce_eager,
        help="run the model eagerly, without graph capture or compilation",
    )
    p.add_argument(
        "--shutdown-timeout",
        dest="shutdown_timeout_s",
        type=float,
        default=d.shutdown_timeout_s,
        help="on SIGTERM, seconds the requests in flight get to finish while new ones are "
        "answered 503; then everything stops (0: stop at once)",
    )
    p.add_argument(
        "--restart-engine",
        action=argparse.BooleanOptionalAction,
        default=d.restart_engine,
        help="when an executor, the scheduler or the gateway dies or freezes, fail the requests "
        "in flight (503, Retry-After) and restart the engine behind the HTTP port; with "
        "--no-restart-engine the server exits (code 1) instead",
    )
    p.add_argument(
        "--request-timeout",
        dest="request_timeout_s",
        type=float,
        default=d.request_timeout_s,
        help="seconds a request may take from admission to its last token; a later one ends "
        "with a 504 error (0: no limit)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        dest="heartbeat_timeout_s",
        type=float,
        default=d.heartbeat_timeout_s,
        help="seconds without a heartbeat after which a stage counts as frozen and is replaced "
        "as if it had died; also how long a client (the HTTP stage, an SDK program) may miss its "
        "pings before its requests are aborted",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=d.tensor_parallel_size,
        help="ranks to shard the model over, one executor process each (split over the "
        "hosts with --nnodes)",
    )
    add_node_flags(p, d)
    p.add_argument(
        "--tokenizer-workers",
        type=int,
        default=d.tokenizer_workers,
        help="tokenizer stage processes",
    )
    p.add_argument(
        "--detokenizer-workers",
        type=int,
        default=d.detokenizer_workers,
        help="detokenizer stage processes",
    )
    p.add_argument(
        "--image-workers",
        type=int,
        default=d.image_workers,
        help="image preprocessor stage processes",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=d.max_logprobs,
        help="most top logprobs a request may ask for (logprobs / top_logprobs); -1: no limit",
    )
    p.add_argument(
        "--limit-mm-per-prompt",
        type=modality_limits,
        default={},
        help="most items of a modality in one request, as JSON: '{\"image\": 2}' "
        "(default: 64 images)",
    )
    _add_request_caps(p, d)
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="local image files are allowed only under this folder (default: none allowed)",
    )
    p.add_argument(
        "--allowed-media-domains",
        nargs="*",
        default=[],
        help="image URLs must be on these hosts (default: any public host)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on CPU (default: adaptive, the cores other processes leave free)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of unseeded sampling")
    p.add_argument(
        "--run-dir",
        default="",
        help="folder for ipc sockets (default: a private /tmp/tessera-* folder)",
    )
    p.add_argument(
        "--transport",
        choices=["ipc", "tcp"],
        default=d.transport,
        help="socket kind between stages",
    )
    p.add_argument("--tcp-host", default=d.tcp_host, help="host of the tcp:// stage sockets")
    p.add_argument(
        "--tcp-base-port",
        type=int,
        default=d.tcp_base_port,
        help="first tcp:// stage port; 0 picks free ports",
    )
    p.add_argument(
        "--no-http",
        dest="http",
        action="store_false",
        help="engine only, for the ZMQ SDK (default: HTTP on)",
    )
    p.add_argument(
        "--root-path",
        default=d.root_path,
        help="path prefix the API is served under behind a proxy (default: none)",
    )
    p.add_argument(
        "--allowed-origins",
        type=json_string_list,
        default=[],
        help="CORS origins as a JSON list, e.g. '[\"*\"]' (default: no CORS headers)",
    )
    p.add_argument("--ssl-keyfile", default=None, help="TLS private key file for HTTPS")
    p.add_argument("--ssl-certfile", default=None, help="TLS certificate file for HTTPS")
    p.add_argument(
        "--uvicorn-log-level",
        default=d.uvicorn_log_level,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's own log level (info logs every HTTP request)",
    )
    p.add_argument("--log-level", default=d.log_level, help="engine log level")
    p.add_argument(
        "--log-stats-interval",
        dest="log_stats_interval_s",
        type=float,
        default=d.log_stats_interval_s,
        help="seconds between engine-stats log lines; 0 turns them off",
    )
    p.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="no periodic engine-stats log line (default: logged)",
    )
    for flags, takes_value, why in NO_EFFECT_FLAGS:
        p.add_argument(
            *flags,
            dest="no_effect_flags",
            action=_NoEffect,
            nargs=None if takes_value else 0,
            metavar="VALUE" if takes_value else None,
            default=argparse.SUPPRESS,
            help=f"vLLM flag, accepted with no effect here: {why} (default: unset)",
        )
    return p


def _add_request_caps(p: argparse.ArgumentParser, d: EngineConfig) -> None:
    """The caps a request must fit before any costly work is done for it (protocols/limits.py,
    protocols/openai/gate.py)."""
    p.add_argument(
        "--max-num-queued-requests",
        type=int,
        default=d.max_num_queued_requests,
        help="HTTP generation requests held beyond --max-num-seqs (waiting for the running "
        "batch); one more is answered 429 with Retry-After before its body is read",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=human_readable_int,
        default=d.max_request_body_bytes,
        help="largest HTTP request body (e.g. 32M); a larger one is answered 413 "
        "(default: 32M = 33554432, room for a 20 MiB image as a base64 data URL)",
    )
    p.add_argument(
        "--max-request-headers",
        type=int,
        default=d.max_request_headers,
        help="most HTTP header lines in a request; more are answered 431",
    )
    p.add_argument(
        "--max-request-header-bytes",
        type=human_readable_int,
        default=d.max_request_header_bytes,
        help="most bytes of HTTP header names and values together; more are answered 431",
    )
    p.add_argument(
        "--request-body-timeout",
        dest="request_body_timeout_s",
        type=float,
        default=d.request_body_timeout_s,
        help="seconds a client has to send its whole request body; a slower one gets 408",
    )
    p.add_argument(
        "--max-messages",
        type=int,
        default=d.max_messages,
        help="most chat messages in one request; more is a 400",
    )
    p.add_argument(
        "--max-prompt-chars",
        type=human_readable_int,
        default=d.max_prompt_chars,
        help="most characters of prompt text in one request (all prompts, or the messages and "
        "tool definitions), refused with a 400 before tokenizing",
    )
    p.add_argument(
        "--max-n",
        type=int,
        default=d.max_n,
        help="most choices per prompt a request may ask for (OpenAI's n)",
    )
    p.add_argument(
        "--max-stop-strings",
        type=int,
        default=d.max_stop_strings,
        help="most stop strings in one request",
    )
    p.add_argument(
        "--max-stop-string-chars",
        type=int,
        default=d.max_stop_string_chars,
        help="most characters of one stop string",
    )


def parse_args(argv: list[str] | None = None) -> EngineConfig:
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    values.setdefault("no_effect_flags", [])
    positional = values.pop("model_tag")
    if positional:
        if values["model"] and values["model"] != positional:
            parser.error(f"two models given: {positional!r} and --model {values['model']!r}")
        values["model"] = positional
    if values["quantization"] != "none" and values["tensor_parallel_size"] > 1:
        parser.error("--quantization with --tensor-parallel-size > 1 is not supported yet")
    if values.pop("disable_log_stats"):
        values["log_stats_interval_s"] = 0.0
    if values["api_key"] is None:
        values["api_key"] = os.environ.get("TESSERA_API_KEY")
    if values["chat_template"] is not None:
        try:
            values["chat_template"] = load_chat_template(values["chat_template"])
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    if values["enable_auto_tool_choice"] and not values["tool_call_parser"]:
        parser.error("--enable-auto-tool-choice requires --tool-call-parser")
    cfg = EngineConfig(**values)
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
    for name in (
        "max_request_body_bytes",
        "max_request_headers",
        "max_request_header_bytes",
        "max_messages",
        "max_prompt_chars",
        "max_n",
        "max_stop_string_chars",
    ):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    apply_node_settings(cfg, parser)
    if cfg.max_num_queued_requests < 0 or cfg.max_stop_strings < 0:
        parser.error("--max-num-queued-requests and --max-stop-strings must be at least 0")
    if not cfg.request_body_timeout_s > 0:
        parser.error("--request-body-timeout must be above 0")
    if cfg.max_model_len is not None and cfg.max_model_len < 1:
        parser.error("--max-model-len must be at least 1")
    if cfg.max_logprobs < -1:
        parser.error("--max-logprobs must be -1 (no limit) or at least 0")
    if not 0 < cfg.memory_utilization <= 1:
        parser.error("--memory-utilization must be in (0, 1]")
    if bool(cfg.ssl_keyfile) != bool(cfg.ssl_certfile):
        parser.error("--ssl-keyfile and --ssl-certfile go together")
    if cfg.request_timeout_s < 0:
        parser.error("--request-timeout must be at least 0 (0: no limit)")
    if not cfg.heartbeat_timeout_s > 2 * cfg.heartbeat_interval_s:
        parser.error(f"--heartbeat-timeout must be above {2 * cfg.heartbeat_interval_s} s")
    if cfg.dtype in ("half",):
        cfg.dtype = "float16"
    elif cfg.dtype in ("float",):
        cfg.dtype = "float32"
    elif cfg.dtype == "bf16":
        cfg.dtype = "bfloat16"
    return cfg
