"""The CPU thread governor: narrows the pool to the cores other tasks leave free, widens it when
they go, and decides only from a full window of samples (no flapping on one busy instant)."""

from __future__ import annotations

from devices.cpu_threads import ThreadGovernor, threads_for


def test_threads_for_leaves_cores_to_competing_tasks() -> None:
    assert threads_for(2, 0) == 2
    assert threads_for(2, 0.4) == 2
    assert threads_for(2, 1) == 1
    assert threads_for(2, 3) == 1  # never below one thread
    assert threads_for(8, 3) == 5


def test_governor_narrows_under_load_and_widens_when_idle() -> None:
    readings = iter([5] * 4 + [1] * 4)  # 3 busy others beside our 2 threads, then ours alone
    gov = ThreadGovernor(cores=2, window=4, interval_s=0.0, read=lambda: next(readings))
    decisions = [gov.sample(own_threads_busy=2) for _ in range(4)]
    assert decisions == [None, None, None, 1]
    decisions = [gov.sample(own_threads_busy=1) for _ in range(4)]
    assert decisions[-1] == 2 and gov.threads == 2


def test_governor_without_proc_changes_nothing() -> None:
    gov = ThreadGovernor(cores=2, window=1, interval_s=0.0, read=lambda: None)
    assert gov.sample(own_threads_busy=2) is None and gov.threads == 2
