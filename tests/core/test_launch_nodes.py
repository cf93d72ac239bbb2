"""Multi-host launch rules without processes: the flags and their environment defaults
(core/cli_nodes.py), which actors each host runs (core/launch/topology.py), the address table
every host derives alike (core/launch/addresses.py), and the leader link's loss signal on a real
socket (core/supervisor.py LeaderLink)."""

from __future__ import annotations

import time

import pytest
import zmq

from core.cli import parse_args
from core.config import EngineConfig
from core.launch.addresses import make_addresses
from core.launch.topology import topology
from core.supervisor import LeaderLink
from core.transport import bind_address


def test_one_host_by_default_keeps_ipc(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NNODES", "WORLD_SIZE", "NODE_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    cfg = parse_args(["--model", "m"])
    assert (cfg.nnodes, cfg.node_rank, cfg.transport) == (1, 0, "ipc")
    assert list(cfg.local_ranks) == [0] and cfg.bind_host is None


def test_flags_default_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "30000")
    cfg = parse_args(["--model", "m", "-tp", "4"])
    assert (cfg.nnodes, cfg.node_rank, cfg.master_addr, cfg.master_port) == (
        2,
        1,
        "10.0.0.7",
        30000,
    )
    # every stage socket goes to tcp:// at the leader, on the ports after the rendezvous
    assert (cfg.transport, cfg.tcp_host, cfg.tcp_base_port) == ("tcp", "10.0.0.7", 30001)
    assert list(cfg.local_ranks) == [2, 3] and cfg.bind_host == "0.0.0.0"


def test_torchrun_names_are_read_too(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NNODES", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = parse_args(["--model", "m", "-tp", "2"])
    assert (cfg.nnodes, cfg.node_rank) == (2, 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nnodes", "2", "-tp", "3"], "does not split evenly over --nnodes 2"),
        (["--nnodes", "2", "--node-rank", "2", "-tp", "2"], "--node-rank must be in 0..1"),
        (["--nnodes", "0"], "--nnodes must be at least 1"),
        (["--master-port", "70000"], "--master-port must be a TCP port"),
    ],
)
def test_bad_node_flags_are_refused(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", *args])
    assert message in capsys.readouterr().err


def _cfg(node_rank: int) -> EngineConfig:
    return EngineConfig(model="m", tensor_parallel_size=4, nnodes=2, node_rank=node_rank)


def test_the_leader_waits_for_remote_ranks_and_workers_run_only_theirs() -> None:
    leader = [spec for group in topology(_cfg(0)) for spec in group.specs]
    executors = {s.name: s.remote for s in leader if s.name.startswith("executor")}
    assert executors == {
        "executor0": False,
        "executor1": False,
        "executor2": True,
        "executor3": True,
    }
    assert {"scheduler", "gateway", "http", "tokenizer0"} <= {s.name for s in leader}
    worker = topology(_cfg(1))
    assert [[(s.name, s.remote) for s in g.specs] for g in worker] == [
        [("executor2", False), ("executor3", False)]
    ]


def test_every_host_derives_the_same_addresses(tmp_path) -> None:
    """Fixed ports: the leader and a worker, each with its own run folder, agree on every socket;
    image replicas bind a pixel socket per rank, so executors only ever connect."""
    a, control_a = make_addresses("tcp", str(tmp_path / "a"), 4, 1, 2, 1, "10.0.0.7", 30001)
    b, control_b = make_addresses("tcp", str(tmp_path / "b"), 4, 1, 2, 1, "10.0.0.7", 30001)
    assert a == b and control_a == control_b
    assert [len(row) for row in a.media] == [4, 4]
    assert bind_address(a.plans[3], "0.0.0.0") == "tcp://0.0.0.0:" + a.plans[3].rsplit(":", 1)[1]
    assert bind_address("ipc:///x/y.sock", "0.0.0.0") == "ipc:///x/y.sock"


def _wait(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_leader_link_relays_and_tells_when_the_leader_goes() -> None:
    ctx = zmq.Context()
    leader = ctx.socket(zmq.PULL)
    port = leader.bind_to_random_port("tcp://127.0.0.1")
    cfg = EngineConfig(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.5)
    link = LeaderLink(ctx, f"tcp://127.0.0.1:{port}", cfg)
    try:
        link.relay([b"beat"])
        assert leader.poll(5000) and leader.recv_multipart() == [b"beat"]
        assert not link.gone()  # reached, still there
        leader.close(linger=0)
        assert _wait(link.gone)
    finally:
        link.close()
        ctx.term()


def test_a_leader_not_yet_up_is_not_gone() -> None:
    ctx = zmq.Context()
    probe = ctx.socket(zmq.PULL)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)  # nothing listens there: the link keeps retrying
    link = LeaderLink(ctx, f"tcp://127.0.0.1:{port}", EngineConfig())
    try:
        time.sleep(0.5)
        assert not link.gone()
    finally:
        link.close()
        ctx.term()
