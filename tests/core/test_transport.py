"""Real ZMQ sockets over ipc:// and tcp://: records cross processes' sockets intact."""

from __future__ import annotations

import anyio
import pytest

from core.launch.addresses import Addresses, make_addresses, owner
from core.transport import Transport
from protocols.messages import AbortRequest, GenerateRequest


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_push_pull_delivers_records_in_order(kind: str, tmp_path) -> None:
    addr = make_addresses(kind, str(tmp_path), 1, 1, 1, 1)[0].scheduler

    async def main() -> list:
        t = Transport()
        try:
            inbox = t.mailbox(addr)
            out = t.outbox(addr)
            for i in range(5):
                await out.send(AbortRequest(f"r{i}"))
            await out.send(GenerateRequest("g"))
            with anyio.fail_after(5):
                return [await inbox.recv() for _ in range(6)]
        finally:
            t.close()

    got = anyio.run(main)
    assert [r.request_id for r in got] == ["r0", "r1", "r2", "r3", "r4", "g"]
    assert isinstance(got[-1], GenerateRequest)


def test_ipc_addresses_live_in_the_run_dir(tmp_path) -> None:
    a, control = make_addresses("ipc", str(tmp_path), 2, 4, 1, 3)
    assert len(a.plans) == 2 and len(a.detokenizers) == 3
    assert len(a.tokenizers) == 4 and len(a.images) == 1 and len(a.media) == 1
    assert len(a.media[0]) == 2  # one pixel socket per image replica and rank
    media = [m for row in a.media for m in row]
    every = [a.front, control, *a.plans, *media, *a.detokenizers, *a.tokenizers]
    assert all(x.startswith(f"ipc://{tmp_path}/") for x in every)
    assert len(set(every)) == len(every)
    assert Addresses.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError):
        make_addresses("udp", str(tmp_path), 1, 1, 1, 1)


def test_owner_is_stable_and_spreads_requests() -> None:
    picks = [owner(f"req-{i}", 4) for i in range(400)]
    assert picks == [owner(f"req-{i}", 4) for i in range(400)]  # same in every process
    assert set(picks) == {0, 1, 2, 3}
    assert all(owner(f"req-{i}", 1) == 0 for i in range(10))
