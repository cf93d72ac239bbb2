"""Incremental detokenizer: turns one request's sampled token ids into text deltas and stop hits.
The detokenizer stage keeps one per running request and feeds it each step's new tokens."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from models.tokenizer import TextTokenizer

# Prompt tokens given to the stream as context, so the first generated token decodes with
# the spacing it has after the prompt (e.g. sentencepiece's leading-space rule). The stage that
# opens a request's stream sends this many of the prompt's last ids (StreamOpen.prompt_tail_ids).
PROMPT_CONTEXT = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decode tokens as they arrive; never split a UTF-8 character; cut text at stop strings."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        prompt_tail_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        context = list(prompt_tail_ids or [])[-PROMPT_CONTEXT:]
        self._ids = context  # context plus every generated id, to decode leftovers in flush()
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []  # ids fed since the stream last produced text
        self.text = ""  # all text decoded so far
        self._emitted = 0  # how much of `text` has been handed out
        self.stopped: str | None = None

    def push(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Feed new ids; return (text to emit now, the stop string matched or None)."""
        if self.stopped is not None:
            return "", self.stopped
        for token_id in token_ids:
            self._ids.append(token_id)
            chunk = self._stream.step(self.tokenizer.hf, token_id)
            if chunk is None:
                self._pending.append(token_id)
            else:
                self._pending.clear()
                self.text += chunk
        return self._release()

    def flush(self) -> str:
        """What is still held back, for a request that ends for a reason other than a stop."""
        if self.stopped is not None:
            return ""
        if self._pending:
            # Ids that never formed a whole character: keep whatever decodes, drop the broken tail.
            prefix = self._ids[: len(self._ids) - len(self._pending)][-PROMPT_CONTEXT:]
            full = self.tokenizer.decode(prefix + self._pending, self.skip_special_tokens)
            head = self.tokenizer.decode(prefix, self.skip_special_tokens)
            tail = full[len(head) :] if full.startswith(head) else ""
            self.text += tail.rstrip(_REPLACEMENT)
            self._pending.clear()
        out = self.text[self._emitted :]
        self._emitted = len(self.text)
        return out

    def _release(self) -> tuple[str, str | None]:
        start = self._emitted
        hit = self._find_stop(start)
        if hit is not None:
            at, stop = hit
            end = at + len(stop) if self.include_stop_str_in_output else at
            self.stopped = stop
            self._emitted = len(self.text)
            return self.text[start:end], stop
        keep = self._held_back(start)
        end = len(self.text) - keep
        self._emitted = end
        return self.text[start:end], None

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _held_back(self, start: int) -> int:
        """Length of the longest unemitted suffix that could still begin a stop string."""
        tail = self.text[start:]
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(tail)), longest, -1):
                if stop.startswith(tail[-n:]):
                    longest = n
                    break
        return longest
