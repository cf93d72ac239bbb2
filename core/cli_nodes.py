"""The multi-host flags (`--nnodes`, `--node-rank`, `--master-addr`, `--master-port`) and the
settings they imply, read by core/cli.py. Their defaults come from the environment that
torchrun-style launchers and Kubernetes set, so one command line serves every host.
"""

from __future__ import annotations

import argparse
import os

from core.config import EngineConfig


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                raise SystemExit(f"environment variable {name}={value!r} is not a number") from None
    return default


def add_node_flags(p: argparse.ArgumentParser, d: EngineConfig) -> None:
    p.add_argument(
        "--nnodes",
        type=int,
        default=_env_int("NNODES", "WORLD_SIZE", default=d.nnodes),
        help="hosts forming one engine, one launcher each, the tensor-parallel ranks split "
        "evenly among them (default: $NNODES, else $WORLD_SIZE, else 1)",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=_env_int("NODE_RANK", "RANK", default=d.node_rank),
        help="this host's place among them; 0 is the leader, which runs the HTTP server and "
        "every stage but the other hosts' executors (default: $NODE_RANK, else $RANK, else 0)",
    )
    p.add_argument(
        "--master-addr",
        default=os.environ.get("MASTER_ADDR") or d.master_addr,
        help="the leader's address, reachable from every host (default: $MASTER_ADDR)",
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=_env_int("MASTER_PORT", default=d.master_port),
        help="the leader's torch.distributed rendezvous port; with --nnodes > 1 the stage "
        "sockets take the ports after it unless --tcp-base-port says (default: $MASTER_PORT)",
    )


def apply_node_settings(cfg: EngineConfig, parser: argparse.ArgumentParser) -> None:
    """Checks the flags together; more than one host puts every stage socket on tcp:// at the
    leader's address (ports from --tcp-base-port, else after --master-port)."""
    if cfg.nnodes < 1:
        parser.error("--nnodes must be at least 1")
    if not 0 <= cfg.node_rank < cfg.nnodes:
        parser.error(f"--node-rank must be in 0..{cfg.nnodes - 1} (--nnodes {cfg.nnodes})")
    if not 0 < cfg.master_port < 65536:
        parser.error("--master-port must be a TCP port (1-65535)")
    if not cfg.multi_node:
        return
    if cfg.tensor_parallel_size % cfg.nnodes:
        parser.error(
            f"--tensor-parallel-size {cfg.tensor_parallel_size} does not split evenly over "
            f"--nnodes {cfg.nnodes}: every host runs the same number of ranks"
        )
    cfg.transport = "tcp"
    cfg.tcp_host = cfg.master_addr
    if not cfg.tcp_base_port:
        cfg.tcp_base_port = cfg.master_port + 1
