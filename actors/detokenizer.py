"""Detokenizer stage: turns new token ids into text deltas, applies stop strings, names logprobs.

Each request is owned by one replica (owner(request id)): the stage that emits the request opens
its stream here (StreamOpen), the scheduler's TokenDeltas feed it, and the text goes on to the
gateway. A matched stop string finishes the request and tells the scheduler to free it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from actors import metrics
from models.detokenizer import IncrementalDetokenizer
from models.tokenizer import TextTokenizer
from protocols.messages import (
    AbortRequest,
    OutputBatch,
    PositionLogprobs,
    RequestOutput,
    StreamOpen,
    TokenBatch,
    TokenDelta,
)
from protocols.stage import Stage

# Requests finished here by a stop string, remembered so their last in-flight deltas are dropped.
RECENTLY_STOPPED = 4096


@dataclass
class StreamState:
    detok: IncrementalDetokenizer
    mm_info: dict[str, Any] | None = None  # sent with the first output, then cleared
    completion_tokens: int = 0
    busy_s: float = 0.0


@dataclass
class Emitted:
    """What a step of the streams produced: outputs for the gateway, and the requests a stop
    string finished (the scheduler must be told to free them)."""

    outputs: list[RequestOutput] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    def add(self, delta: TokenDelta, out: RequestOutput | None) -> None:
        if out is None:
            return
        self.outputs.append(out)
        if out.finish_reason is not None and delta.finish_reason is None:
            self.stopped.append(out.request_id)


class Streams:
    """Every open request stream of one detokenizer replica (no sockets: the actor sends).

    Deltas may overtake their StreamOpen (they come from the scheduler, it from another stage):
    they wait here until it arrives. An empty "abort" delta closes a stream with no output."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.open_streams: dict[str, StreamState] = {}
        self.early: dict[str, list[TokenDelta]] = {}  # deltas that came before their StreamOpen
        # aborted before their StreamOpen came: drop it (bounded: a stream opened on a replica
        # that died never comes, and its abort still arrives here)
        self.closed_early: OrderedDict[str, None] = OrderedDict()
        self.stopped: OrderedDict[str, None] = OrderedDict()

    def open(self, msg: StreamOpen) -> Emitted:
        rid = msg.request_id
        emitted = Emitted()
        if rid in self.closed_early:
            del self.closed_early[rid]
            return emitted
        self.stopped.pop(rid, None)
        sp = msg.sampling
        detok = IncrementalDetokenizer(
            self.tokenizer,
            msg.prompt_tail_ids,
            sp.skip_special_tokens,
            sp.stop,
            sp.include_stop_str_in_output,
        )
        self.open_streams[rid] = StreamState(detok, mm_info=msg.mm_info)
        for delta in self.early.pop(rid, []):
            emitted.add(delta, self._apply(delta))
        return emitted

    def feed(self, deltas: list[TokenDelta]) -> Emitted:
        emitted = Emitted()
        for delta in deltas:
            emitted.add(delta, self._apply(delta))
        return emitted

    def _apply(self, d: TokenDelta) -> RequestOutput | None:
        rid = d.request_id
        closing = d.finish_reason == "abort" and not d.token_ids
        st = self.open_streams.get(rid)
        if st is None:
            if rid in self.stopped:
                pass  # finished here by a stop string: late tokens are dropped
            elif closing:
                self.early.pop(rid, None)
                self.closed_early[rid] = None
                while len(self.closed_early) > RECENTLY_STOPPED:
                    self.closed_early.popitem(last=False)
            else:
                self.early.setdefault(rid, []).append(d)
            return None
        if closing:
            del self.open_streams[rid]
            return None
        t0 = time.perf_counter()
        st.completion_tokens += len(d.token_ids)
        text, matched = st.detok.push(d.token_ids)
        finish, stop_reason = d.finish_reason, d.stop_reason
        if matched is not None:
            finish, stop_reason = "stop", matched
        elif finish is not None:
            text += st.detok.flush()
        st.busy_s += time.perf_counter() - t0
        mm_info, st.mm_info = st.mm_info, None
        if finish is not None:
            del self.open_streams[rid]
            if d.finish_reason is None:
                self._remember_stopped(rid)
            metrics.stage_latency.labels("detokenizer").observe(st.busy_s)
        return RequestOutput(
            request_id=rid,
            text=text,
            token_ids=list(d.token_ids),
            logprobs=self._name_logprobs(d.logprobs),
            finish_reason=finish,
            stop_reason=stop_reason,
            prompt_tokens=d.prompt_tokens,
            completion_tokens=st.completion_tokens,
            cached_tokens=d.cached_tokens,
            mm_info=mm_info,
            **self._prompt_fields(d),
        )

    def _prompt_fields(self, d: TokenDelta) -> dict[str, Any]:
        """RequestOutput's prompt_logprobs (None first, as vLLM), prompt_token_ids and
        prompt_token_strs, from a delta that carries prompt logprobs; {} otherwise."""
        if d.prompt_logprobs is None or d.prompt_token_ids is None:
            return {}
        named = self._name_logprobs(d.prompt_logprobs) or []
        return {
            "prompt_logprobs": [None, *named],
            "prompt_token_ids": d.prompt_token_ids,
            "prompt_token_strs": [self._token_text(t) for t in d.prompt_token_ids],
        }

    def _remember_stopped(self, rid: str) -> None:
        self.stopped[rid] = None
        while len(self.stopped) > RECENTLY_STOPPED:
            self.stopped.popitem(last=False)

    def _name_logprobs(self, lps: list[PositionLogprobs] | None) -> list[PositionLogprobs] | None:
        if lps is None:
            return None
        for pos in lps:
            pos.sampled.token = self._token_text(pos.sampled.token_id)
            for t in pos.top:
                t.token = self._token_text(t.token_id)
        return lps

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class DetokenizerActor(Stage):
    async def setup(self) -> dict[str, Any]:
        a = self.addresses
        self.streams = Streams(TextTokenizer.load(self.config.tokenizer_path))
        self.inbox = self.transport.mailbox(a.detokenizers[self.index])
        self.to_gateway = self.transport.outbox(a.gateway)
        self.to_scheduler = self.transport.outbox(a.scheduler)
        return {}

    async def run(self) -> None:
        await self.serve(self.inbox, {StreamOpen: self.on_open, TokenBatch: self.on_tokens})

    async def on_open(self, msg: StreamOpen) -> None:
        await self._send(self.streams.open(msg))

    async def on_tokens(self, batch: TokenBatch) -> None:
        await self._send(self.streams.feed(batch.deltas))

    async def _send(self, emitted: Emitted) -> None:
        if emitted.outputs:
            await self.to_gateway.send(OutputBatch(emitted.outputs))
        for out in emitted.outputs:
            if out.finish_reason is not None:
                self.log.debug(
                    "request done",
                    request_id=out.request_id,
                    finish_reason=out.finish_reason,
                    completion_tokens=out.completion_tokens,
                )
        for rid in emitted.stopped:
            self.log.debug("stop string matched", request_id=rid)
            await self.to_scheduler.send(AbortRequest(rid, reason="stop"))
