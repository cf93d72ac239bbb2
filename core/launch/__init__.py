"""`python -m core.launch`: parse flags, start the engine's actors, serve until SIGINT/SIGTERM.

The engine's wiring lives in this package only: the stage table (`topology`), the addresses
(`addresses`) and the default model (`default_model`); the kernel below it stays generic.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from core.cli import parse_args
from core.config import EngineConfig
from core.launch.addresses import make_addresses
from core.launch.default_model import resolve_model
from core.launch.preflight import (
    check_max_model_len,
    check_model_files,
    check_named_files,
    check_port,
)
from core.launch.topology import topology
from core.supervisor import EngineFailed, Supervisor, prepare_run_dir

# glibc malloc settings every stage inherits (a user's own values win). By default, blocks over
# 128 KiB-32 MiB are mmap'ed and returned on free, so each step's fresh activations page-fault
# again: with these the vision tower ran 0.23 -> 0.17 s per 640x640 image (BENCHMARKS.md). The
# price is that freed heap memory (up to 1 GiB) stays with the process for reuse. hugetlb=1
# asks for transparent huge pages where the kernel leaves them to madvise: the weights a decode
# step streams then need ~500x fewer TLB entries (c1 decode step ~4% faster, BENCHMARKS.md).
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


def run(config: EngineConfig) -> int:
    resolve_model(config)
    check_model_files(config)
    check_max_model_len(config)
    check_named_files(config)
    if config.node_rank == 0:  # the other hosts serve no HTTP
        check_port(config)
    for name, value in MALLOC_ENV.items():
        os.environ.setdefault(name, value)
    owns_run_dir = prepare_run_dir(config)
    wiring, control = make_addresses(
        config.transport,
        config.run_dir,
        tp_size=config.tensor_parallel_size,
        tokenizers=config.tokenizer_workers,
        image_workers=config.image_workers,
        detokenizers=config.detokenizer_workers,
        tcp_host=config.tcp_host,
        tcp_base_port=config.tcp_base_port,
    )
    if config.node_rank > 0:
        return _run_worker(config, wiring.to_dict(), control, owns_run_dir)
    sup = Supervisor(
        config,
        topology(config),
        wiring.to_dict(),
        control,
        notify_ready=[wiring.gateway],
        owns_run_dir=owns_run_dir,
    )
    for flag in config.no_effect_flags:
        sup.log.info("vLLM flag accepted; it has no effect here", flag=flag)
    front_file = os.path.join(config.run_dir, "front")  # where SDK clients find the front door

    def announce() -> None:
        with open(front_file, "w") as f:
            f.write(wiring.front)
        scheme = "https" if config.uses_tls else "http"
        where = f"{scheme}://{config.host}:{config.port}/v1"
        where = where if config.http else "(no HTTP)"
        sup.log.info("engine ready", model=config.model_names[0], api=where, zmq=wiring.front)
        print(f"Tessera ready: {where}  zmq={wiring.front}", flush=True)

    try:
        return _supervise(sup, announce)
    finally:
        if os.path.exists(front_file):
            os.unlink(front_file)


def _run_worker(
    config: EngineConfig, wiring: dict[str, object], leader_control: str, owns_run_dir: bool
) -> int:
    """A host other than the leader: runs its executors only, relaying their heartbeats to the
    leader's supervisor, until a signal, a lost executor, or the leader going away."""
    control = f"ipc://{config.run_dir}/control.sock"
    sup = Supervisor(
        config,
        topology(config),
        dict(wiring),
        control,
        notify_ready=[],
        owns_run_dir=owns_run_dir,
        leader_control=leader_control,
    )
    ranks = list(config.local_ranks)

    def announce() -> None:
        sup.log.info("worker ready", node=config.node_rank, ranks=ranks, leader=leader_control)
        print(f"Tessera worker ready: node {config.node_rank}, ranks {ranks}", flush=True)

    return _supervise(sup, announce)


def _supervise(sup: Supervisor, announce: Callable[[], None]) -> int:
    """Starts every stage, announces it, and watches them until a signal or a loss; returns the
    exit code. The stages are stopped whatever happens."""
    _handle_signals(sup)
    try:
        sup.start()
        announce()
        return sup.watch()
    except EngineFailed as exc:
        sup.log.error("engine failed", error=str(exc))
        return 1
    finally:
        sup.shutdown()


def _handle_signals(sup: Supervisor) -> None:
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGHUP, sup.request_stop)  # a closed terminal stops cleanly too


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(parse_args(argv)))
