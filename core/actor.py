"""The actor base class and the per-process entry point every stage runs under.

A process runs one actor: `setup()` loads what it needs, then `run()` serves its mailboxes until
SIGTERM cancels it; a heartbeat thread reports to the supervisor meanwhile. SIGINT and SIGHUP are
ignored: a Ctrl-C or a closed terminal reaches every process of the group, and the supervisor
stops the stages in order (HTTP first, draining). An actor whose supervisor dies gets SIGTERM.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
import structlog
import zmq

from core.codec import CodecError, encode
from core.config import EngineConfig
from core.control import ActorFailed, ActorReady, Heartbeat
from core.logging import setup_logging
from core.transport import Mailbox, Transport, remove_ipc_file


@dataclass
class ActorSpec:
    """What the supervisor hands a process: which actor, its replica index, and the engine."""

    name: str
    target: str  # "package.module:ClassName"
    index: int = 0
    ready_info: dict[str, Any] = field(default_factory=dict)  # what earlier stages reported
    control: str = ""  # the supervisor's control address (heartbeats, readiness)
    remote: bool = False  # run by another host's launcher; its heartbeats are relayed here


class Actor:
    """Base of every stage. Subclasses implement `setup` and `run`.

    `wiring` is the application's address table, opaque to the kernel; `setup` returns what this
    actor reports when ready, handed on to the actors started after it."""

    def __init__(self, spec: ActorSpec, config: EngineConfig, wiring: dict[str, Any]) -> None:
        self.name = spec.name
        self.index = spec.index
        self.ready_info = spec.ready_info
        self.control = spec.control
        self.config = config
        self.wiring = wiring
        self.transport = Transport(config.bind_host)
        self.log: structlog.stdlib.BoundLogger = setup_logging(spec.name, config.log_level)
        self._parent = os.getppid()

    def orphaned(self) -> bool:
        """True when the supervisor is gone (killed): the rest of the engine is going too."""
        return os.getppid() != self._parent

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

    def _heartbeat(self, stop: threading.Event) -> None:
        """Runs on its own thread with its own socket, so a stage whose loop is busy on a long
        step (an executor's forward runs on the loop thread) still reports it is alive."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.control)
        parent = os.getppid()
        try:
            while not stop.is_set():
                sock.send_multipart(encode(Heartbeat(actor=self.name, pid=os.getpid())))
                if os.getppid() != parent:  # the supervisor died: do not linger as an orphan
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                stop.wait(self.config.heartbeat_interval_s)
        finally:
            sock.close(linger=0)
            ctx.term()


async def _main(
    actor_cls: type[Actor], spec: ActorSpec, config: EngineConfig, wiring: dict[str, Any]
) -> None:
    actor = actor_cls(spec, config, wiring)
    control = actor.transport.outbox(spec.control)
    stop_beat = threading.Event()
    beat = threading.Thread(target=actor._heartbeat, args=(stop_beat,), daemon=True)
    # The receiver stays open until the process ends: a second SIGTERM (the supervisor's after
    # its death signal, say) must not find the default action and kill the clean-up below.
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        try:
            async with anyio.create_task_group() as tg:

                async def on_signal() -> None:
                    async for _ in signals:
                        tg.cancel_scope.cancel()

                tg.start_soon(on_signal)
                beat.start()
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
            stop_beat.set()
            if beat.is_alive():
                beat.join(timeout=2)  # its socket closed: no thread is inside libzmq at exit
            actor.transport.close()
            if actor.orphaned():  # the supervisor was killed: its control socket is ours to clear
                remove_ipc_file(spec.control)


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
    for sig in (signal.SIGINT, signal.SIGHUP):  # the supervisor stops this process (SIGTERM)
        signal.signal(sig, signal.SIG_IGN)
    data = orjson.loads(open(spec_file, "rb").read())
    config = EngineConfig.from_json(orjson.dumps(data["config"]))
    wiring = data["wiring"]
    spec = ActorSpec(**data["actors"][name])
    module, cls_name = spec.target.split(":")
    actor_cls = getattr(importlib.import_module(module), cls_name)
    code = 0
    try:
        anyio.run(
            _main,
            actor_cls,
            spec,
            config,
            wiring,
            backend="asyncio",
            backend_options={"use_uvloop": True},
        )
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit_now(code)


def _exit_now(code: int) -> None:
    """End the process without interpreter finalization: the actor has closed its sockets, and
    native threads still alive at exit (torch's OpenMP and intra-op pools, the grammar masker's
    workers, libzmq's I/O threads) must not meet C++ static destructors, which is how an executor
    stopped mid-run died with "terminate called without an active exception" (exit -6)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
