"""The client's view of the gateway link: down after an unanswered ping, up when heard."""

from __future__ import annotations

from protocols.link_watch import LinkWatch


def test_down_after_an_unanswered_ping_and_up_again_when_heard() -> None:
    w = LinkWatch(interval_s=0.5, timeout_s=2.0)
    assert w.ping_due(0.0)
    w.pinged(0.0)
    assert not w.ping_due(0.2)
    w.heard(0.1)
    w.pinged(0.5)
    w.pinged(1.0)  # unanswered since 0.5
    assert not w.lapsed(2.4)
    assert w.lapsed(2.6) and w.down
    assert not w.lapsed(3.0)  # reported once
    assert w.heard(3.1) and not w.down
    assert not w.heard(3.2)


def test_never_down_without_a_ping() -> None:
    w = LinkWatch(timeout_s=1.0)
    assert not w.lapsed(100.0)


def test_an_answer_from_another_gateway_instance_is_a_replacement() -> None:
    w = LinkWatch()
    assert not w.answered_by("a")  # the first one heard
    assert not w.answered_by("a")
    assert w.answered_by("b")  # restarted: what "a" held is lost
    assert not w.answered_by("b")
