"""Executor time per step and executor idle time between steps, from the executor's own stamps.

The scheduler feeds it each StepResult; the stats line shows forward_ms and gap_ms from it.
"""

from __future__ import annotations

from protocols.messages import StepResult


class StepTimes:
    """Per-step forward time and the gap since the previous forward ended (not across idling)."""

    def __init__(self) -> None:
        self.forward_s: list[float] = []
        self.gap_s: list[float] = []
        self._last_end: float | None = None

    def add(self, result: StepResult) -> float | None:
        """Record one result; returns its gap in seconds when it has one."""
        self.forward_s.append(result.elapsed_s)
        if result.started_s <= 0:
            self._last_end = None
            return None
        gap = None
        if self._last_end is not None:
            gap = max(0.0, result.started_s - self._last_end)
            self.gap_s.append(gap)
        self._last_end = result.started_s + result.elapsed_s
        return gap

    def idle(self) -> None:
        """The engine ran out of work: the next step's wait is not scheduling overhead."""
        self._last_end = None

    def summary(self) -> dict[str, float]:
        """Steps, mean forward_ms and mean gap_ms since the last summary."""
        fwd, gaps = self.forward_s, self.gap_s
        self.forward_s, self.gap_s = [], []
        if not fwd:
            return {}
        out = {"steps": len(fwd), "forward_ms": round(1000 * sum(fwd) / len(fwd), 2)}
        if gaps:
            out["gap_ms"] = round(1000 * sum(gaps) / len(gaps), 2)
        return out
