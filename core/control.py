"""Kernel control records: heartbeats, readiness, and the supervisor's notices of lost stages.

These are the only records declared outside `protocols/messages.py`, because the kernel may not
import `protocols/`; they carry nothing about requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.codec import Record, wire


@wire("heartbeat")
@dataclass
class Heartbeat(Record):
    actor: str
    pid: int


@wire("actor_ready")
@dataclass
class ActorReady(Record):
    actor: str
    pid: int
    info: dict = field(default_factory=dict)


@wire("actor_failed")
@dataclass
class ActorFailed(Record):
    actor: str
    error: str


@wire("actor_lost")
@dataclass
class ActorLost(Record):
    """The supervisor's notice that an actor died or froze and is being replaced: whatever it
    held for requests is gone (sent to the watchers, i.e. the gateway)."""

    actor: str
    why: str


@wire("engine_down")
@dataclass
class EngineDown(Record):
    """The supervisor's notice that an engine stage (executor, scheduler, gateway) was lost:
    every request in flight is gone; the engine restarts (`restarting`) or stops."""

    why: str
    restarting: bool = True
