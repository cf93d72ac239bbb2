"""Whether an engine client can still hear the gateway: the pure state behind the ping loop of
`AsyncEngineClient` (protocols/client.py), tested without sockets.

The client pings the gateway (a HealthRequest) every `interval_s`; anything heard back counts.
When a ping has gone unanswered for `timeout_s` (the gateway died, froze, or is being restarted
with the engine), the link is down: the client ends every request in flight with a 503 and
refuses new ones at once, until the gateway is heard again. A ping answered by another gateway
instance than before (the engine restarted faster than `timeout_s`) means the same for the
requests sent to the old one: they are lost with it.
"""

from __future__ import annotations

from dataclasses import dataclass

PING_INTERVAL_S = 0.5
LINK_TIMEOUT_S = 2.5


@dataclass
class LinkWatch:
    interval_s: float = PING_INTERVAL_S
    timeout_s: float = LINK_TIMEOUT_S
    last_heard: float | None = None
    last_ping: float | None = None
    unanswered_since: float | None = None  # the oldest ping nothing was heard after
    down: bool = False
    gateway: str | None = None  # the instance id the last ping answer came from

    def heard(self, now: float) -> bool:
        """Something came from the gateway; True when this brings the link back up."""
        self.last_heard = now
        self.unanswered_since = None
        was_down, self.down = self.down, False
        return was_down

    def answered_by(self, instance: str) -> bool:
        """A ping answer from gateway `instance`; True when it replaced the one heard before."""
        replaced = self.gateway is not None and instance != self.gateway
        self.gateway = instance
        return replaced

    def ping_due(self, now: float) -> bool:
        return self.last_ping is None or now - self.last_ping >= self.interval_s

    def pinged(self, now: float) -> None:
        self.last_ping = now
        if self.unanswered_since is None:
            self.unanswered_since = now

    def lapsed(self, now: float) -> bool:
        """True once, when a ping has gone unanswered for `timeout_s`: the link is now down."""
        if self.down or self.unanswered_since is None:
            return False
        if now - self.unanswered_since < self.timeout_s:
            return False
        self.down = True
        return True
