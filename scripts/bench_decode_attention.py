#!/usr/bin/env python3
"""Time one layer's CPU decode-attention call (devices/cpu_paged_attention.c) in-process:
SEQS one-token sequences of LEN keys each, their blocks scattered over the pool as a cache
looks after requests came and went.

    python scripts/bench_decode_attention.py --seqs 32 --len 700 --heads 14 --kv-heads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from devices.cpu_paged_attention import paged_decode_attention  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--len", type=int, default=700, help="keys per sequence")
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype, bs = DTYPES[args.dtype], args.block_size
    per_seq = -(-args.len // bs)
    num_blocks = args.seqs * per_seq + 4
    tables = torch.randperm(num_blocks)[: args.seqs * per_seq].view(args.seqs, per_seq)
    shape = (args.kv_heads, num_blocks * bs, args.head_dim)
    k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    q = torch.randn(args.seqs, args.heads, args.head_dim, dtype=dtype)
    lens = torch.full((args.seqs,), args.len)

    def call() -> torch.Tensor:
        return paged_decode_attention(q, k, v, tables, lens, bs, args.head_dim**-0.5)

    for _ in range(5):
        call()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    per_call = (time.perf_counter() - t0) / args.calls
    kv_bytes = 2 * args.seqs * args.len * args.kv_heads * args.head_dim * k.element_size()
    print(
        f"{args.seqs} x {args.len} keys, {args.heads}/{args.kv_heads} heads, {args.dtype}, "
        f"{torch.get_num_threads()} threads: {per_call * 1e3:.3f} ms a call, "
        f"{kv_bytes / per_call / 1e9:.1f} GB/s of keys and values"
    )


if __name__ == "__main__":
    main()
