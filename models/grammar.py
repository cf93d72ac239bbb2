"""Structured outputs: a request's format (JSON schema, regex, choice, grammar) as an llguidance
grammar, checked against the model's tokenizer, and one matcher per request that tells the
sampler which tokens may come next.

The tokenizer stage calls `check` (a bad schema is the client's 400); the executor's model
runner keeps a `Constraint` per constrained request, asks it for the allowed tokens before each
sample and feeds it the token drawn; the next mask is then computed on a worker thread while
the next forward runs. llguidance (https://github.com/guidance-ai/llguidance) is
the engine: it builds masks lazily from the tokenizer's byte trie, so a mask costs ~tens of
microseconds, and it has no dependencies of its own.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance
import numpy as np
import torch

from models.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

KINDS = ("json", "regex", "choice", "grammar")
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": True,
}


def grammar_text(kind: str, spec: str) -> str:
    """The llguidance grammar for one request format; ValueError naming what is wrong."""
    if kind == "json":
        try:
            json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        # Compact JSON unless the schema's own "x-guidance" says otherwise: a model may not
        # spend its tokens on whitespace; keywords llguidance does not implement are ignored.
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    if kind == "choice":
        try:
            choices = json.loads(spec)
        except json.JSONDecodeError:
            choices = None
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise ValueError("choice must be a non-empty list of strings")
        return llguidance.grammar_from("choice", spec)
    if kind == "regex":
        return llguidance.grammar_from("regex", spec)
    if kind == "grammar":
        return llguidance.grammar_from("grammar", spec)
    raise ValueError(f"unknown structured output kind {kind!r}; expected one of {KINDS}")


@functools.lru_cache(maxsize=4)
def grammar_tokenizer(path: str, eos_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of the tokenizer at `path` (a folder or .gguf); built once (~1 s)."""
    hf = TextTokenizer.load(path).hf
    return llguidance.LLTokenizer(hf.to_str(), eos_token=list(eos_ids) or None)


def check(kind: str, spec: str, tokenizer: llguidance.LLTokenizer) -> str | None:
    """Why a request format cannot be enforced with this tokenizer, or None when it can."""
    try:
        grammar = grammar_text(kind, spec)
    except ValueError as exc:
        return str(exc)
    ok, _warnings, error = _validate(grammar, tokenizer)
    return None if ok else error


def _validate(grammar: str, tokenizer: llguidance.LLTokenizer) -> tuple[bool, list[str], str]:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        return False, [], messages[0] if messages else "the grammar could not be compiled"
    return True, list(messages), ""


# Masks are computed here while the executor's main thread runs the next forward: llguidance
# releases the GIL while it works, so the mask is usually ready when the sampler asks.
_MASKER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-mask")


class Constraint:
    """One request's matcher: the tokens allowed next, and the tokens drawn so far."""

    def __init__(self, kind: str, spec: str, tokenizer: llguidance.LLTokenizer) -> None:
        self.matcher = llguidance.LLMatcher(tokenizer, grammar_text(kind, spec), log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"structured output: {self.matcher.get_error()}")
        self.tokenizer_vocab = tokenizer.vocab_size
        self._next: Future[bytes] = _MASKER.submit(self.matcher.compute_bitmask)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Bool [vocab_size]: True where a token may come next (ids past the tokenizer's
        vocabulary never may)."""
        bits = np.frombuffer(self._next.result(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: min(vocab_size, self.tokenizer_vocab)]
        out = torch.zeros(vocab_size, dtype=torch.bool)
        out[: mask.shape[0]] = torch.from_numpy(mask.astype(np.bool_))
        return out

    def accept(self, token_id: int) -> None:
        """Advance past a drawn token (always one `allowed` gave, so never an error), and start
        computing the next mask."""
        self._next.result()  # the matcher is not shared between threads
        self.matcher.consume_token(token_id)
        self._next = _MASKER.submit(self.matcher.compute_bitmask)

    @property
    def finished(self) -> bool:
        """The format is complete: only an end-of-sequence token may follow."""
        return self.matcher.is_stopped()
