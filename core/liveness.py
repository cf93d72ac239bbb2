"""Which actors the supervisor has lost, and whether it may restart the engine again: the pure
decisions behind `Supervisor.watch` (core/supervisor.py), tested without processes.

An actor is lost when its process exited, or when it has not sent a heartbeat for
`heartbeat_timeout_s` (frozen: SIGSTOP, a deadlock, a machine so loaded it cannot run).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Lost:
    """One lost actor: its name, why, and whether its process is still there (frozen)."""

    name: str
    why: str
    frozen: bool = False


def lost_actors(
    exit_codes: dict[str, int | None],
    last_beat: dict[str, float],
    now: float,
    heartbeat_timeout_s: float,
) -> list[Lost]:
    """The actors among `exit_codes` (name -> exit code, None while running) that are lost."""
    out = []
    for name, code in exit_codes.items():
        if code is not None:
            out.append(Lost(name, f"exited with code {code}"))
        elif now - last_beat.get(name, now) > heartbeat_timeout_s:
            silent = now - last_beat[name]
            out.append(Lost(name, f"sent no heartbeat for {silent:.1f} s", frozen=True))
    return out


@dataclass
class RestartBudget:
    """At most `limit` restarts within any `window_s` seconds: a stage that dies at once every
    time it starts (a broken checkpoint, a full disk) stops the engine instead of looping."""

    limit: int = 5
    window_s: float = 600.0
    times: deque[float] = field(default_factory=deque)

    def allow(self, now: float) -> bool:
        """True (and the restart counted) when another restart fits the budget."""
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True
