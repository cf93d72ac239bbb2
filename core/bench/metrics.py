"""Metric definitions of the benchmark client (evalscope's ``perf`` definitions).

Per request (``RequestRecord`` -> ``RequestMetrics``):

- latency: end of the stream - send time;
- TTFT: first non-empty content delta (chat: ``delta.content`` or ``delta.reasoning_content``;
  completions: ``text``) - send time (the whole latency when no content came);
- completion tokens: ``usage.completion_tokens`` of the usage chunk, else the number of content
  deltas;
- TPOT: (latency - TTFT) / (completion tokens - 1), only for replies of 2 or more tokens;
- ITL: the gaps between consecutive content deltas.

Per concurrency level (``summarize``): the wall time runs from the earliest send to the latest end
of the level's requests (failed ones included); RPS = successful requests / wall time; generated
tokens/s = completion tokens of successful requests / wall time. Averages are means over the
successful requests (ITL: over all gaps of all successful requests, pooled). Percentiles use the
nearest-rank method, as evalscope does: the p-th percentile of n sorted values is the value at
1-based rank ceil(p/100 * n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """Raw timings of one streamed request (``time.perf_counter`` seconds)."""

    start: float
    end: float = 0.0
    content_times: list[float] = field(default_factory=list)
    success: bool = False
    error: str | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None  # from the usage chunk; None when the server sent none
    cached_tokens: int | None = None


@dataclass
class RequestMetrics:
    """Derived per-request figures, in seconds."""

    latency: float
    ttft: float
    tpot: float | None
    itl: list[float]
    completion_tokens: int
    prompt_tokens: int | None


def request_metrics(rec: RequestRecord) -> RequestMetrics:
    """TTFT, TPOT, ITL and token counts of one request, by the definitions above."""
    latency = rec.end - rec.start
    times = rec.content_times
    ttft = (times[0] - rec.start) if times else latency
    n = rec.completion_tokens if rec.completion_tokens is not None else len(times)
    tpot = (latency - ttft) / (n - 1) if n > 1 else None
    itl = [b - a for a, b in zip(times, times[1:])]
    return RequestMetrics(latency, ttft, tpot, itl, n, rec.prompt_tokens)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (evalscope's): rank ceil(p/100 * n), 1-based; None when empty."""
    if not values:
        return None
    data = sorted(values)
    if p >= 100:
        return data[-1]
    if p <= 0:
        return data[0]
    idx = max(0, math.ceil(len(data) * p / 100) - 1)
    return data[idx]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stats(name: str, values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"avg_{name}": mean(values)}
    for p in PERCENTILES:
        out[f"p{p}_{name}"] = percentile(values, p)
    return out


def summarize(records: list[RequestRecord], concurrency: int) -> dict[str, Any]:
    """All figures of one concurrency level, as a flat JSON-ready dict (times in seconds)."""
    ok = [r for r in records if r.success]
    per = [request_metrics(r) for r in ok]
    timed = [r for r in records if r.end >= r.start]
    wall = (max(r.end for r in timed) - min(r.start for r in timed)) if timed else 0.0
    gen = sum(m.completion_tokens for m in per)
    prompt = sum(m.prompt_tokens or 0 for m in per)
    prompts_known = [m.prompt_tokens for m in per if m.prompt_tokens is not None]
    itl = [g for m in per for g in m.itl]
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(records),
        "succeeded": len(ok),
        "failed": len(records) - len(ok),
        "success_rate": 100.0 * len(ok) / len(records) if records else 0.0,
        "duration_s": wall,
        "rps": len(ok) / wall if wall > 0 else None,
        "gen_tokens_per_s": gen / wall if wall > 0 else None,
        "total_tokens_per_s": (gen + prompt) / wall if wall > 0 else None,
        "completion_tokens": gen,
        "avg_completion_tokens": gen / len(per) if per else None,
        "avg_prompt_tokens": mean([float(x) for x in prompts_known]),
    }
    out.update(_stats("latency_s", [m.latency for m in per]))
    out.update(_stats("ttft_s", [m.ttft for m in per]))
    out.update(_stats("tpot_s", [m.tpot for m in per if m.tpot is not None]))
    out.update(_stats("itl_s", itl))
    errors = sorted({r.error for r in records if r.error})
    out["errors"] = errors[:5]
    return out
