"""The detokenizer stage's stream state (actors/detokenizer.Streams) with real tokenizers: opened by
StreamOpen, fed by TokenDeltas in any order relative to it, closed by a finish, a stop string or
an empty abort delta."""

from __future__ import annotations

import pytest

from actors.detokenizer import Streams
from models.tokenizer import TextTokenizer
from protocols.messages import (
    PositionLogprobs,
    SamplingParams,
    StreamOpen,
    TokenDelta,
    TokenLogprob,
)
from tests.fixtures.checkpoints import tokenizer_dir
from tests.models.test_detokenizer import llama_style

MM = {"images": [{"original_size": [64, 48], "resized_size": [56, 56]}]}


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load(str(tokenizer_dir()))


def opened(rid: str, tail: list[int] | None = None, **sampling: object) -> StreamOpen:
    return StreamOpen(rid, SamplingParams(**sampling), prompt_tail_ids=tail or [], mm_info=MM)  # type: ignore[arg-type]


def deltas(tok: TextTokenizer, rid: str, text: str, finish: str = "length") -> list[TokenDelta]:
    ids = tok.encode(text)
    out = [TokenDelta(rid, [t], prompt_tokens=5) for t in ids]
    out[-1].finish_reason = finish
    return out


def test_stream_text_usage_and_mm_info_on_the_first_output(tok: TextTokenizer) -> None:
    s = Streams(tok)
    assert s.open(opened("r")).outputs == []
    outs = s.feed(deltas(tok, "r", "Hello there, friend 😀")).outputs
    assert "".join(o.text for o in outs) == "Hello there, friend 😀"
    assert [o.mm_info for o in outs] == [MM] + [None] * (len(outs) - 1)
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == len(outs)
    assert all(o.prompt_tokens == 5 for o in outs)
    assert s.open_streams == {}


def test_deltas_before_their_stream_open_wait_for_it(tok: TextTokenizer) -> None:
    s = Streams(tok)
    early = deltas(tok, "r", "One two three")
    assert s.feed(early[:2]).outputs == []  # not opened yet: held
    emitted = s.open(opened("r"))
    emitted.outputs += s.feed(early[2:]).outputs
    assert "".join(o.text for o in emitted.outputs) == "One two three"
    assert emitted.outputs[0].mm_info == MM and emitted.outputs[-1].finish_reason == "length"


def test_an_empty_abort_delta_closes_the_stream_silently(tok: TextTokenizer) -> None:
    s = Streams(tok)
    s.open(opened("r"))
    s.feed(deltas(tok, "r", "Some text")[:1])
    assert s.feed([TokenDelta("r", [], finish_reason="abort")]).outputs == []
    assert "r" not in s.open_streams


def test_an_abort_before_the_stream_open_drops_it_and_the_held_deltas(tok: TextTokenizer) -> None:
    s = Streams(tok)
    s.feed(deltas(tok, "r", "Early words")[:1])
    assert s.feed([TokenDelta("r", [], finish_reason="abort")]).outputs == []
    assert s.open(opened("r")).outputs == [] and s.open_streams == {}  # the late open: dropped
    # The id may be used again by a new request, which streams normally.
    s.open(opened("r"))
    assert "".join(o.text for o in s.feed(deltas(tok, "r", "Again")).outputs) == "Again"


def test_a_stop_string_finishes_here_and_tells_the_scheduler(tok: TextTokenizer) -> None:
    s = Streams(tok)
    s.open(opened("r", stop=["STOP"]))
    all_deltas = deltas(tok, "r", "keep this STOP not this")
    emitted = s.feed(all_deltas[:-2])
    assert "".join(o.text for o in emitted.outputs) == "keep this "
    assert emitted.outputs[-1].finish_reason == "stop" and emitted.outputs[-1].stop_reason == "STOP"
    assert emitted.stopped == ["r"]
    # Tokens already in flight are dropped, not held for a stream that will never open again.
    assert s.feed(all_deltas[-2:]).outputs == []
    s.open(opened("r"))
    assert s.feed(deltas(tok, "r", "fresh")).outputs[0].text == "fresh"


def test_an_engine_finish_is_not_reported_back_as_a_stop(tok: TextTokenizer) -> None:
    s = Streams(tok)
    s.open(opened("r", stop=["lo"]))
    emitted = s.feed([TokenDelta("r", tok.encode("Hello"), finish_reason="length")])
    assert emitted.outputs[0].finish_reason == "stop" and emitted.stopped == []


def test_logprobs_are_named_with_their_token_text(tok: TextTokenizer) -> None:
    s = Streams(tok)
    s.open(opened("r"))
    a, b = tok.encode(" hello")[0], tok.eos_token_ids[0]
    lp = PositionLogprobs(TokenLogprob(a, -0.1), [TokenLogprob(b, -2.0)])
    (out,) = s.feed([TokenDelta("r", [a], logprobs=[lp])]).outputs
    assert out.logprobs is not None
    assert (out.logprobs[0].sampled.token, out.logprobs[0].top[0].token) == (" hello", "<|im_end|>")


def test_the_prompt_tail_keeps_a_sentencepiece_first_words_space() -> None:
    s = Streams(llama_style())
    s.open(opened("with", tail=[1, 3]))  # "<s> Hi"
    s.open(opened("without"))
    got = s.feed([TokenDelta("with", [4, 5]), TokenDelta("without", [4, 5])]).outputs
    assert [o.text for o in got] == [" there friend", "there friend"]
