"""Where every stage listens: one ZMQ address per mailbox, derived once by the supervisor.

ipc:// sockets live in a private 0700 run folder; tcp:// is for stages on other hosts.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass


@dataclass
class Addresses:
    front: str  # gateway ROUTER: SDK clients and the HTTP adapter connect here
    gateway: str  # gateway PULL: outputs and errors on their way back to clients
    tokenizer: str  # gateway PUSH (bound): tokenizer replicas pull requests from here
    images: list[str]  # image preprocessor PULL, one per replica; tokenizers connect to all
    scheduler: str  # scheduler PULL: tokenized requests, aborts
    results: str  # scheduler PULL: step results from executor rank 0
    plans: list[str]  # scheduler PUSH, one per tensor-parallel rank
    detokenizers: list[str]  # scheduler PUSH, one per detokenizer replica (sticky by request)
    control: str  # supervisor PULL: heartbeats and readiness

    def to_dict(self) -> dict:
        return asdict(self)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_addresses(
    transport: str,
    run_dir: str,
    tp_size: int,
    detokenizers: int,
    image_workers: int = 1,
    tcp_host: str = "127.0.0.1",
    tcp_base_port: int = 0,
) -> Addresses:
    names = ["front", "gateway", "tokenizer", "scheduler", "results", "control"]
    names += [f"plan{r}" for r in range(tp_size)] + [f"detok{i}" for i in range(detokenizers)]
    names += [f"images{i}" for i in range(image_workers)]
    if transport == "ipc":
        addr = {n: f"ipc://{run_dir}/{n}.sock" for n in names}
    elif transport == "tcp":
        addr = {}
        for i, n in enumerate(names):
            port = tcp_base_port + i if tcp_base_port else _free_port(tcp_host)
            addr[n] = f"tcp://{tcp_host}:{port}"
    else:
        raise ValueError(f"unknown transport {transport!r}: use ipc or tcp")
    return Addresses(
        front=addr["front"],
        gateway=addr["gateway"],
        tokenizer=addr["tokenizer"],
        images=[addr[f"images{i}"] for i in range(image_workers)],
        scheduler=addr["scheduler"],
        results=addr["results"],
        plans=[addr[f"plan{r}"] for r in range(tp_size)],
        detokenizers=[addr[f"detok{i}"] for i in range(detokenizers)],
        control=addr["control"],
    )
