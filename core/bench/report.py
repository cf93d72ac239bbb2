"""Outputs of a run: the summary table (printed and saved as Markdown), ``summary.json``,
``requests.jsonl`` and ``plot.png`` (throughput and latency against concurrency)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from core.bench.metrics import RequestRecord, request_metrics


def fmt_num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# (header, formatter of one level's summary dict), in evalscope's order plus the ITL columns.
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("Conc.", lambda s: str(s["concurrency"])),
    ("RPS", lambda s: fmt_num(s["rps"], 2)),
    ("Avg Lat.(s)", lambda s: fmt_num(s["avg_latency_s"])),
    ("P99 Lat.(s)", lambda s: fmt_num(s["p99_latency_s"])),
    ("Gen. toks/s", lambda s: fmt_num(s["gen_tokens_per_s"], 2)),
    ("Avg TTFT(s)", lambda s: fmt_num(s["avg_ttft_s"])),
    ("P99 TTFT(s)", lambda s: fmt_num(s["p99_ttft_s"])),
    ("Avg TPOT(s)", lambda s: fmt_num(s["avg_tpot_s"])),
    ("P99 TPOT(s)", lambda s: fmt_num(s["p99_tpot_s"])),
    ("Avg ITL(s)", lambda s: fmt_num(s["avg_itl_s"])),
    ("P99 ITL(s)", lambda s: fmt_num(s["p99_itl_s"])),
    ("Success", lambda s: f"{s['success_rate']:.1f}%"),
]


def format_table(levels: list[dict[str, Any]]) -> str:
    """The per-level summary as a Markdown table (readable in a terminal too)."""
    rows = [[h for h, _ in COLUMNS]] + [[f(s) for _, f in COLUMNS] for s in levels]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])


def format_header(config: dict[str, Any]) -> str:
    """A few lines naming what was measured."""
    ds = config["dataset"]
    if ds == "random_vl":
        ds += (
            f" ({config['image_num']} x {config['image_width']}x{config['image_height']} "
            f"{config['image_format']})"
        )
    return (
        f"model: {config['model']}   url: {config['url']}   api: {config['api']}\n"
        f"dataset: {ds}   prompt tokens: {config['prompt_tokens']}   "
        f"max tokens: {config['max_tokens']}   min tokens: {config['min_tokens']}"
    )


def request_rows(concurrency: int, records: list[RequestRecord]) -> list[dict[str, Any]]:
    """One JSON-ready row per request of a level (times relative to the level's first send)."""
    t0 = min((r.start for r in records), default=0.0)
    rows = []
    for r in records:
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "success": r.success,
            "error": r.error,
            "status": r.status,
            "start_s": r.start - t0,
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
        }
        if r.success:
            m = request_metrics(r)
            row.update(
                latency_s=m.latency,
                ttft_s=m.ttft,
                tpot_s=m.tpot,
                completion_tokens=m.completion_tokens,
                content_deltas=len(r.content_times),
                itl_s=m.itl,
            )
        rows.append(row)
    return rows


def write_json(out_dir: str, config: dict[str, Any], levels: list[dict[str, Any]]) -> str:
    path = os.path.join(out_dir, "summary.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"config": config, "levels": levels}, f, indent=2)
    return path


def write_requests(out_dir: str, rows: list[dict[str, Any]]) -> str:
    path = os.path.join(out_dir, "requests.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_table(out_dir: str, header: str, table: str) -> str:
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("```\n" + header + "\n```\n\n" + table + "\n")
    return path


def write_plot(out_dir: str, levels: list[dict[str, Any]], title: str = "") -> str | None:
    """plot.png: generated tokens/s and RPS, latency and TTFT, TPOT and ITL, each against
    concurrency. None when matplotlib is not installed (``pip install tessera[bench]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    conc = [s["concurrency"] for s in levels]

    def series(key: str, scale: float = 1.0) -> list[float]:
        return [float("nan") if s[key] is None else s[key] * scale for s in levels]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    ax.plot(conc, series("gen_tokens_per_s"), "o-", label="generated tok/s")
    ax.set_ylabel("generated tokens/s")
    ax2 = ax.twinx()
    ax2.plot(conc, series("rps"), "s--", color="tab:orange", label="RPS")
    ax2.set_ylabel("requests/s")
    ax.set_title("Throughput")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
    ax = axes[1]
    for key, label, style in [
        ("avg_latency_s", "avg latency", "o-"),
        ("p99_latency_s", "P99 latency", "o--"),
        ("avg_ttft_s", "avg TTFT", "s-"),
        ("p99_ttft_s", "P99 TTFT", "s--"),
    ]:
        ax.plot(conc, series(key), style, label=label)
    ax.set_ylabel("seconds")
    ax.set_title("Latency")
    ax.legend(loc="upper left")
    ax = axes[2]
    for key, label, style in [
        ("avg_tpot_s", "avg TPOT", "o-"),
        ("p99_tpot_s", "P99 TPOT", "o--"),
        ("avg_itl_s", "avg ITL", "s-"),
        ("p99_itl_s", "P99 ITL", "s--"),
    ]:
        ax.plot(conc, series(key, 1000.0), style, label=label)
    ax.set_ylabel("milliseconds")
    ax.set_title("Per-token latency")
    ax.legend(loc="upper left")
    for ax in axes:
        ax.set_xlabel("concurrency")
        if len(set(conc)) > 1 and min(conc) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(conc)))
        ax.set_xticklabels([str(c) for c in sorted(set(conc))])
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out_dir, "plot.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
