"""core.bench: metric definitions on synthetic timings, prompt builders, request bodies, and
``python -m core.bench`` end to end against a tiny streaming OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from core.bench import client, datasets, metrics, report
from core.bench.metrics import RequestRecord
from tests.fixtures.checkpoints import tokenizer_dir

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- metric definitions


def test_request_metrics_use_usage_tokens():
    # sent at 10.0; content deltas at 10.5, 10.6, 10.8; stream ends at 11.0; usage says 5 tokens
    rec = RequestRecord(start=10.0, end=11.0, content_times=[10.5, 10.6, 10.8], success=True)
    rec.completion_tokens = 5
    m = metrics.request_metrics(rec)
    assert m.latency == pytest.approx(1.0)
    assert m.ttft == pytest.approx(0.5)
    assert m.tpot == pytest.approx((1.0 - 0.5) / 4)  # (latency - TTFT) / (tokens - 1)
    assert m.itl == pytest.approx([0.1, 0.2])
    assert m.completion_tokens == 5


def test_request_metrics_count_deltas_without_usage():
    rec = RequestRecord(start=0.0, end=2.0, content_times=[1.0, 1.25, 1.5, 2.0], success=True)
    m = metrics.request_metrics(rec)
    assert m.completion_tokens == 4
    assert m.tpot == pytest.approx(1.0 / 3)
    assert m.itl == pytest.approx([0.25, 0.25, 0.5])


def test_single_token_and_empty_replies():
    one = metrics.request_metrics(RequestRecord(start=0.0, end=1.0, content_times=[0.4]))
    assert one.tpot is None and one.itl == [] and one.ttft == pytest.approx(0.4)
    empty = metrics.request_metrics(RequestRecord(start=0.0, end=1.0))
    assert empty.ttft == pytest.approx(1.0) and empty.completion_tokens == 0


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert metrics.percentile(values, 99) == 99.0
    assert metrics.percentile(values, 50) == 50.0
    assert metrics.percentile(values, 100) == 100.0
    assert metrics.percentile([3.0, 1.0, 2.0], 50) == 2.0  # rank ceil(1.5) = 2
    assert metrics.percentile([3.0, 1.0, 2.0], 99) == 3.0
    assert metrics.percentile([7.0], 99) == 7.0
    assert metrics.percentile([], 99) is None


def test_summarize_level():
    recs = [
        RequestRecord(start=0.0, end=2.0, content_times=[1.0, 1.5, 2.0], success=True),
        RequestRecord(start=0.5, end=3.0, content_times=[1.5, 2.0, 2.5, 3.0], success=True),
        RequestRecord(start=0.5, end=4.0, success=False, error="HTTP 500: boom"),
    ]
    recs[0].completion_tokens, recs[0].prompt_tokens = 3, 10
    recs[1].prompt_tokens = 12
    s = metrics.summarize(recs, concurrency=2)
    assert s["requests"] == 3 and s["succeeded"] == 2 and s["failed"] == 1
    assert s["success_rate"] == pytest.approx(200 / 3)
    assert s["duration_s"] == pytest.approx(4.0)  # earliest send to latest end, failures too
    assert s["rps"] == pytest.approx(2 / 4.0)
    assert s["completion_tokens"] == 7  # 3 from usage + 4 counted deltas
    assert s["gen_tokens_per_s"] == pytest.approx(7 / 4.0)
    assert s["total_tokens_per_s"] == pytest.approx((7 + 22) / 4.0)
    assert s["avg_latency_s"] == pytest.approx((2.0 + 2.5) / 2)
    assert s["p99_latency_s"] == pytest.approx(2.5)
    assert s["avg_ttft_s"] == pytest.approx((1.0 + 1.0) / 2)
    tpots = [(2.0 - 1.0) / 2, (2.5 - 1.0) / 3]
    assert s["avg_tpot_s"] == pytest.approx(sum(tpots) / 2)
    assert s["p99_tpot_s"] == pytest.approx(max(tpots))
    itl = [0.5, 0.5, 0.5, 0.5, 0.5]  # pooled over both requests
    assert s["avg_itl_s"] == pytest.approx(sum(itl) / len(itl))
    assert s["avg_prompt_tokens"] == pytest.approx(11.0)
    assert s["errors"] == ["HTTP 500: boom"]


def test_summarize_all_failed():
    s = metrics.summarize([RequestRecord(start=1.0, end=2.0, error="x")], concurrency=1)
    assert s["succeeded"] == 0 and s["rps"] == 0.0 and s["avg_ttft_s"] is None
    assert "-" in report.format_table([s])


# ------------------------------------------------------------------------------------- datasets


def test_random_text_by_words():
    rng = np.random.default_rng(0)
    text = datasets.random_text(50, rng)
    assert len(text.split()) == 50
    assert datasets.random_text(50, np.random.default_rng(0)) == text  # seeded
    assert datasets.random_text(50, rng) != text  # a different prompt per request


def test_random_text_by_tokenizer():
    tok = datasets.load_tokenizer(str(tokenizer_dir()))
    rng = np.random.default_rng(1)
    for n in (1, 17, 200):
        text = datasets.random_text(n, rng, tok)
        assert abs(datasets.count_tokens(text, tok) - n) <= 2


def test_random_vl_prompts_and_images():
    rng = np.random.default_rng(0)
    prompts = datasets.build_prompts(
        "random_vl", 3, 20, rng, image_num=2, image_width=64, image_height=48
    )
    assert len(prompts) == 3
    urls = [u for p in prompts for u in p.images]
    assert len(urls) == 6 and len(set(urls)) == 6  # every image distinct
    header, b64 = urls[0].split(",", 1)
    assert header == "data:image/jpeg;base64"
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.size == (64, 48) and img.mode == "RGB"
    png = datasets.random_image_data_url(8, 8, rng, "png")
    assert png.startswith("data:image/png;base64,")
    text_only = datasets.build_prompts("random", 2, 5, rng)
    assert all(p.images == [] and len(p.text.split()) == 5 for p in text_only)


def test_request_bodies():
    vl = datasets.Prompt("hello", ["data:image/jpeg;base64,AAAA"])
    body = client.build_body(vl, "chat", "m", 16, min_tokens=16, extra={"top_k": 1})
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 16 and body["min_tokens"] == 16 and body["top_k"] == 1
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[-1] == {"type": "text", "text": "hello"}
    body = client.build_body(datasets.Prompt("hi"), "completions", "m", 4)
    assert body["prompt"] == "hi" and "min_tokens" not in body
    with pytest.raises(ValueError):
        client.build_body(vl, "completions", "m", 4)
    assert client.endpoint_url("http://h:1/v1/", "chat") == "http://h:1/v1/chat/completions"
    assert client.endpoint_url("http://h:1/v1/completions", "chat") == "http://h:1/v1/completions"
    assert client.models_url("http://h:1/v1/chat/completions") == "http://h:1/v1/models"


# ---------------------------------------------------------------------------------- end to end


def _make_app(seen: list[dict]):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        n = int(body.get("max_tokens") or 4)
        for i in range(n):
            await asyncio.sleep(0.003)
            piece = f"tok{i} "
            choice: dict[str, Any] = {
                "index": 0,
                "finish_reason": "length" if i == n - 1 else None,
            }
            if chat:
                choice["delta"] = (
                    {"content": piece} if i else {"role": "assistant", "content": piece}
                )
            else:
                choice["text"] = piece
            yield b"data: " + orjson.dumps({"id": "x", "choices": [choice]}) + b"\n\n"
        usage = {"prompt_tokens": 42, "completion_tokens": n, "total_tokens": 42 + n}
        yield b"data: " + orjson.dumps({"id": "x", "choices": [], "usage": usage}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def handle(request: Request, chat: bool):
        body = await request.json()
        seen.append(body)
        if body.get("model") != "fake-model":
            return JSONResponse({"error": {"message": "unknown model"}}, status_code=404)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, False)

    return app


@pytest.fixture
def fake_server():
    import uvicorn

    seen: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_make_app(seen), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(5)
    sock.close()


def test_cli_end_to_end(fake_server, tmp_path):
    url, seen = fake_server
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "core.bench", "--url", url, "--dataset", "random_vl"]
    cmd += ["--image-num", "1", "--image-width", "32", "--image-height", "32"]
    cmd += ["--parallel", "1", "2", "--number", "2", "4", "--max-tokens", "5", "--min-tokens", "5"]
    cmd += ["--prompt-tokens", "20", "--output-dir", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Conc." in proc.stdout and "P99 TPOT(s)" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == "fake-model"  # taken from /v1/models
    levels = summary["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv, n in zip(levels, (2, 4)):
        assert lv["requests"] == n and lv["success_rate"] == 100.0
        assert lv["completion_tokens"] == 5 * n and lv["avg_prompt_tokens"] == 42
        assert lv["avg_ttft_s"] > 0 and lv["avg_tpot_s"] > 0 and lv["avg_itl_s"] > 0
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["success"] and len(r["itl_s"]) == 4 for r in rows)
    assert (out / "summary.md").is_file()
    with Image.open(out / "plot.png") as img:
        assert img.format == "PNG"

    assert len(seen) == 1 + 6  # one warm-up + the sweep
    body = seen[-1]
    assert body["ignore_eos"] is True and body["min_tokens"] == 5 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg")


def test_cli_reports_failures(fake_server, tmp_path):
    url, _ = fake_server
    cmd = [sys.executable, "-m", "core.bench", "--url", url, "--model", "nope", "--no-progress"]
    cmd += ["--output-dir", str(tmp_path / "r"), "--api", "completions"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "HTTP 404" in proc.stderr
