#!/usr/bin/env python3
"""Time the executor's decode step in-process (no server): ModelRunner on one device, B sequences
of CONTEXT tokens each, greedy, recorded (graph) steps against eager ones.

    python scripts/bench_decode_step.py --model DIR --device cuda --batch 1 8 32 --context 700

Prints one line per (mode, batch): median and p90 step time over --steps steps and the tokens
per second that makes. The prefill that fills the context is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from actors.execution import KVLimits, ModelRunner  # noqa: E402
from devices import get_platform  # noqa: E402
from protocols.messages import (  # noqa: E402
    EngineRequest,
    SamplingParams,
    ScheduledSequence,
    StepPlan,
)


def time_steps(runner: ModelRunner, batch: int, context: int, steps: int) -> list[float]:
    bs = runner.pool.block_size
    per_seq = -(-(context + steps + 1) // bs)
    gen = torch.Generator().manual_seed(batch)
    c = runner.model.config
    # Text tokens only: an image placeholder id in a prompt would ask for an image.
    vocab = min(i for i in (c.vocab_size, c.image_token_id, c.vision_start_token_id) if i)
    requests, tables = [], []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
        params = SamplingParams(max_tokens=steps + 1, temperature=0.0)
        requests.append(EngineRequest(f"r{i}", prompt, params, steps + 1))
        tables.append(list(range(i * per_seq, (i + 1) * per_seq)))
    seqs = [ScheduledSequence(f"r{i}", 0, context, tables[i], True) for i in range(batch)]
    runner.execute(StepPlan(0, seqs, requests))
    times = []
    for step in range(steps):
        pos = context + step
        plan = StepPlan(
            step + 1, [ScheduledSequence(f"r{i}", pos, 1, tables[i], True) for i in range(batch)]
        )
        t0 = time.perf_counter()
        runner.execute(plan)  # returns sampled ids as Python ints: the device work is done
        times.append(time.perf_counter() - t0)
    runner.execute(StepPlan(steps + 1, [], [], [f"r{i}" for i in range(batch)]))
    return times


def profile_step(runner: ModelRunner, context: int) -> None:
    """Device kernels of a few batch-1 eager steps, by total time."""
    from torch.profiler import ProfilerActivity, profile

    time_steps(runner, 1, context, 3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_steps(runner, 1, context, 3)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=30), flush=True)


def profile_replays(runner: ModelRunner, sizes: list[int]) -> None:
    """Device kernels inside recorded steps, by total time over 10 replays per size."""
    from torch.profiler import ProfilerActivity, profile

    assert runner.graphs is not None
    for size in sizes:
        replay = runner.graphs.graphs[size]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                replay()
            runner.graphs.lens.sum().item()  # waits for the replays
        print(f"recorded step, batch {size}: 10 replays", flush=True)
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25)
        print(table, flush=True)


def unfuse(model: torch.nn.Module) -> None:
    """Undo devices/cpu_fused_layers.fuse_layer_ops: torch RMSNorm and rotary again."""
    from devices.cpu_fused_layers import FusedRMSNorm
    from models.attention import Attention
    from models.layers import RMSNorm

    for module in model.modules():
        if isinstance(module, Attention):
            module.rope_store = None
        for name, child in list(module.named_children()):
            if isinstance(child, FusedRMSNorm):
                norm = RMSNorm(child.weight.shape[0], child.eps)
                norm.weight = child.weight
                setattr(module, name, norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=700)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["graphs", "eager"],
        choices=["graphs", "graphs-uncompiled", "eager", "eager-unfused"],
        help="graphs-uncompiled: recorded without torch.compile (TESSERA_COMPILE=0); "
        "eager-unfused: eager with the CPU's fused C norms and rotary taken out again",
    )
    ap.add_argument("--profile", action="store_true", help="kernel table of one eager step")
    ap.add_argument(
        "--profile-replay", action="store_true", help="kernel tables of recorded steps (1, max)"
    )
    args = ap.parse_args()
    platform = get_platform(args.device)
    max_batch = max(args.batch)
    blocks_needed = max_batch * (-(-(args.context + args.steps + 1) // 16))
    for mode in args.modes:
        os.environ["TESSERA_COMPILE"] = "0" if mode == "graphs-uncompiled" else "1"
        t0 = time.perf_counter()
        runner = ModelRunner.load(
            args.model,
            platform,
            dtype=args.dtype,
            limits=KVLimits(
                max_model_len=args.context + args.steps + 16,
                max_num_seqs=max_batch,
                memory_utilization=0.4,  # room for the next mode's runner
            ),
            enforce_eager=mode.startswith("eager"),
        )
        if mode == "eager-unfused":
            unfuse(runner.model)
        print(f"{mode}: loaded (and recorded) in {time.perf_counter() - t0:.1f} s", flush=True)
        if runner.pool.num_blocks < blocks_needed:
            raise SystemExit(f"KV pool of {runner.pool.num_blocks} blocks < {blocks_needed}")
        if runner.graphs is not None:
            replay = runner.graphs.graphs[1]
            for _ in range(5):
                replay()
            platform.synchronize(runner.device)
            t0 = time.perf_counter()
            for _ in range(50):
                replay()
            platform.synchronize(runner.device)
            print(f"{mode}: replay alone, batch 1: {(time.perf_counter() - t0) / 50 * 1e3:.2f} ms")
        if args.profile_replay and runner.graphs is not None:
            profile_replays(runner, [1, max_batch])
        if args.profile and mode == "eager":
            profile_step(runner, args.context)
        for batch in args.batch:
            times = time_steps(runner, batch, args.context, args.steps)[3:]
            med = statistics.median(times)
            p90 = sorted(times)[int(0.9 * (len(times) - 1))]
            print(
                f"{mode:6s} batch {batch:3d} context {args.context}: step median "
                f"{med * 1e3:7.2f} ms  p90 {p90 * 1e3:7.2f} ms  {batch / med:8.1f} tok/s",
                flush=True,
            )
        del runner
        platform.empty_cache()


if __name__ == "__main__":
    main()
