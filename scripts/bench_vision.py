#!/usr/bin/env python3
"""Time the vision tower in-process: one image encoded with the elementwise steps eager and
compiled (models/vision_kernels.py), and compiled with SDPA in place of the platform's attention
kernel (where it has one), all alternated in one process.

    python scripts/bench_vision.py --model DIR --grid 46 46 --reps 5
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
from models.qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--grid", type=int, nargs=2, default=[46, 46], help="patches high, wide")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    platform = get_platform(args.device)
    limits = KVLimits(max_model_len=4096, max_num_seqs=1, memory_utilization=0.2)
    runner = ModelRunner.load(
        args.model, platform, dtype=args.dtype, limits=limits, enforce_eager=True
    )
    model = runner.model
    if not isinstance(model, Qwen2_5_VLModel):
        raise SystemExit(f"{args.model} has no vision tower")
    c = model.visual.config
    h, w = args.grid
    pixels = torch.randn(h * w, c.in_channels * c.temporal_patch_size * c.patch_size**2)
    image = (pixels.to(runner.device), (1, h, w))
    eager = model.visual.kernels
    t0 = time.perf_counter()
    model.visual.use_compiler(platform.compile)
    print(f"compiled and warmed in {time.perf_counter() - t0:.1f} s", flush=True)
    compiled = model.visual.kernels
    attention = model.visual.attention
    variants = {"eager": (eager, attention), "compiled": (compiled, attention)}
    if attention is not None:
        variants["compiled-sdpa"] = (compiled, None)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        model.encode_images([image])
        for _ in range(args.reps):
            for name, (kernels, attn) in variants.items():
                model.visual.kernels, model.visual.attention = kernels, attn
                t0 = time.perf_counter()
                model.encode_images([image])
                platform.synchronize(runner.device)
                times[name].append(time.perf_counter() - t0)
    for name, values in times.items():
        print(f"{name:13s} {h}x{w} patches: median {statistics.median(values) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
