"""The supervisor: starts every actor as its own process, watches heartbeats, stops them all.

Stages start in groups (executors first, since their KV pool decides the engine's limits); what a
group reports when ready is handed to the next. Stateless stages are restarted when they die.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import zmq

from core.actor import ActorSpec
from core.codec import CodecError, decode, encode
from core.config import EngineConfig
from core.control import ActorFailed, ActorReady, Heartbeat
from core.logging import setup_logging


@dataclass
class StageGroup:
    """Actors started together; `restartable` ones are respawned if they die."""

    specs: list[ActorSpec]
    restartable: bool = False


class EngineFailed(RuntimeError):
    pass


def prepare_run_dir(config: EngineConfig) -> bool:
    """Create the private (0700) run folder; True when this process made it (and removes it)."""
    owned = not config.run_dir
    if owned:
        config.run_dir = tempfile.mkdtemp(prefix="tessera-")
    os.makedirs(config.run_dir, mode=0o700, exist_ok=True)
    os.chmod(config.run_dir, 0o700)
    return owned


class Supervisor:
    """Runs the application's actor groups. `wiring` (the application's address table) is opaque
    here and handed to every actor; `notify_ready` addresses get one ActorReady when all are up."""

    def __init__(
        self,
        config: EngineConfig,
        groups: list[StageGroup],
        wiring: dict[str, Any],
        control: str,
        notify_ready: list[str],
        owns_run_dir: bool,
    ) -> None:
        self.config = config
        self.groups = groups
        self.wiring = wiring
        self.control_address = control
        self.notify_ready = notify_ready
        self.log = setup_logging("supervisor", config.log_level)
        self._own_run_dir = owns_run_dir
        self.spec_file = os.path.join(config.run_dir, "engine.json")
        # Stages that keep Prometheus metrics write them here (prometheus-client multiprocess).
        metrics_dir = os.path.join(config.run_dir, "metrics")
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.makedirs(metrics_dir, mode=0o700)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, ActorSpec] = {}
        self.restartable: set[str] = set()
        self.last_beat: dict[str, float] = {}
        self.restarts: dict[str, int] = {}
        self.ready_info: dict[str, Any] = {}
        self.stopping = False
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(control)

    # ------------------------------------------------------------------ processes
    def _write_spec_file(self) -> None:
        data = {
            "config": asdict(self.config),
            "wiring": self.wiring,
            "actors": {name: asdict(spec) for name, spec in self.specs.items()},
        }
        tmp = self.spec_file + ".tmp"
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(data))
        os.replace(tmp, self.spec_file)

    def _spawn(self, name: str) -> None:
        cmd = [sys.executable, "-m", "core.actor", self.spec_file, name]
        self.procs[name] = subprocess.Popen(cmd, start_new_session=False)
        self.last_beat[name] = time.monotonic()

    def _start_group(self, group: StageGroup) -> None:
        for spec in group.specs:
            spec.ready_info = dict(self.ready_info)
            spec.control = self.control_address
            self.specs[spec.name] = spec
            if group.restartable:
                self.restartable.add(spec.name)
        self._write_spec_file()
        pending = {s.name for s in group.specs}
        for name in pending:
            self._spawn(name)
        while pending:
            record = self._recv(timeout_s=0.5)
            if isinstance(record, ActorReady) and record.actor in pending:
                pending.discard(record.actor)
                self.ready_info.update(record.info)
                self.log.info("actor ready", name=record.actor, pid=record.pid)
            elif isinstance(record, ActorFailed):
                raise EngineFailed(f"{record.actor} failed to start: {record.error}")
            if self.stopping:
                raise EngineFailed("interrupted during start-up")
            for name in pending:
                code = self.procs[name].poll()
                if code is not None:
                    raise EngineFailed(f"{name} exited with code {code} during start-up")

    def _recv(self, timeout_s: float) -> object | None:
        if not self.control.poll(int(timeout_s * 1000)):
            return None
        frames = self.control.recv_multipart()
        try:
            record = decode(frames)
        except CodecError:
            return None
        if isinstance(record, (Heartbeat, ActorReady)):
            self.last_beat[record.actor] = time.monotonic()
        return record

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> dict[str, Any]:
        """Start every group in order; returns the merged readiness info."""
        for group in self.groups:
            self._start_group(group)
        for address in self.notify_ready:
            notify = self.ctx.socket(zmq.PUSH)
            notify.setsockopt(zmq.LINGER, 1000)
            notify.connect(address)
            notify.send_multipart(
                encode(ActorReady(actor="supervisor", pid=os.getpid(), info=self.ready_info))
            )
            notify.close()
        return self.ready_info

    def watch(self) -> int:
        """Keep the engine alive until a signal or an unrecoverable death; returns an exit code."""
        while not self.stopping:
            self._recv(timeout_s=0.5)
            now = time.monotonic()
            for name, proc in list(self.procs.items()):
                code = proc.poll()
                stale = now - self.last_beat.get(name, now) > self.config.heartbeat_timeout_s
                if code is None and not stale:
                    continue
                why = f"exited with code {code}" if code is not None else "stopped heartbeating"
                if name not in self.restartable or self.restarts.get(name, 0) >= 5:
                    self.log.error("stage lost; shutting the engine down", name=name, why=why)
                    return 1
                self.log.warning("restarting stage", name=name, why=why)
                if code is None:
                    proc.kill()
                    proc.wait()
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._spawn(name)
        return 0

    def shutdown(self) -> None:
        """Stop the groups in reverse start order, each before the next: the front (HTTP)
        first, given --shutdown-timeout to let its requests finish while the engine behind
        it still runs them; then the stateless stages, the engine, the executors."""
        drain = max(0.0, self.config.shutdown_timeout_s) + 5
        for i, group in enumerate(reversed(self.groups)):
            procs = [self.procs[s.name] for s in group.specs if s.name in self.procs]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + (drain if i == 0 else 10)
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.control.close(linger=0)
        self.ctx.term()
        if self._own_run_dir:
            shutil.rmtree(self.config.run_dir, ignore_errors=True)
        else:
            shutil.rmtree(os.path.join(self.config.run_dir, "metrics"), ignore_errors=True)
            for entry in os.listdir(self.config.run_dir):
                if entry.endswith(".sock") or entry == "engine.json":
                    os.unlink(os.path.join(self.config.run_dir, entry))
        self.log.info("engine stopped")

    def request_stop(self, *_: object) -> None:
        self.stopping = True
