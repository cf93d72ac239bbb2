"""Every Prometheus metric the engine records, declared once and written from each stage's process.

Stages write through prometheus-client's multiprocess mode (files under PROMETHEUS_MULTIPROC_DIR,
set by the supervisor); the HTTP adapter's /metrics collects them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

requests_running = Gauge(
    "tessera_num_requests_running", "Requests in the running batch", multiprocess_mode="mostrecent"
)
requests_waiting = Gauge(
    "tessera_num_requests_waiting",
    "Requests waiting to be scheduled",
    multiprocess_mode="mostrecent",
)
kv_cache_usage = Gauge(
    "tessera_kv_cache_usage_perc",
    "Fraction of KV blocks in use (0-1)",
    multiprocess_mode="mostrecent",
)
prefix_cache_hit_rate = Gauge(
    "tessera_prefix_cache_hit_rate",
    "Prompt tokens served from the prefix cache / prompt tokens looked up",
    multiprocess_mode="mostrecent",
)
prefix_cache_queries = Counter("tessera_prefix_cache_queries", "Prompt tokens looked up")
prefix_cache_hits = Counter("tessera_prefix_cache_hits", "Prompt tokens found in the prefix cache")
prompt_tokens = Counter("tessera_prompt_tokens", "Prompt tokens computed (prefill)")
generation_tokens = Counter("tessera_generation_tokens", "Tokens generated")
preemptions = Counter("tessera_num_preemptions", "Requests preempted for recompute")
requests_finished = Counter("tessera_request_success", "Finished requests", ["finish_reason"])

ttft = Histogram(
    "tessera_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS
)
tpot = Histogram(
    "tessera_time_per_output_token_seconds",
    "Mean decode time per output token",
    buckets=LATENCY_BUCKETS,
)
e2e_latency = Histogram(
    "tessera_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS
)
stage_latency = Histogram(
    "tessera_stage_latency_seconds",
    "Time a request spent in each stage",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)

STEP_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

step_forward_time = Histogram(
    "tessera_step_forward_seconds", "Executor time per model step", buckets=STEP_BUCKETS
)
step_gap_time = Histogram(
    "tessera_step_gap_seconds",
    "Executor idle time between two model steps while the engine had work",
    buckets=STEP_BUCKETS,
)


# ---- vLLM's names, with a model_name label, so vLLM's dashboards, alerts and autoscalers work
# unmodified (same meaning as vLLM V1's: token counters count every prompt token of a request,
# cached or not; latencies per request). Written by the scheduler through the functions below.

_MODEL = ["model_name"]
REQUEST_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
vllm_running = Gauge(
    "vllm:num_requests_running",
    "Requests in the running batch",
    _MODEL,
    multiprocess_mode="mostrecent",
)
vllm_waiting = Gauge(
    "vllm:num_requests_waiting", "Requests waiting", _MODEL, multiprocess_mode="mostrecent"
)
vllm_kv_usage = Gauge(
    "vllm:kv_cache_usage_perc", "KV-cache usage (0-1)", _MODEL, multiprocess_mode="mostrecent"
)
# the older name, still read by vLLM's own Grafana dashboard (same value)
vllm_gpu_cache_usage = Gauge(
    "vllm:gpu_cache_usage_perc", "KV-cache usage (0-1)", _MODEL, multiprocess_mode="mostrecent"
)
vllm_prefix_queries = Counter(
    "vllm:prefix_cache_queries", "Prefix-cache queries, in tokens", _MODEL
)
vllm_prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens", _MODEL)
vllm_preemptions = Counter("vllm:num_preemptions", "Cumulative preemptions", _MODEL)
vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests", _MODEL)
vllm_generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", _MODEL)
vllm_success = Counter("vllm:request_success", "Finished requests", [*_MODEL, "finished_reason"])


def _latency(name: str, doc: str) -> Histogram:
    return Histogram(f"vllm:{name}", doc, _MODEL, buckets=LATENCY_BUCKETS)


vllm_ttft = _latency("time_to_first_token_seconds", "Arrival to first token")
vllm_tpot = _latency("time_per_output_token_seconds", "Mean time per output token, per request")
vllm_itl = _latency("inter_token_latency_seconds", "Time between two tokens of a request")
vllm_e2e = _latency("e2e_request_latency_seconds", "Arrival to finish")
vllm_queue = _latency("request_queue_time_seconds", "Waiting before first scheduled")
vllm_prefill = _latency("request_prefill_time_seconds", "First scheduled to first token")
vllm_decode = _latency("request_decode_time_seconds", "First token to finish")
vllm_inference = _latency("request_inference_time_seconds", "First scheduled to finish")
vllm_request_prompt = Histogram(
    "vllm:request_prompt_tokens", "Prompt tokens per request", _MODEL, buckets=REQUEST_TOKEN_BUCKETS
)
vllm_request_max_generation = Histogram(
    "vllm:request_max_num_generation_tokens",
    "The max_tokens a request could generate",
    _MODEL,
    buckets=REQUEST_TOKEN_BUCKETS,
)
vllm_request_generation = Histogram(
    "vllm:request_generation_tokens",
    "Generated tokens per request",
    _MODEL,
    buckets=REQUEST_TOKEN_BUCKETS,
)


@dataclass(frozen=True)
class FinishedRequest:
    """What the scheduler knows of a request when it ends (times from time.time())."""

    reason: str
    arrival: float
    queued: float
    scheduled: float | None
    first_token: float | None
    finished: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int = 0


def record_finished(model: str, r: FinishedRequest) -> None:
    """One ended request, in Tessera's and vLLM's figures."""
    requests_finished.labels(r.reason).inc()
    e2e_latency.observe(r.finished - r.arrival)
    vllm_success.labels(model, r.reason).inc()
    vllm_e2e.labels(model).observe(r.finished - r.arrival)
    vllm_prompt_tokens.labels(model).inc(r.prompt_tokens)
    vllm_request_prompt.labels(model).observe(r.prompt_tokens)
    vllm_request_generation.labels(model).observe(r.output_tokens)
    vllm_request_max_generation.labels(model).observe(r.max_tokens)
    if r.first_token is not None:
        ttft.observe(r.first_token - r.arrival)
        vllm_ttft.labels(model).observe(r.first_token - r.arrival)
        vllm_decode.labels(model).observe(r.finished - r.first_token)
        if r.output_tokens > 1:
            per_token = (r.finished - r.first_token) / (r.output_tokens - 1)
            tpot.observe(per_token)
            vllm_tpot.labels(model).observe(per_token)
    if r.scheduled is not None:
        stage_latency.labels("scheduler_queue").observe(r.scheduled - r.queued)
        stage_latency.labels("executor").observe(r.finished - r.scheduled)
        vllm_queue.labels(model).observe(r.scheduled - r.arrival)
        vllm_inference.labels(model).observe(r.finished - r.scheduled)
        if r.first_token is not None:
            vllm_prefill.labels(model).observe(r.first_token - r.scheduled)


def record_counts(model: str, added: dict[str, int]) -> None:
    """Counter increments since the last call: prompt (computed), gen, preempt, queries, hits."""
    pairs = {
        "prompt": (prompt_tokens, None),
        "gen": (generation_tokens, vllm_generation_tokens),
        "preempt": (preemptions, vllm_preemptions),
        "queries": (prefix_cache_queries, vllm_prefix_queries),
        "hits": (prefix_cache_hits, vllm_prefix_hits),
    }
    for key, amount in added.items():
        if amount > 0:
            ours, theirs = pairs[key]
            ours.inc(amount)
            if theirs is not None:
                theirs.labels(model).inc(amount)


def record_gauges(model: str, running: int, waiting: int, kv_usage: float, hit_rate: float) -> None:
    requests_running.set(running)
    requests_waiting.set(waiting)
    kv_cache_usage.set(kv_usage)
    prefix_cache_hit_rate.set(hit_rate)
    vllm_running.labels(model).set(running)
    vllm_waiting.labels(model).set(waiting)
    vllm_kv_usage.labels(model).set(kv_usage)
    vllm_gpu_cache_usage.labels(model).set(kv_usage)


def record_token_gap(model: str, seconds: float) -> None:
    vllm_itl.labels(model).observe(seconds)
