"""Offline batch inference with the Python API (starts its own engine, no server needed).

After scripts/install.sh (or scripts/serve.sh) has made .venv, from the repository root:

    .venv/bin/python examples/offline_inference.py              # the embedded SmolLM2-135M-Instruct
    .venv/bin/python examples/offline_inference.py --model /path/to/hf-checkpoint
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols.offline import LLM, SamplingParams  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    questions = ["What is the capital of France?", "Name three primary colours."]
    with LLM(args.model, max_model_len=2048, kv_cache_memory=256 << 20) as llm:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        chats = [[{"role": "user", "content": q}] for q in questions]
        for q, out in zip(questions, llm.chat(chats, params)):
            print(f"Q: {q}\nA: {out.text.strip()}\n")
        for out in llm.generate(["The quick brown fox"], params):
            print(f"completion: {out.text!r} ({out.completion_tokens} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
