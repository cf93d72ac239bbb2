"""Tests for models/detokenizer.py: streamed text equals a full decode, never shows a broken
character, keeps the first word's leading space, and stop strings are cut exactly."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models

from models.detokenizer import PROMPT_CONTEXT, IncrementalDetokenizer
from models.tokenizer import TextTokenizer
from tests.models.test_tokenizer import QWEN_DIR

PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Hello there, general Kenobi! 1234 + 5678 = 6912.",
    "表情 😀🦩🫠👋🏽👨‍👩‍👧 中文字符与日本語のテキスト 𠀀𠀁 🇯🇵 한국어",
    "def f(x):\n    return x ** 2  # ünïcödé ✓\n",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.load(str(QWEN_DIR))


def stream(
    tok: TextTokenizer, ids: list[int], chunk: int = 1, **kwargs: object
) -> tuple[list[str], str | None, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), **kwargs)  # type: ignore[arg-type]
    deltas: list[str] = []
    for i in range(0, len(ids), chunk):
        delta, hit = detok.push(ids[i : i + chunk])
        deltas.append(delta)
        if hit is not None:
            return deltas, hit, detok
    deltas.append(detok.flush())
    return deltas, None, detok


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_streaming_equals_full_decode_without_broken_chars(
    tok: TextTokenizer, text: str, chunk: int
) -> None:
    ids = tok.encode(text + "<|im_end|>")
    deltas, hit, _ = stream(tok, ids, chunk)
    assert hit is None
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


def test_multibyte_character_is_held_until_complete(tok: TextTokenizer) -> None:
    ids = tok.encode("🫠")
    assert len(ids) == 3  # the emoji's four bytes are spread over three tokens
    deltas, _, _ = stream(tok, ids)
    assert deltas == ["", "", "🫠", ""]


def test_special_tokens_kept_when_not_skipped(tok: TextTokenizer) -> None:
    ids = tok.encode("ok<|im_end|>")
    deltas, _, _ = stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == "ok<|im_end|>"


def test_stop_string_spanning_tokens_is_cut_exactly(tok: TextTokenizer) -> None:
    text = "The answer is forty-two. END OF STORY and more text"
    ids = tok.encode(text)
    deltas, hit, detok = stream(tok, ids, stop=["END OF STORY"])
    assert hit == "END OF STORY"
    assert "".join(deltas) == "The answer is forty-two. "
    assert detok.push(tok.encode(" more")) == ("", "END OF STORY")
    assert detok.flush() == ""


def test_include_stop_str_in_output(tok: TextTokenizer) -> None:
    ids = tok.encode("alpha beta\n\ngamma")
    deltas, hit, _ = stream(tok, ids, stop=["\n\n", "never"], include_stop_str_in_output=True)
    assert hit == "\n\n"
    assert "".join(deltas) == "alpha beta\n\n"


def test_earliest_stop_wins_within_one_push(tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tok, None, stop=["gamma", "beta"])
    assert detok.push(tok.encode("alpha beta gamma")) == ("alpha ", "beta")


def test_stop_string_inside_a_multibyte_run(tok: TextTokenizer) -> None:
    ids = tok.encode("前面的文字🦩停止后面")
    deltas, hit, _ = stream(tok, ids, stop=["🦩停"])
    assert hit == "🦩停"
    assert "".join(deltas) == "前面的文字"


def test_possible_stop_prefix_is_held_back_then_flushed(tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tok, None, stop=["<END>", "xyz"])
    delta, hit = detok.push(tok.encode("value <EN"))
    assert (delta, hit) == ("value ", None)  # "<EN" could still become "<END>"
    delta, hit = detok.push(tok.encode("D>"))
    assert (delta, hit) == ("", "<END>")

    detok = IncrementalDetokenizer(tok, None, stop=["<END>"])
    assert detok.push(tok.encode("value <EN")) == ("value ", None)
    assert detok.push(tok.encode("X")) == ("<ENX", None)  # no longer a stop prefix: released
    assert detok.push(tok.encode(" <")) == (" ", None)
    assert detok.flush() == "<"  # the request ended for another reason
    assert detok.flush() == ""


def test_hold_back_never_exceeds_longest_stop_minus_one(tok: TextTokenizer) -> None:
    detok = IncrementalDetokenizer(tok, None, stop=["aaaa"])
    out = ""
    for _ in range(6):
        delta, hit = detok.push(tok.encode("a"))
        out += delta
        if hit is not None:
            break
        assert len(detok.text) - len(out) <= 3
    assert hit == "aaaa" and out == ""


def test_flush_drops_an_unfinished_character(tok: TextTokenizer) -> None:
    ids = tok.encode("ok 🦩")
    detok = IncrementalDetokenizer(tok, None)
    delta, _ = detok.push(ids[:-1])  # the emoji's last byte never arrives
    rest = detok.flush()
    assert "\ufffd" not in delta + rest
    assert delta + rest == "ok "


def llama_style() -> TextTokenizer:
    """A sentencepiece-style vocabulary with Llama-2's decoder, which strips the space that
    leads the first token it decodes."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hi": 3, "▁there": 4, "▁friend": 5, "!": 6}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return TextTokenizer(hf)


def test_prompt_tail_keeps_the_first_words_leading_space() -> None:
    tok = llama_style()
    assert tok.decode([4, 5]) == "there friend"  # decoded alone, the leading space is lost
    detok = IncrementalDetokenizer(tok, [1, 3])  # "<s> Hi" then the completion
    assert [detok.push([4]), detok.push([5, 6])] == [(" there", None), (" friend!", None)]
    assert detok.flush() == ""
    without = IncrementalDetokenizer(tok, None)
    assert without.push([4]) == ("there", None)


def test_only_the_last_prompt_ids_are_context(tok: TextTokenizer) -> None:
    prompt = tok.encode(PROMPT * 3)
    ids = tok.encode("Hello there")
    whole = IncrementalDetokenizer(tok, prompt)
    tail = IncrementalDetokenizer(tok, prompt[-PROMPT_CONTEXT:])
    assert whole.push(ids) == tail.push(ids) == ("Hello there", None)
