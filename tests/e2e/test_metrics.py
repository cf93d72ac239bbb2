"""Prometheus /metrics: prefix-cache hits after a repeated prompt, KV usage back to 0 when idle,
latency histograms for every stage."""

from __future__ import annotations

import time

import httpx


def scrape(root: str) -> dict[str, float]:
    text = httpx.get(root + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_show_prefix_hits_and_idle_kv(server) -> None:
    root = server.base_url.removesuffix("/v1")
    prompt = "The same long system prompt that is shared by both requests. " * 6
    for _ in range(2):
        r = httpx.post(
            server.base_url + "/completions",
            timeout=60,
            json={"model": server.model, "prompt": prompt, "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
    time.sleep(0.5)
    m = scrape(root)
    assert m["tessera_prefix_cache_hit_rate"] > 0
    assert m["tessera_prefix_cache_hits_total"] >= 16
    assert m["tessera_kv_cache_usage_perc"] == 0.0
    assert m["tessera_num_requests_running"] == 0
    assert m["tessera_generation_tokens_total"] >= 4
    assert m['tessera_request_success_total{finish_reason="length"}'] >= 2
    assert m["tessera_time_to_first_token_seconds_count"] >= 2
    for stage in ("tokenizer", "scheduler_queue", "executor", "detokenizer"):
        assert m[f'tessera_stage_latency_seconds_count{{stage="{stage}"}}'] >= 2, stage


def test_disconnected_stream_frees_its_kv_blocks(server) -> None:
    root = server.base_url.removesuffix("/v1")
    body = {
        "model": server.model,
        "prompt": "Count forever:",
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=60) as r:
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunks += 1
            if chunks == 3:
                break  # the client walks away mid-generation
    m = {}
    for _ in range(50):
        time.sleep(0.2)
        m = scrape(root)
        if m["tessera_num_requests_running"] == 0 and m["tessera_kv_cache_usage_perc"] == 0:
            break
    assert m["tessera_num_requests_running"] == 0
    assert m["tessera_kv_cache_usage_perc"] == 0.0
    generated_after = m["tessera_generation_tokens_total"]
    time.sleep(0.5)
    assert scrape(root)["tessera_generation_tokens_total"] == generated_after  # it stopped


def test_vllm_named_metrics_carry_the_model_name(server) -> None:
    """vLLM's dashboard and autoscaler names, labelled with the served model name."""
    for _ in range(2):
        r = httpx.post(
            server.base_url + "/completions",
            timeout=60,
            json={
                "model": server.model,
                "prompt": "Hello there",
                "max_tokens": 3,
                "temperature": 0,
            },
        )
        assert r.status_code == 200
    time.sleep(0.5)
    m = scrape(server.base_url.removesuffix("/v1"))
    name = server.model  # the first served name, as vLLM labels
    label = f'{{model_name="{name}"}}'
    assert m["vllm:num_requests_running" + label] == 0
    assert m["vllm:num_requests_waiting" + label] == 0
    assert m["vllm:kv_cache_usage_perc" + label] == 0.0
    assert m["vllm:gpu_cache_usage_perc" + label] == 0.0  # the name vLLM's dashboard reads
    assert m["vllm:generation_tokens_total" + label] >= 6
    assert m["vllm:prompt_tokens_total" + label] >= 2 * r.json()["usage"]["prompt_tokens"]
    assert m[f'vllm:request_success_total{{finished_reason="length",model_name="{name}"}}'] >= 2
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "inter_token_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
        "request_max_num_generation_tokens",
    ):
        assert m[f"vllm:{hist}_count" + label] >= 2, hist
