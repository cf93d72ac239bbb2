"""The actor base class and the per-process entry point every stage runs under.

A process runs one actor: `setup()` loads what it needs, then `run()` serves its mailboxes until
SIGTERM/SIGINT cancels it; a heartbeat task reports to the supervisor meanwhile.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import structlog

from core.addresses import Addresses
from core.codec import CodecError
from core.config import EngineConfig
from core.control import ActorFailed, ActorReady, Heartbeat
from core.logging import setup_logging
from core.transport import Mailbox, Outbox, Transport


@dataclass
class ActorSpec:
    """What the supervisor hands a process: which actor, its replica index, and the engine."""

    name: str
    target: str  # "package.module:ClassName"
    index: int = 0
    engine_info: dict[str, Any] = field(default_factory=dict)


class Actor:
    """Base of every stage. Subclasses implement `setup` and `run`."""

    def __init__(self, spec: ActorSpec, config: EngineConfig, addresses: Addresses) -> None:
        self.name = spec.name
        self.index = spec.index
        self.engine_info = spec.engine_info
        self.config = config
        self.addresses = addresses
        self.transport = Transport()
        self.log: structlog.stdlib.BoundLogger = setup_logging(spec.name, config.log_level)

    async def setup(self) -> dict[str, Any]:
        return {}

    async def run(self) -> None:
        raise NotImplementedError

    async def serve(self, mailbox: Mailbox, handlers: dict[type, Any]) -> None:
        """Receive records forever and dispatch each by type; a bad record is logged and dropped."""
        while True:
            try:
                record = await mailbox.recv()
            except CodecError as exc:
                self.log.warning("dropped undecodable message", error=str(exc))
                continue
            handler = handlers.get(type(record))
            if handler is None:
                self.log.warning("no handler", kind=type(record).__name__)
                continue
            await handler(record)

    async def _heartbeat(self, control: Outbox) -> None:
        parent = os.getppid()
        while True:
            await control.send(Heartbeat(actor=self.name, pid=os.getpid()))
            await anyio.sleep(self.config.heartbeat_interval_s)
            if os.getppid() != parent:  # the supervisor died: do not linger as an orphan
                raise SystemExit(0)


async def _main(
    actor_cls: type[Actor], spec: ActorSpec, config: EngineConfig, addresses: Addresses
) -> None:
    actor = actor_cls(spec, config, addresses)
    control = actor.transport.outbox(addresses.control)
    try:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(on_signal)
            tg.start_soon(actor._heartbeat, control)
            try:
                info = await actor.setup()
            except Exception as exc:
                actor.log.error("setup failed", error=str(exc))
                await control.send(
                    ActorFailed(actor=actor.name, error=f"{type(exc).__name__}: {exc}")
                )
                await anyio.sleep(0.2)
                raise SystemExit(3) from exc
            await control.send(ActorReady(actor=actor.name, pid=os.getpid(), info=info))
            await actor.run()
            tg.cancel_scope.cancel()
    finally:
        actor.transport.close()


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the supervisor dies (no orphans after SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    """`python -m core.actor SPEC_FILE NAME`: run one actor from the supervisor's spec file."""
    argv = sys.argv[1:] if argv is None else argv
    spec_file, name = argv
    _die_with_parent()
    data = orjson.loads(open(spec_file, "rb").read())
    config = EngineConfig.from_json(orjson.dumps(data["config"]))
    addresses = Addresses(**data["addresses"])
    spec = ActorSpec(**data["actors"][name])
    module, cls_name = spec.target.split(":")
    actor_cls = getattr(importlib.import_module(module), cls_name)
    try:
        anyio.run(
            _main,
            actor_cls,
            spec,
            config,
            addresses,
            backend="asyncio",
            backend_options={"use_uvloop": True},
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
