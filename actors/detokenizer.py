"""Detokenizer stage: turns new token ids into text deltas, applies stop strings, names logprobs.

Each request is owned by one replica (the scheduler routes by request id), so its incremental
state lives here; a matched stop string finishes the request and tells the scheduler to free it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from actors import metrics
from core.actor import Actor
from models.detokenizer import IncrementalDetokenizer
from models.tokenizer import TextTokenizer
from protocols.messages import (
    AbortRequest,
    OutputBatch,
    PositionLogprobs,
    RequestOutput,
    TokenBatch,
    TokenDelta,
)


@dataclass
class StreamState:
    detok: IncrementalDetokenizer
    completion_tokens: int = 0
    busy_s: float = 0.0


class DetokenizerActor(Actor):
    async def setup(self) -> dict[str, Any]:
        self.tokenizer = TextTokenizer.load(self.config.model)
        a = self.addresses
        self.inbox = self.transport.mailbox(a.detokenizers[self.index], bind=False)
        self.to_gateway = self.transport.outbox(a.gateway)
        self.to_scheduler = self.transport.outbox(a.scheduler)
        self.streams: dict[str, StreamState] = {}
        return {}

    async def run(self) -> None:
        await self.serve(self.inbox, {TokenBatch: self.on_tokens})

    async def on_tokens(self, batch: TokenBatch) -> None:
        outputs, stopped = [], []
        for delta in batch.deltas:
            out = self._apply(delta)
            if out is None:
                continue
            outputs.append(out)
            if out.finish_reason is not None and delta.finish_reason is None:
                stopped.append(out.request_id)  # a stop string: the scheduler must free it
        if outputs:
            await self.to_gateway.send(OutputBatch(outputs))
        for rid in stopped:
            await self.to_scheduler.send(AbortRequest(rid, reason="stop"))

    def _apply(self, d: TokenDelta) -> RequestOutput | None:
        t0 = time.perf_counter()
        st = self.streams.get(d.request_id)
        if st is None:
            if d.sampling is None:
                return None  # finished here by a stop string; late tokens are dropped
            sp = d.sampling
            st = StreamState(
                IncrementalDetokenizer(
                    self.tokenizer,
                    None,
                    sp.skip_special_tokens,
                    sp.stop,
                    sp.include_stop_str_in_output,
                )
            )
            self.streams[d.request_id] = st
        st.completion_tokens += len(d.token_ids)
        text, matched = st.detok.push(d.token_ids)
        finish, stop_reason = d.finish_reason, d.stop_reason
        if matched is not None:
            finish, stop_reason = "stop", matched
        elif finish is not None:
            text += st.detok.flush()
        st.busy_s += time.perf_counter() - t0
        if finish is not None:
            del self.streams[d.request_id]
            metrics.stage_latency.labels("detokenizer").observe(st.busy_s)
            self.log.debug(
                "request done",
                request_id=d.request_id,
                finish_reason=finish,
                completion_tokens=st.completion_tokens,
            )
        return RequestOutput(
            request_id=d.request_id,
            text=text,
            token_ids=list(d.token_ids),
            logprobs=self._name_logprobs(d.logprobs),
            finish_reason=finish,
            stop_reason=stop_reason,
            prompt_tokens=d.prompt_tokens,
            completion_tokens=st.completion_tokens,
            cached_tokens=d.cached_tokens,
            mm_info=d.mm_info,
        )

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
