#!/usr/bin/env python3
"""Time the executor's prefill step in-process (no server): one prompt of TOKENS text tokens,
optionally after CACHED tokens already in the KV cache (a shared prefix), with the platform's
prefill attention kernel and with SDPA, the two alternated in one process.

    python scripts/bench_prefill.py --model DIR --tokens 654 --cached 0 16 --reps 7

Prints the median step time per (cached, attention); --profile adds an operator table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from actors.execution import KVLimits, ModelRunner  # noqa: E402
from devices import get_platform  # noqa: E402
from models.attention import Attention, PrefillKernel  # noqa: E402
from protocols.messages import (  # noqa: E402
    EngineRequest,
    SamplingParams,
    ScheduledSequence,
    StepPlan,
)


def prompt(runner: ModelRunner, length: int) -> list[int]:
    c = runner.model.config
    # Text tokens only: an image placeholder id in a prompt would ask for an image.
    vocab = min(i for i in (c.vocab_size, c.image_token_id, c.vision_start_token_id) if i)
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(0)).tolist()


def prefill_once(runner: ModelRunner, tokens: int, cached: int, step: int) -> float:
    """Seconds of the step that prefills `tokens` after `cached` tokens (filled untimed)."""
    ids = prompt(runner, cached + tokens)
    table = list(range(-(-(cached + tokens + 1) // runner.pool.block_size)))
    name = f"r{step}"
    request = EngineRequest(name, ids, SamplingParams(max_tokens=1, temperature=0.0), 1)
    first = [request]
    if cached:
        runner.execute(StepPlan(step, [ScheduledSequence(name, 0, cached, table, False)], first))
        first = []
    plan = StepPlan(step + 1, [ScheduledSequence(name, cached, tokens, table, True)], first)
    t0 = time.perf_counter()
    runner.execute(plan)
    elapsed = time.perf_counter() - t0
    runner.execute(StepPlan(step + 2, [], [], [name]))
    return elapsed


def set_kernel(runner: ModelRunner, kernel: PrefillKernel | None) -> None:
    for module in runner.model.modules():
        if isinstance(module, Attention):
            module.prefill_kernel = kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokens", type=int, default=654)
    ap.add_argument("--cached", type=int, nargs="+", default=[0, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="operator table of one step per mode")
    args = ap.parse_args()
    platform = get_platform(args.device)
    limits = KVLimits(
        max_model_len=max(args.cached) + args.tokens + 16, max_num_seqs=1, memory_utilization=0.2
    )
    runner = ModelRunner.load(
        args.model, platform, dtype=args.dtype, limits=limits, enforce_eager=True
    )
    kernels = {m.prefill_kernel for m in runner.model.modules() if isinstance(m, Attention)}
    platform_kernel = kernels.pop() if len(kernels) == 1 else None
    modes: dict[str, PrefillKernel | None] = {"sdpa": None}
    if platform_kernel is not None:
        modes["kernel"] = platform_kernel
    step = 0
    for cached in args.cached:
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for rep in range(args.reps + 1):
            for mode, kernel in modes.items():
                set_kernel(runner, kernel)
                elapsed = prefill_once(runner, args.tokens, cached, step)
                step += 3
                if rep:  # the first round warms up
                    times[mode].append(elapsed)
        for mode, values in times.items():
            print(
                f"{args.tokens} tokens after {cached} cached, {mode:6s}: median "
                f"{statistics.median(values) * 1e3:7.1f} ms  min {min(values) * 1e3:7.1f} ms",
                flush=True,
            )
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for mode, kernel in modes.items():
            set_kernel(runner, kernel)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                prefill_once(runner, args.tokens, args.cached[0], step)
            step += 3
            print(f"{mode}:", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
