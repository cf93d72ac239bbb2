"""Command line of the benchmark client: parse flags, run each concurrency level, report.

    python -m core.bench --url http://127.0.0.1:8000/v1 --dataset random_vl \
        --parallel 1 2 4 --number 4 8 16 --max-tokens 64 --prompt-tokens 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import numpy as np
import orjson

from core.bench import client, datasets, metrics, report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m core.bench",
        description="Benchmark an OpenAI-compatible server over a sweep of concurrency levels.",
    )
    srv = ap.add_argument_group("server")
    srv.add_argument(
        "--url",
        default="http://127.0.0.1:8000/v1",
        help="API base (.../v1) or full endpoint (.../v1/chat/completions)",
    )
    srv.add_argument("--api", choices=sorted(client.API_PATHS), default="chat")
    srv.add_argument("--model", default=None, help="model name (default: first of /v1/models)")
    srv.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)",
    )
    srv.add_argument("--timeout", type=float, default=1800.0, help="per-request seconds")

    data = ap.add_argument_group("dataset")
    data.add_argument("--dataset", choices=datasets.DATASETS, default="random")
    data.add_argument("--prompt-tokens", type=int, default=100, help="text tokens per prompt")
    data.add_argument(
        "--tokenizer", default=None, help="folder with tokenizer.json to count prompt tokens"
    )
    data.add_argument("--image-num", type=int, default=1, help="images per request (random_vl)")
    data.add_argument("--image-width", type=int, default=640)
    data.add_argument("--image-height", type=int, default=640)
    data.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    data.add_argument("--seed", type=int, default=0)

    gen = ap.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--min-tokens", type=int, default=None, help="sent when given")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument(
        "--extra-args",
        type=json.loads,
        default={},
        help="JSON merged into every body, e.g. '{\"top_k\": 1}' or '{\"ignore_eos\": false}'",
    )

    sweep = ap.add_argument_group("sweep")
    sweep.add_argument("--parallel", type=int, nargs="+", default=[1], help="concurrency levels")
    sweep.add_argument(
        "--number",
        type=int,
        nargs="+",
        default=None,
        help="requests per level: one per --parallel value, or one for all (default: = parallel)",
    )
    sweep.add_argument("--warmup", type=int, default=1, help="untimed requests before the sweep")

    out = ap.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help="default ./bench-results/<timestamp>/")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args(argv)

    if args.number is None:
        args.number = list(args.parallel)
    elif len(args.number) == 1:
        args.number = args.number * len(args.parallel)
    if len(args.number) != len(args.parallel):
        ap.error("--number takes one value, or one per --parallel value")
    if min(args.parallel) < 1 or min(args.number) < 1:
        ap.error("--parallel and --number must be >= 1")
    if args.dataset == "random_vl" and args.api != "chat":
        ap.error("--dataset random_vl needs --api chat")
    if not isinstance(args.extra_args, dict):
        ap.error("--extra-args must be a JSON object")
    if args.output_dir is None:
        args.output_dir = os.path.join("bench-results", time.strftime("%Y%m%d-%H%M%S"))
    return args


def _bodies(args: argparse.Namespace, n: int, seed: list[int], tokenizer: Any) -> list[bytes]:
    rng = np.random.default_rng(seed)
    prompts = datasets.build_prompts(
        args.dataset,
        n,
        args.prompt_tokens,
        rng,
        tokenizer,
        args.image_num,
        args.image_width,
        args.image_height,
        args.image_format,
    )
    return [
        orjson.dumps(
            client.build_body(
                p,
                args.api,
                args.model,
                args.max_tokens,
                args.min_tokens,
                args.temperature,
                extra=args.extra_args,
            )
        )
        for p in prompts
    ]


def _progress_bar(args: argparse.Namespace, total: int, concurrency: int) -> Any:
    if args.no_progress or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"concurrency {concurrency}", unit="req", file=sys.stderr)


def _config(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    cfg = {k: v for k, v in vars(args).items() if k != "api_key"}
    cfg.update(url=endpoint, started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return cfg


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    endpoint = client.endpoint_url(args.url, args.api)
    headers = client.headers_for(args.api_key)
    if args.model is None:
        try:
            args.model = await client.first_model(endpoint, headers)
        except Exception as exc:  # noqa: BLE001 - report and stop
            _log(f"cannot list models at {client.models_url(endpoint)}: {exc}; pass --model")
            return 2
    tokenizer = datasets.load_tokenizer(args.tokenizer)

    if args.warmup > 0:
        bodies = _bodies(args, args.warmup, [args.seed, 1_000_000], tokenizer)
        records = await client.run_level(
            endpoint, headers, bodies, args.api, args.warmup, args.timeout
        )
        failed = [r for r in records if not r.success]
        if failed:
            _log(f"warm-up request failed: {failed[0].error}")
            return 2

    config = _config(args, endpoint)
    _log(report.format_header(config))
    levels: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for i, (conc, number) in enumerate(zip(args.parallel, args.number)):
        bodies = _bodies(args, number, [args.seed, i], tokenizer)
        bar = _progress_bar(args, number, conc)
        on_done = (lambda _rec, bar=bar: bar.update(1)) if bar is not None else None
        try:
            records = await client.run_level(
                endpoint, headers, bodies, args.api, conc, args.timeout, on_done
            )
        finally:
            if bar is not None:
                bar.close()
        summary = metrics.summarize(records, conc)
        summary["number"] = number
        levels.append(summary)
        rows += report.request_rows(conc, records)
        _log(
            f"concurrency {conc}: {summary['succeeded']}/{number} ok in "
            f"{summary['duration_s']:.2f} s, {report.fmt_num(summary['gen_tokens_per_s'], 2)} gen tok/s"
            + (f", errors: {summary['errors'][0]}" if summary["errors"] else "")
        )

    os.makedirs(args.output_dir, exist_ok=True)
    header = report.format_header(config)
    table = report.format_table(levels)
    print("\n" + header + "\n\n" + table + "\n", flush=True)
    paths = [
        report.write_json(args.output_dir, config, levels),
        report.write_requests(args.output_dir, rows),
        report.write_table(args.output_dir, header, table),
    ]
    plot = report.write_plot(args.output_dir, levels, title=f"{args.model} ({args.dataset})")
    if plot is None:
        _log("matplotlib is not installed: no plot (pip install 'tessera[bench]')")
    else:
        paths.append(plot)
    _log("wrote " + ", ".join(paths))
    return 0 if any(s["succeeded"] for s in levels) else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
