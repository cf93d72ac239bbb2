"""The stats line's forward_ms and gap_ms, from the executor's own step stamps."""

from __future__ import annotations

from actors.scheduling.step_times import StepTimes
from protocols.messages import StepResult


def step(started: float, elapsed: float) -> StepResult:
    return StepResult(0, [], elapsed_s=elapsed, started_s=started)


def test_gap_is_executor_idle_time_between_forwards_while_busy() -> None:
    t = StepTimes()
    assert t.add(step(10.0, 0.010)) is None  # no previous forward
    gap = t.add(step(10.012, 0.010))
    assert gap is not None and abs(gap - 0.002) < 1e-9
    t.idle()  # out of work: the wait for the next request is no gap
    assert t.add(step(50.0, 0.020)) is None
    summary = t.summary()
    assert summary["steps"] == 3 and summary["forward_ms"] == 13.33 and summary["gap_ms"] == 2.0
    assert t.summary() == {}


def test_results_without_stamps_give_forward_time_only() -> None:
    t = StepTimes()
    t.add(step(0.0, 0.004))
    t.add(step(0.0, 0.006))
    assert t.summary() == {"steps": 2, "forward_ms": 5.0}
