"""Every Prometheus metric the engine records, declared once and written from each stage's process.

Stages write through prometheus-client's multiprocess mode (files under PROMETHEUS_MULTIPROC_DIR,
set by the supervisor); the HTTP adapter's /metrics collects them all.
"""

from __future__ import annotations

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
