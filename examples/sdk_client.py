"""Talk to a running Tessera engine over ZeroMQ with the client SDK (no HTTP involved).

After scripts/install.sh (or scripts/serve.sh) has made .venv, from the repository root:

    .venv/bin/python -m core.launch --no-http --run-dir /tmp/tessera-run &   # wait for "Tessera ready"
    .venv/bin/python examples/sdk_client.py --address ipc:///tmp/tessera-run/front.sock "Tell me a joke"
    .venv/bin/python examples/sdk_client.py --async --address ipc:///tmp/tessera-run/front.sock "Hi"
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocols.client import AsyncEngineClient, EngineClient, new_request  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("prompt", nargs="?", default="What is the capital of France?")
    ap.add_argument(
        "--address",
        required=True,
        help="the engine's front socket (zmq=... in the launch log, or ipc://RUN_DIR/front.sock)",
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--async", dest="use_async", action="store_true", help="use the async client")
    args = ap.parse_args(argv)
    messages = [{"role": "user", "content": args.prompt}]

    if args.use_async:

        async def run() -> None:
            client = AsyncEngineClient(args.address)
            await client.wait_ready(timeout=60)
            req = new_request(messages=messages, max_tokens=args.max_tokens, temperature=0.0)
            async for out in client.generate(req):
                print(out.text, end="", flush=True)
            print()
            client.close()

        asyncio.run(run())
        return 0

    with EngineClient(args.address) as client:
        client.wait_ready(timeout=60)
        req = new_request(messages=messages, max_tokens=args.max_tokens, temperature=0.0)
        final = None
        for out in client.stream(req):  # streaming: print text as it arrives
            print(out.text, end="", flush=True)
            final = out
        print()
        if final is not None:
            print(
                f"[finish_reason={final.finish_reason} prompt_tokens={final.prompt_tokens} "
                f"completion_tokens={final.completion_tokens}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
