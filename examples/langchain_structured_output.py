"""langchain-openai's `with_structured_output` against a Tessera server, unmodified: both of its
methods, `json_schema` (Tessera's structured outputs) and `function_calling` (a named
tool_choice, held to the tool's schema).

Not a dependency of Tessera: install langchain-openai in a venv of its own, start a server,
then run this with that venv's Python:

    python3 -m venv /tmp/lc && /tmp/lc/bin/pip install langchain-openai
    scripts/serve.sh --port 8000 &                                  # the default model
    /tmp/lc/bin/python examples/langchain_structured_output.py \\
        --base-url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse

from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class Animal(BaseModel):
    label: str = Field(description="the animal", max_length=12)
    count: int = Field(ge=1, le=3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    args = ap.parse_args()
    llm = ChatOpenAI(
        base_url=args.base_url, api_key="none", model=args.model, temperature=0, max_tokens=60
    )
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Animal, method=method)
        answer = structured.invoke("Which animal is in the picture? Answer in JSON.")
        assert isinstance(answer, Animal), answer
        print(f"{method}: {answer!r}")


if __name__ == "__main__":
    main()
