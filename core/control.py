"""Kernel control records: the supervisor's heartbeat, readiness and stop messages.

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
