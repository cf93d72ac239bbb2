"""The engine's wiring: one ZMQ address per stage mailbox, derived once by the launch code.

ipc:// sockets live in a private 0700 run folder; tcp:// is for stages on other hosts. Every
launcher of a multi-host engine derives the same table from the same flags (fixed ports from
--tcp-base-port); only the leader's stages bind, the other hosts' executors connect. A request
keeps to one replica of every replicated stage (`owner`), so its abort follows the same sockets
as the request itself and can never overtake it.
"""

from __future__ import annotations

import socket
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any


def owner(request_id: str, replicas: int) -> int:
    """The replica of a stage that handles `request_id` (the same in every process)."""
    return zlib.crc32(request_id.encode()) % replicas


@dataclass
class Addresses:
    front: str  # gateway ROUTER: SDK clients and the HTTP adapter connect here
    gateway: str  # gateway PULL: outputs and errors on their way back to clients
    tokenizers: list[str]  # tokenizer PULL, one per replica; the gateway picks by request id
    images: list[str]  # image preprocessor PULL, one per replica; tokenizers pick by request id
    scheduler: str  # scheduler PULL: engine requests, aborts
    results: str  # scheduler PULL: step results from executor rank 0
    plans: list[str]  # scheduler PUSH (bound), one per tensor-parallel rank
    # image pixels: media[i][r] is image replica i's PUSH (bound) to rank r; rank r's executor
    # connects to column r, so a rank on another host needs no address of its own
    media: list[list[str]]
    detokenizers: list[str]  # detokenizer PULL, one per replica; owner(request id) picks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Addresses:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_addresses(
    transport: str,
    run_dir: str,
    tp_size: int,
    tokenizers: int,
    image_workers: int,
    detokenizers: int,
    tcp_host: str = "127.0.0.1",
    tcp_base_port: int = 0,
) -> tuple[Addresses, str]:
    """The engine's addresses, and the supervisor's control address."""
    names = ["front", "gateway", "scheduler", "results", "control"]
    names += [f"tok{i}" for i in range(tokenizers)] + [f"images{i}" for i in range(image_workers)]
    names += [f"plan{r}" for r in range(tp_size)]
    names += [f"media{i}_{r}" for i in range(image_workers) for r in range(tp_size)]
    names += [f"detok{i}" for i in range(detokenizers)]
    if transport == "ipc":
        addr = {n: f"ipc://{run_dir}/{n}.sock" for n in names}
    elif transport == "tcp":
        addr = {}
        for i, n in enumerate(names):
            port = tcp_base_port + i if tcp_base_port else _free_port(tcp_host)
            addr[n] = f"tcp://{tcp_host}:{port}"
    else:
        raise ValueError(f"unknown transport {transport!r}: use ipc or tcp")
    wiring = Addresses(
        front=addr["front"],
        gateway=addr["gateway"],
        tokenizers=[addr[f"tok{i}"] for i in range(tokenizers)],
        images=[addr[f"images{i}"] for i in range(image_workers)],
        scheduler=addr["scheduler"],
        results=addr["results"],
        plans=[addr[f"plan{r}"] for r in range(tp_size)],
        media=[[addr[f"media{i}_{r}"] for r in range(tp_size)] for i in range(image_workers)],
        detokenizers=[addr[f"detok{i}"] for i in range(detokenizers)],
    )
    return wiring, addr["control"]
