"""The supervisor's pure decisions: which actors are lost, and the restart budget."""

from __future__ import annotations

from core.liveness import RestartBudget, lost_actors


def test_exited_and_silent_actors_are_lost() -> None:
    codes = {"a": None, "b": -9, "c": None}
    beats = {"a": 9.5, "b": 9.5, "c": 5.0}
    lost = {x.name: x for x in lost_actors(codes, beats, now=10.0, heartbeat_timeout_s=3.0)}
    assert set(lost) == {"b", "c"}
    assert lost["b"].why == "exited with code -9" and not lost["b"].frozen
    assert lost["c"].frozen and "5.0 s" in lost["c"].why


def test_restart_budget_over_a_window() -> None:
    budget = RestartBudget(limit=2, window_s=10.0)
    assert budget.allow(0.0) and budget.allow(1.0)
    assert not budget.allow(2.0)
    assert budget.allow(11.5)  # the first one left the window
