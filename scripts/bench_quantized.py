#!/usr/bin/env python3
"""Quantized weights against dense ones, in-process: c1 decode step time, weight bytes, and the
quality cost (teacher-forced greedy agreement and logit error against a reference variant).

    python scripts/bench_quantized.py --model DIR_OR_GGUF --variants float32 bfloat16 \
        bfloat16:int8 bfloat16:int4 --context 128 --steps 64 --rounds 5

A variant is DTYPE[:QUANTIZATION] (the engine's --dtype and --quantization). All variants are
loaded at once and timed in turns (--rounds rounds of --steps decode steps each), so a machine
shared with other work slows them alike; the step time is the median over every timed step.
Quality: the first variant decodes --quality-tokens tokens greedily after the prompt; every
variant then decodes the same tokens (teacher forcing) and is compared position by position:
argmax agreement and the largest absolute logit difference (and that relative to the largest
reference logit).
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
from protocols.messages import EngineRequest, SamplingParams, ScheduledSequence, StepPlan  # noqa: E402

PROMPT = (
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. "
    "Within fifty years printers were at work in more than two hundred cities, and"
)


class Session:
    """One sequence on one runner, decoded step by step; `force` overrides its last token."""

    def __init__(self, runner: ModelRunner, prompt: list[int], total: int, rid: str) -> None:
        self.runner, self.rid, self.pos = runner, rid, len(prompt)
        bs = runner.pool.block_size
        self.table = list(range(-(-(len(prompt) + total + 1) // bs)))
        params = SamplingParams(max_tokens=total + 1, temperature=0.0)
        request = EngineRequest(rid, prompt, params, total + 1)
        seq = ScheduledSequence(rid, 0, len(prompt), self.table, True)
        self.step_no = 0
        self.last = self._run(StepPlan(0, [seq], [request]))

    def _run(self, plan: StepPlan) -> torch.Tensor:
        tokens, hidden = self.runner.execute_with_hidden(plan)
        assert hidden is not None
        return self.runner.model.compute_logits(hidden[-1:])[0]

    def force(self, token: int) -> None:
        self.runner.requests[self.rid].output_token_ids[-1] = token

    def step(self) -> torch.Tensor:
        self.step_no += 1
        seq = ScheduledSequence(self.rid, self.pos, 1, self.table, True)
        self.pos += 1
        self.last = self._run(StepPlan(self.step_no, [seq]))
        return self.last

    def close(self) -> None:
        self.runner.execute(StepPlan(self.step_no + 1, [], [], [self.rid]))


def prompt_ids(model: str, context: int) -> list[int]:
    from models.tokenizer import TextTokenizer

    ids = TextTokenizer.load(model).encode(PROMPT)
    while len(ids) < context:
        ids = ids + ids
    return ids[:context]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--variants", nargs="+", default=["float32", "bfloat16", "bfloat16:int8"])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quality-tokens", type=int, default=64)
    ap.add_argument("--prefill-reps", type=int, default=0, help="timed prefills per variant")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    platform = get_platform("cpu")
    prompt = prompt_ids(args.model, args.context)
    longest = args.context + max(args.steps * args.rounds, args.quality_tokens) + 16
    runners: dict[str, ModelRunner] = {}
    for variant in args.variants:
        dtype, _, quant = variant.partition(":")
        t0 = time.perf_counter()
        runners[variant] = ModelRunner.load(
            args.model,
            platform,
            dtype=dtype,
            quantization=quant or "none",
            limits=KVLimits(max_model_len=longest, max_num_seqs=1, memory_utilization=0.2),
        )
        r = runners[variant]
        print(
            f"{variant:16s} loaded in {time.perf_counter() - t0:5.1f} s: weights "
            f"{r.weight_bytes / 2**20:7.1f} MiB, KV {r.kv_bytes / 2**20:6.1f} MiB",
            flush=True,
        )
    # Quality: reference greedy tokens, then every variant teacher-forced on them.
    ref_name = args.variants[0]
    ref = Session(runners[ref_name], prompt, args.quality_tokens, "q")
    tokens, ref_logits = [], [ref.last]
    for _ in range(args.quality_tokens):
        tokens.append(int(ref.last.argmax()))
        ref.force(tokens[-1])
        ref_logits.append(ref.step())
    ref.close()
    for name, runner in runners.items():
        s = Session(runner, prompt, args.quality_tokens, "q")
        agree, err, peak = 0, 0.0, 0.0
        for i, token in enumerate(tokens):
            agree += int(s.last.argmax()) == token
            err = max(err, float((s.last - ref_logits[i]).abs().max()))
            peak = max(peak, float(ref_logits[i].abs().max()))
            s.force(token)
            s.step()
        s.close()
        print(
            f"{name:16s} vs {ref_name}: greedy agreement {agree}/{len(tokens)}, max |logit "
            f"error| {err:.3f} ({err / peak:.1%} of the largest logit)",
            flush=True,
        )
    # Prefill: the whole prompt in one step, variants in turn.
    prefill: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(args.prefill_reps):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            Session(runner, prompt, 1, f"p{rep}").close()
            prefill[name].append(time.perf_counter() - t0)
    for name, ts in prefill.items():
        if ts:
            med = statistics.median(ts)
            print(f"{name:16s} prefill of {len(prompt)} tokens median {med * 1e3:7.1f} ms")
    # Speed: rounds of decode steps, variants in turn.
    times: dict[str, list[float]] = {name: [] for name in runners}
    sessions = {
        name: Session(r, prompt, args.steps * args.rounds, "t") for name, r in runners.items()
    }
    for _ in range(args.rounds):
        for name, s in sessions.items():
            for _ in range(args.steps):
                seq = ScheduledSequence(s.rid, s.pos, 1, s.table, True)
                s.pos += 1
                s.step_no += 1
                t0 = time.perf_counter()
                s.runner.execute(StepPlan(s.step_no, [seq]))
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        med = statistics.median(ts[3:])
        print(f"{name:16s} c1 decode step median {med * 1e3:7.2f} ms  {1 / med:7.1f} tok/s")


if __name__ == "__main__":
    main()
