"""The gateway's table of requests in flight: which client asked, which stage holds each request
now, and its deadlines. Pure (no sockets): actors/gateway.py feeds it and sends what it returns.

Role in the request path: a request enters at admission, held by its tokenizer replica; the next
stage says when it takes it in (`RequestMoved`): its image replica ("images"), then the scheduler
("engine"). It leaves with its final output. When a stage dies, `lost` names the requests it held,
and those it may have been sent but not yet acknowledged (failing a request too many is a retry;
one too few would hang); `expired` names those past a hop's deadline or the request deadline.
A client that pings (protocols/client.py pings twice a second) and then falls silent for
`client_s` is gone (its process died: the HTTP stage, or an SDK program): `silent` names its
requests, so the engine stops generating for nobody.
Replicas are picked by `owner(request_id, n)`, so the table keeps no replica number.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from core.launch.addresses import owner
from protocols.messages import ErrorInfo

TOKENIZER, IMAGES, ENGINE = "tokenizer", "images", "engine"
HOPS = (TOKENIZER, IMAGES, ENGINE)  # in path order: a request only moves forward
GENERATE, TOKENIZE = "generate", "tokenize"
RETRY = "ServiceUnavailableError"


@dataclass
class Replicas:
    tokenizers: int
    images: int
    detokenizers: int


@dataclass
class Deadlines:
    """Seconds a request may stay at a hop, and in the engine in all (0: no limit). The hop
    limits are far above a healthy stage's time: they catch a record lost on the way."""

    tokenizer_s: float = 60.0
    images_s: float = 120.0  # several fetches of 5 s connect + 15 s read each, redirects
    request_s: float = 0.0
    client_s: float = 5.0  # a pinging client silent this long is gone (ten missed pings)


@dataclass
class Entry:
    client: bytes
    kind: str  # GENERATE or TOKENIZE
    hop: str
    hop_since: float
    admitted: float
    images: bool = False  # may have images (goes through an image replica)


@dataclass
class Failed:
    """A request the table gave up: tell its client `error`; `abort` it along its path."""

    request_id: str
    entry: Entry
    error: ErrorInfo
    abort: bool = True


class RequestTable:
    def __init__(self, replicas: Replicas, deadlines: Deadlines) -> None:
        self.replicas = replicas
        self.deadlines = deadlines
        self.entries: dict[str, Entry] = {}
        self.pinging: dict[bytes, float] = {}  # client -> when it was last heard
        self.last_check: float | None = None  # when `silent` last ran

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def admit(
        self, request_id: str, client: bytes, kind: str, now: float, images: bool = False
    ) -> None:
        self.entries[request_id] = Entry(client, kind, TOKENIZER, now, now, images)

    def heard(self, client: bytes, now: float, ping: bool) -> None:
        """Anything came from `client`; a ping enrolls it in the silence rule."""
        if ping or client in self.pinging:
            self.pinging[client] = now

    def silent(self, now: float) -> list[Failed]:
        """The requests of clients that pinged and then stopped for `client_s` (their process
        is gone), removed from the table; the clients are forgotten. After a long gap since the
        last check the gateway itself was stalled (its pings queued unread): nobody is judged."""
        limit = self.deadlines.client_s
        stalled = self.last_check is not None and now - self.last_check > limit / 2
        self.last_check = now
        if stalled:
            self.pinging = dict.fromkeys(self.pinging, now)
            return []
        gone = {c for c, heard in self.pinging.items() if limit and now - heard > limit}
        if not gone:
            return []
        for client in gone:
            del self.pinging[client]
        held = [rid for rid, e in self.entries.items() if e.client in gone]
        error = ErrorInfo(f"the client stopped pinging for {limit:g} s", RETRY, None, 503)
        return [Failed(rid, self.entries.pop(rid), error) for rid in held]

    def moved(self, request_id: str, hop: str, now: float) -> None:
        entry = self.entries.get(request_id)
        if entry is not None and hop in HOPS and HOPS.index(hop) > HOPS.index(entry.hop):
            entry.hop, entry.hop_since = hop, now

    def client(self, request_id: str) -> bytes | None:
        entry = self.entries.get(request_id)
        return None if entry is None else entry.client

    def finish(self, request_id: str) -> Entry | None:
        """Forget a request (its last output or error went out, or its client aborted it)."""
        return self.entries.pop(request_id, None)

    def lost(self, stage: str, index: int) -> list[Failed]:
        """The requests replica `index` of `stage` (tokenizer, images, detokenizer) held when it
        died, removed from the table."""
        held = [rid for rid, e in self.entries.items() if self._holds(stage, index, rid, e)]
        error = ErrorInfo(
            f"the {stage} stage stopped while it held this request; it is being restarted: retry",
            RETRY,
            None,
            503,
        )
        return [Failed(rid, self.entries.pop(rid), error) for rid in held]

    def _holds(self, stage: str, index: int, rid: str, e: Entry) -> bool:
        """Whether replica `index` of `stage` held (or may have been sent) request `rid`: an
        image replica may hold what its tokenizer sent on before the image stage said so, and
        a detokenizer holds a stream from the moment it is opened, before the scheduler says."""
        r = self.replicas
        if stage == "tokenizer":
            return e.hop == TOKENIZER and owner(rid, r.tokenizers) == index
        if stage == "images":
            return e.images and e.hop in (TOKENIZER, IMAGES) and owner(rid, r.images) == index
        if stage == "detokenizer":
            return e.kind == GENERATE and owner(rid, r.detokenizers) == index
        return False

    def engine_down(self, why: str, restarting: bool) -> list[Failed]:
        """Every request in flight: the engine stage that held it is gone (no abort: the
        engine restarts empty or stops)."""
        then = "it is restarting: retry shortly" if restarting else "the server is stopping"
        error = ErrorInfo(f"the engine stopped ({why}); {then}", RETRY, None, 503)
        failed = [Failed(rid, e, error, abort=False) for rid, e in self.entries.items()]
        self.entries.clear()
        return failed

    def expired(self, now: float) -> list[Failed]:
        """Requests past a hop's deadline (a record lost between stages: 503) or past the whole
        request deadline (504), removed from the table."""
        failed = list(self._overdue(now))
        for f in failed:
            del self.entries[f.request_id]
        return failed

    def _overdue(self, now: float) -> Iterator[Failed]:
        d = self.deadlines
        hop_limits = {TOKENIZER: d.tokenizer_s, IMAGES: d.images_s}
        for rid, e in self.entries.items():
            limit = hop_limits.get(e.hop, 0.0)
            if limit and now - e.hop_since > limit:
                message = f"the {e.hop} stage did not pass the request on within {limit:g} s: retry"
                yield Failed(rid, e, ErrorInfo(message, RETRY, None, 503))
            elif d.request_s and now - e.admitted > d.request_s:
                message = f"the request took longer than --request-timeout ({d.request_s:g} s)"
                yield Failed(rid, e, ErrorInfo(message, "TimeoutError", None, 504))


def may_have_images(messages: list[dict[str, Any]] | None) -> bool:
    """Whether chat messages may carry an image: any content part that is not text (a wrong
    yes costs a needless retry when an image replica dies; a wrong no, a wait for a deadline)."""
    for message in messages or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    return True
    return False
