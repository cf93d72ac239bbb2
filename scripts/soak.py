#!/usr/bin/env python3
"""Soak a running Tessera server with mixed traffic for a set time (issue 10; not in CI).

    python scripts/soak.py --url http://127.0.0.1:8000 --minutes 10 --concurrency 8 --images

Each worker loops over a weighted mix: streamed and whole chat answers, completions, chat with a
generated image (--images), streams the client drops halfway (their KV must be freed), and bad
requests (each must get its 4xx with an OpenAI error body, never a 5xx). Every request must end
within --deadline seconds. Every --sample-s the script records each server process's RSS (the
launcher PID, --pid or found by the port, and its children); after the run it waits for the
engine to go idle and reads /metrics: KV usage and running requests must be back at 0.

Prints a summary and writes it as JSON (--out): requests by kind and outcome, success rate,
p50/p99 latency of good requests, RSS per process after warm-up (--warmup-s) and at the end,
KV usage afterwards. Exits 1 when any check fails (a 5xx, a hang, RSS growth above
--max-rss-growth, KV left in use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.bench.datasets import random_image_data_url, random_text  # noqa: E402

# kind -> weight in the mix
MIX = {
    "chat_stream": 4,
    "chat": 2,
    "completion": 2,
    "image_chat": 2,
    "dropped_stream": 1,
    "bad": 2,
}

# Bad requests: (body or raw bytes, expected status). Each must be refused as said, cheaply.
BAD: list[tuple[Any, int]] = [
    (b"{not json", 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 10**30}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "no_such_field": 1}, 400),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                    ],
                }
            ]
        },
        400,
    ),
]


@dataclass
class Result:
    kind: str
    outcome: str  # ok, refused (an expected 4xx), failed (wrong status/body), hung
    seconds: float
    detail: str = ""


@dataclass
class Summary:
    minutes: float
    concurrency: int
    requests: int
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    success_rate: float = 0.0
    p50_s: float = 0.0
    p99_s: float = 0.0
    rss_mb_after_warmup: dict[str, float] = field(default_factory=dict)
    rss_mb_end: dict[str, float] = field(default_factory=dict)
    rss_growth_pct: dict[str, float] = field(default_factory=dict)
    rss_mb_series: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (s, MB)
    kv_usage_after: float = -1.0
    running_after: float = -1.0
    failures: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = args.url.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.rng = np.random.default_rng(args.seed)
        self.pick = random.Random(args.seed)
        self.results: list[Result] = []
        self.series: list[tuple[float, dict[str, float]]] = []
        self.model = args.model
        kinds = [k for k in MIX if args.images or k != "image_chat"]
        self.kinds, self.weights = kinds, [MIX[k] for k in kinds]
        self.images = [
            random_image_data_url(args.image_size[0], args.image_size[1], self.rng)
            for _ in range(8)
        ]

    def messages(self, image: bool) -> list[dict[str, Any]]:
        text = random_text(self.pick.randint(10, self.args.prompt_tokens), self.rng)
        if not image:
            return [{"role": "user", "content": text}]
        url = self.pick.choice(self.images)
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        return [{"role": "user", "content": parts}]

    async def one(self, client: httpx.AsyncClient) -> Result:
        kind = self.pick.choices(self.kinds, self.weights)[0]
        t0 = time.monotonic()
        try:
            outcome, detail = await asyncio.wait_for(self._send(client, kind), self.args.deadline)
        except TimeoutError:
            outcome, detail = "hung", f"no end within {self.args.deadline} s"
        except httpx.HTTPError as exc:
            outcome, detail = "failed", f"{type(exc).__name__}: {exc}"
        return Result(kind, outcome, time.monotonic() - t0, detail)

    async def _send(self, client: httpx.AsyncClient, kind: str) -> tuple[str, str]:
        max_tokens = self.pick.randint(1, self.args.max_tokens)
        common = {"model": self.model, "max_tokens": max_tokens, "temperature": 0.7}
        if kind == "bad":
            body, status = self.pick.choice(BAD)
            return await self._bad(client, body, status)
        if kind == "completion":
            body = common | {"prompt": random_text(self.pick.randint(5, 60), self.rng)}
            r = await client.post("/v1/completions", json=body, headers=self.headers)
            return self._whole(r, max_tokens)
        body = common | {"messages": self.messages(kind == "image_chat")}
        if kind == "chat" or kind == "image_chat":
            r = await client.post("/v1/chat/completions", json=body, headers=self.headers)
            return self._whole(r, max_tokens)
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        drop_after = (
            self.pick.randint(1, max(1, max_tokens // 2)) if kind == "dropped_stream" else 0
        )
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=self.headers
        ) as r:
            if r.status_code != 200:
                await r.aread()
                return "failed", f"{r.status_code} {r.text[:200]}"
            chunks = 0
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return "ok", ""
                if line.startswith('data: {"error"'):
                    return "failed", line[:200]
                if line.startswith("data: "):
                    chunks += 1
                    if drop_after and chunks >= drop_after:
                        return "ok", "dropped on purpose"
            return "failed", "stream ended without [DONE]"

    @staticmethod
    def _whole(r: httpx.Response, max_tokens: int) -> tuple[str, str]:
        if r.status_code != 200:
            return "failed", f"{r.status_code} {r.text[:200]}"
        used = r.json()["usage"]["completion_tokens"]
        return ("ok", "") if 0 < used <= max_tokens else ("failed", f"{used} tokens")

    async def _bad(self, client: httpx.AsyncClient, body: Any, status: int) -> tuple[str, str]:
        if isinstance(body, bytes):
            headers = self.headers | {"Content-Type": "application/json"}
            r = await client.post("/v1/chat/completions", content=body, headers=headers)
        else:
            body = {"model": self.model} | body
            raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
            headers = self.headers | {"Content-Type": "application/json"}
            r = await client.post("/v1/chat/completions", content=raw, headers=headers)
        try:
            error = r.json()["error"]
            shaped = isinstance(error["message"], str) and error["code"] == r.status_code
        except (ValueError, KeyError, TypeError):
            shaped = False
        if r.status_code == status and shaped:
            return "refused", ""
        return "failed", f"expected {status}, got {r.status_code} {r.text[:200]}"

    async def worker(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            self.results.append(await self.one(client))

    async def run(self) -> Summary:
        a = self.args
        limits = httpx.Limits(max_connections=a.concurrency + 4)
        async with httpx.AsyncClient(base_url=self.root, timeout=a.deadline, limits=limits) as c:
            await wait_ready(c)
            if self.model is None:
                r = await c.get("/v1/models", headers=self.headers)
                self.model = r.json()["data"][0]["id"]
            t0 = time.monotonic()
            until = t0 + a.minutes * 60
            sampler = asyncio.ensure_future(self.sample_rss(t0, until))
            await asyncio.gather(*(self.worker(c, until) for _ in range(a.concurrency)))
            warm, end = await sampler
            kv, running = await self.idle_metrics(c)
        return self.summarize(warm, end, kv, running)

    async def sample_rss(
        self, t0: float, until: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        warm: dict[str, float] = {}
        last: dict[str, float] = {}
        while time.monotonic() < until:
            await asyncio.sleep(self.args.sample_s)
            last = rss_by_process(self.args.pid)
            self.series.append((round(time.monotonic() - t0, 1), last))
            if not warm and time.monotonic() - t0 >= self.args.warmup_s:
                warm = last
        return warm, last

    async def idle_metrics(self, c: httpx.AsyncClient) -> tuple[float, float]:
        """KV usage and running requests once the engine went idle (dropped streams included)."""
        kv = running = -1.0
        for _ in range(40):
            await asyncio.sleep(0.5)
            m = scrape((await c.get("/metrics", headers=self.headers)).text)
            kv = m.get("tessera_kv_cache_usage_perc", -1.0)
            running = m.get("tessera_num_requests_running", -1.0)
            if kv == 0 and running == 0:
                break
        return kv, running

    def summarize(
        self, warm: dict[str, float], end: dict[str, float], kv: float, running: float
    ) -> Summary:
        a = self.args
        s = Summary(a.minutes, a.concurrency, len(self.results))
        counts: dict[str, Counter[str]] = {}
        for r in self.results:
            counts.setdefault(r.kind, Counter())[r.outcome] += 1
        s.by_kind = {k: dict(v) for k, v in counts.items()}
        good = [r for r in self.results if r.outcome in ("ok", "refused")]
        s.success_rate = len(good) / max(1, len(self.results))
        served = sorted(r.seconds for r in self.results if r.outcome == "ok")
        if served:
            s.p50_s = statistics.median(served)
            s.p99_s = served[min(len(served) - 1, int(0.99 * len(served)))]
        s.rss_mb_after_warmup, s.rss_mb_end = warm, end
        for name, mb in end.items():
            if name in warm:
                s.rss_growth_pct[name] = 100 * (mb - warm[name]) / warm[name]
        s.kv_usage_after, s.running_after = kv, running
        s.rss_mb_series = self.series
        s.failures = [f"{r.kind}: {r.outcome} {r.detail}" for r in self.results if r not in good]
        return s


async def wait_ready(c: httpx.AsyncClient, within_s: float = 300.0) -> None:
    """Until /health answers 200 (503 while the engine starts)."""
    until = time.monotonic() + within_s
    while time.monotonic() < until:
        try:
            if (await c.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(1.0)
    raise SystemExit(f"the server was not ready within {within_s:g} s")


def scrape(text: str) -> dict[str, float]:
    """The unlabelled samples of a /metrics page, by name."""
    families = text_string_to_metric_families(text)
    return {x.name: x.value for f in families for x in f.samples if not x.labels}


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def rss_by_process(launcher: int) -> dict[str, float]:
    """MB resident per process of the server: the launcher, and each actor by its name."""
    out: dict[str, float] = {}
    for pid in descendants(launcher):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        rss = next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS")), 0)
        name = cmd[-2].decode() if b"core.actor" in cmd else f"pid {pid}"
        if pid == launcher:
            name = "launcher"
        out[name] = rss / 1024
    return out


def launcher_pid(port: int) -> int:
    """The launcher of the server on PORT: the oldest ancestor that runs core.launch."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f":{port} " in line and "pid=" in line:
            pid = int(line.split("pid=")[1].split(",")[0])
            while True:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1])
                parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
                if b"core.launch" not in parent:
                    return pid
                pid = ppid
    raise SystemExit(f"no process listens on port {port}; pass --pid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="served model name (default: the first listed)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--images", action="store_true", help="include chat requests with an image")
    ap.add_argument("--image-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    ap.add_argument("--prompt-tokens", type=int, default=200, help="most words in a prompt")
    ap.add_argument("--max-tokens", type=int, default=64, help="most tokens asked per request")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds a request may take")
    ap.add_argument("--pid", type=int, default=None, help="the launcher's PID (default: by port)")
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--max-rss-growth", type=float, default=5.0, help="percent after warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="soak.json")
    args = ap.parse_args()
    if args.pid is None:
        args.pid = launcher_pid(int(args.url.rsplit(":", 1)[1].split("/")[0]))
    summary = asyncio.run(Soak(args).run())
    Path(args.out).write_text(json.dumps(asdict(summary), indent=2))
    print(
        json.dumps(
            {k: v for k, v in asdict(summary).items() if k not in ("failures", "rss_mb_series")},
            indent=2,
        )
    )
    for line in summary.failures[:20]:
        print("FAILED", line)
    bad = [
        summary.failures,
        [n for n, g in summary.rss_growth_pct.items() if g > args.max_rss_growth],
        summary.kv_usage_after != 0 or summary.running_after != 0,
    ]
    sys.exit(1 if any(bad) else 0)


if __name__ == "__main__":
    main()
