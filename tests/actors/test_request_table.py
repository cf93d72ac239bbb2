"""The gateway's request table: which requests a lost stage takes with it, and deadlines."""

from __future__ import annotations

from actors.request_table import (
    ENGINE,
    GENERATE,
    IMAGES,
    TOKENIZE,
    TOKENIZER,
    Deadlines,
    Replicas,
    RequestTable,
    may_have_images,
)
from core.launch.addresses import owner


def table(tok: int = 2, img: int = 2, det: int = 2, **deadlines: float) -> RequestTable:
    return RequestTable(Replicas(tok, img, det), Deadlines(**deadlines))


def ids_owned(n: int, replicas: int, index: int, count: int = 3) -> list[str]:
    out: list[str] = []
    i = 0
    while len(out) < count:
        rid = f"r{i}"
        if owner(rid, replicas) == index:
            out.append(rid)
        i += 1
    return out


def test_a_lost_tokenizer_takes_only_the_requests_it_still_holds() -> None:
    t = table()
    mine = ids_owned(2, 2, 0, 4)
    for rid in mine:
        t.admit(rid, b"c", GENERATE, 0.0)
    t.moved(mine[0], ENGINE, 1.0)  # passed on: the scheduler has it
    t.admit("tk", b"c", TOKENIZE, 0.0)
    failed = {f.request_id for f in t.lost("tokenizer", 0)}
    expected = set(mine[1:]) | ({"tk"} if owner("tk", 2) == 0 else set())
    assert failed == expected
    assert mine[0] in t and all(rid not in t for rid in expected)
    f = t.lost("tokenizer", 0)
    assert f == []


def test_a_lost_image_replica_takes_image_requests_sent_to_it_or_held() -> None:
    t = table()
    a, b, c = ids_owned(2, 2, 1, 3)
    t.admit(a, b"c", GENERATE, 0.0, images=True)  # maybe on its way to the image stage
    t.admit(b, b"c", GENERATE, 0.0, images=True)
    t.moved(b, IMAGES, 1.0)
    t.admit(c, b"c", GENERATE, 0.0, images=False)  # text: never goes there
    failed = t.lost("images", 1)
    assert {f.request_id for f in failed} == {a, b}
    assert all(f.error.code == 503 and f.abort for f in failed)
    assert c in t


def test_a_lost_detokenizer_takes_every_stream_it_owns() -> None:
    t = table()
    mine = ids_owned(2, 2, 1, 2)
    other = ids_owned(2, 2, 0, 1)[0]
    for rid in [*mine, other]:
        t.admit(rid, b"c", GENERATE, 0.0)
        t.moved(rid, ENGINE, 1.0)
    assert {f.request_id for f in t.lost("detokenizer", 1)} == set(mine)
    assert other in t


def test_hops_only_move_forward() -> None:
    t = table()
    t.admit("r", b"c", GENERATE, 0.0, images=True)
    t.moved("r", ENGINE, 1.0)
    t.moved("r", IMAGES, 2.0)  # a late notice from the image stage
    assert t.entries["r"].hop == ENGINE
    t.moved("unknown", ENGINE, 1.0)  # already ended: ignored
    assert "unknown" not in t


def test_engine_down_fails_everything_without_aborts() -> None:
    t = table()
    for i in range(5):
        t.admit(f"r{i}", b"c", GENERATE, 0.0)
    failed = t.engine_down("executor0 exited with code -9", restarting=True)
    assert len(failed) == 5 and len(t) == 0
    assert all(f.error.code == 503 and not f.abort for f in failed)
    assert "executor0" in failed[0].error.message and "retry" in failed[0].error.message


def test_deadlines_per_hop_and_per_request() -> None:
    t = table(tokenizer_s=10, images_s=20, request_s=100)
    t.admit("stuck", b"c", GENERATE, 0.0)
    t.admit("fetching", b"c", GENERATE, 0.0, images=True)
    t.moved("fetching", IMAGES, 5.0)
    t.admit("long", b"c", GENERATE, 0.0)
    t.moved("long", ENGINE, 1.0)
    assert t.expired(9.0) == []
    assert [f.request_id for f in t.expired(11.0)] == ["stuck"]
    assert [f.request_id for f in t.expired(26.0)] == ["fetching"]
    assert t.expired(99.0) == []
    (late,) = t.expired(101.0)
    assert late.request_id == "long" and late.error.code == 504
    assert len(t) == 0


def test_no_request_deadline_when_zero() -> None:
    t = table(request_s=0)
    t.admit("r", b"c", GENERATE, 0.0)
    t.moved("r", ENGINE, 0.0)
    assert t.expired(1e9) == []
    assert t.entries["r"].hop == ENGINE and TOKENIZER != ENGINE


def test_may_have_images() -> None:
    assert not may_have_images(None)
    assert not may_have_images([{"role": "user", "content": "hi"}])
    assert not may_have_images([{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    assert may_have_images([{"role": "user", "content": [{"type": "image_url"}]}])
    assert may_have_images([{"role": "user", "content": ["odd"]}])


def test_a_silent_pinging_client_loses_its_requests() -> None:
    t = table(client_s=5.0)
    t.admit("a1", b"http", GENERATE, 0.0)
    t.admit("a2", b"http", GENERATE, 0.0)
    t.admit("b1", b"sdk", GENERATE, 0.0)
    t.admit("c1", b"quiet", GENERATE, 0.0)  # never pinged: no silence rule for it
    for now in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0):
        t.heard(b"http", now, ping=True) if now < 1.5 else None
        t.heard(b"sdk", now, ping=True)
        t.heard(b"quiet", now, ping=False)
        assert t.silent(now) == []
    t.heard(b"sdk", 6.0, ping=False)  # any record counts once enrolled
    failed = t.silent(6.5)
    assert sorted(f.request_id for f in failed) == ["a1", "a2"]
    assert all(f.abort and f.error.code == 503 for f in failed)
    assert "b1" in t and "c1" in t and "a1" not in t
    assert t.silent(7.0) == []  # forgotten: not failed twice


def test_a_stalled_gateway_judges_no_client() -> None:
    t = table(client_s=5.0)
    t.admit("a1", b"http", GENERATE, 0.0)
    t.heard(b"http", 0.0, ping=True)
    assert t.silent(0.5) == []
    assert t.silent(9.0) == []  # the check itself came 8.5 s late: the pings wait unread
    assert t.silent(9.5) == [] and "a1" in t
    for half in range(20, 29):  # checks every 0.5 s again: silent since 9.0 (the refresh)
        assert t.silent(half / 2) == []
    assert [f.request_id for f in t.silent(14.5)] == ["a1"]
