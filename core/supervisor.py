"""The supervisor: starts every actor as its own process, watches heartbeats, stops them all.

Stages start in groups (executors first, since their KV pool decides the engine's limits); what a
group reports when ready is handed to the next. A stateless stage that dies or freezes is restarted
alone, and the watchers (the gateway) are told, so the requests it held fail at once; a lost engine
stage fails every request in flight and restarts the engine (`--restart-engine`) or stops it.

A multi-host engine runs one supervisor per host. The leader's lists the other hosts' executors
as remote: it waits for their readiness and watches their heartbeats, which the other hosts'
supervisors relay to its control socket. Those relay supervisors stop when the leader's socket
goes away. Neither restarts a multi-host engine: a lost rank stops it, on every host.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
import zmq
from zmq.utils.monitor import recv_monitor_message

from core.actor import ActorSpec
from core.codec import CodecError, decode, encode
from core.config import EngineConfig
from core.control import ActorFailed, ActorLost, ActorReady, EngineDown, Heartbeat
from core.liveness import Lost, RestartBudget, lost_actors
from core.logging import setup_logging
from core.run_dirs import make_run_dir
from core.transport import bind_address


@dataclass
class StageGroup:
    """Actors started together; `restartable` ones are respawned if they die."""

    specs: list[ActorSpec]
    restartable: bool = False
    stop_first: bool = False  # stopped before the others whatever its start place (the front)
    outlives_engine: bool = False  # kept running when the engine restarts (the HTTP front)


class EngineFailed(RuntimeError):
    pass


NOTICE_GRACE_S = 0.3  # how long the gateway gets to fail its requests before the engine stops
RESTART_STOP_S = 3.0  # SIGTERM to SIGKILL when the engine is stopped for a restart


def prepare_run_dir(config: EngineConfig) -> bool:
    """Create the private (0700) run folder; True when this process made it (and removes it)."""
    owned = not config.run_dir
    if owned:
        config.run_dir = make_run_dir()  # removes the stale ones of killed launchers first
    os.makedirs(config.run_dir, mode=0o700, exist_ok=True)
    os.chmod(config.run_dir, 0o700)
    return owned


class Supervisor:
    """Runs the application's actor groups. `wiring` (the application's address table) is opaque
    here and handed to every actor; `notify_ready` addresses (the watchers) get one ActorReady
    when all are up, and the ActorLost / EngineDown notices while they run."""

    def __init__(
        self,
        config: EngineConfig,
        groups: list[StageGroup],
        wiring: dict[str, Any],
        control: str,
        notify_ready: list[str],
        owns_run_dir: bool,
        leader_control: str | None = None,
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
        self.budgets: dict[str, RestartBudget] = {}  # per restartable actor
        self.engine_budget = RestartBudget()
        self._watchers: list[zmq.Socket] = []
        self.ready_info: dict[str, Any] = {}
        self.stopping = False
        self.ctx = zmq.Context()
        self.control = self.ctx.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(bind_address(control, config.bind_host))
        self.leader = LeaderLink(self.ctx, leader_control, config) if leader_control else None

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
        remote = {s.name for s in group.specs if s.remote}
        for name in pending - remote:
            self._spawn(name)
        if remote:
            self.log.info("waiting for the other hosts' ranks", actors=sorted(remote))
            self.last_beat.update(dict.fromkeys(remote, time.monotonic()))
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
            if self.leader is not None and self.leader.gone():
                raise EngineFailed(f"the leader at {self.leader.address} went away")
            for name in pending - remote:
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
        if self.leader is not None and isinstance(record, (Heartbeat, ActorReady, ActorFailed)):
            self.leader.relay(frames)
        return record

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> dict[str, Any]:
        """Start every group in order; returns the merged readiness info."""
        for group in self.groups:
            self._start_group(group)
        self._open_watchers()
        self._notify(ActorReady(actor="supervisor", pid=os.getpid(), info=self.ready_info))
        return self.ready_info

    def _open_watchers(self) -> None:
        for address in self.notify_ready:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self._watchers.append(sock)

    def _close_watchers(self) -> None:
        """Unsent notices are dropped: they were for a gateway that is gone."""
        for sock in self._watchers:
            sock.close(linger=0)
        self._watchers = []

    def _notify(self, record: object) -> None:
        for sock in self._watchers:
            try:
                sock.send_multipart(encode(record), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.log.warning("watcher not reachable", kind=type(record).__name__)

    def watch(self) -> int:
        """Keep the engine alive until a signal or an unrecoverable loss; returns an exit code."""
        while not self.stopping:
            self._recv(timeout_s=0.5)
            if self.stopping:
                break
            if self.leader is not None and self.leader.gone():
                self.log.error("the leader went away; stopping", leader=self.leader.address)
                return 1
            codes = {name: proc.poll() for name, proc in self.procs.items()}
            codes.update({name: None for name, spec in self.specs.items() if spec.remote})
            now = time.monotonic()
            for lost in lost_actors(codes, self.last_beat, now, self.config.heartbeat_timeout_s):
                if lost.name not in self.restartable:
                    code = self._engine_lost(lost)
                    if code is not None:
                        return code
                    break  # every process was replaced: look again
                if not self.budgets.setdefault(lost.name, RestartBudget()).allow(now):
                    self.log.error("stage keeps failing; stopping", name=lost.name, why=lost.why)
                    self._notify(EngineDown(f"{lost.name} {lost.why}", restarting=False))
                    time.sleep(NOTICE_GRACE_S)
                    return 1
                self.log.warning("restarting stage", name=lost.name, why=lost.why)
                self._notify(ActorLost(lost.name, lost.why))
                self._kill(lost.name)
                self._spawn(lost.name)
        return 0

    def _engine_lost(self, lost: Lost) -> int | None:
        """An engine stage is gone: tell the gateway (it fails every request in flight), then
        restart every group but the front (None) or give the exit code to stop with."""
        # another host's rank cannot be respawned from here: a multi-host engine stops instead
        restart = (
            self.config.restart_engine
            and not self.config.multi_node
            and self.engine_budget.allow(time.monotonic())
        )
        remote = self.specs[lost.name].remote if lost.name in self.specs else False
        why = f"{lost.name}{' (on another host)' if remote else ''} {lost.why}"
        self.log.error(
            "engine stage lost; " + ("restarting the engine" if restart else "stopping"),
            name=lost.name,
            why=lost.why,
        )
        self._notify(EngineDown(why, restarting=restart))
        time.sleep(NOTICE_GRACE_S)
        if not restart:
            return 1
        self._close_watchers()
        self._kill(lost.name)
        groups = [g for g in self.groups if not g.outlives_engine]
        for group in reversed(groups):
            self._stop([s.name for s in group.specs], RESTART_STOP_S)
        t0 = time.monotonic()
        try:
            for group in groups:
                self._start_group(group)
        except EngineFailed:
            if self.stopping:
                return 0
            raise
        self._open_watchers()
        self._notify(ActorReady(actor="supervisor", pid=os.getpid(), info=self.ready_info))
        self.log.warning("engine restarted", after=why, seconds=round(time.monotonic() - t0, 2))
        return None

    def _kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _stop(self, names: list[str], timeout_s: float) -> None:
        """SIGTERM, then SIGKILL what is still running after `timeout_s`."""
        _terminate([self.procs[n] for n in names if n in self.procs], timeout_s)

    def shutdown(self) -> None:
        """Stop the groups in reverse start order, `stop_first` ones before all (each group
        before the next): the front (HTTP) first, given --shutdown-timeout to let its requests
        finish while the engine behind it still runs them; then the stateless stages, the engine, the executors."""
        drain = max(0.0, self.config.shutdown_timeout_s) + 5
        order = [g for g in self.groups if g.stop_first]
        order += [g for g in reversed(self.groups) if not g.stop_first]
        for i, group in enumerate(order):
            procs = [self.procs[s.name] for s in group.specs if s.name in self.procs]
            _terminate(procs, drain if i == 0 else 10)
        self._close_watchers()
        if self.leader is not None:
            self.leader.close()
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


class LeaderLink:
    """A non-leader host's line to the leader's supervisor: relays its actors' heartbeats and
    readiness there, and tells when the leader's socket went away (closed, or silent past
    --heartbeat-timeout by ZMQ's own heartbeats) after it had been reached."""

    def __init__(self, ctx: zmq.Context, address: str, config: EngineConfig) -> None:
        self.address = address
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, int(config.heartbeat_interval_s * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(config.heartbeat_timeout_s * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_TTL, int(config.heartbeat_timeout_s * 1000))
        self.events = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self.sock.connect(address)
        self.reached = False
        self.lost = False

    def relay(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the leader is not taking them; gone() tells

    def gone(self) -> bool:
        while self.events.poll(0):
            event = recv_monitor_message(self.events)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.reached = True
            elif event == zmq.EVENT_DISCONNECTED and self.reached:
                self.lost = True
        return self.lost

    def close(self) -> None:
        self.sock.disable_monitor()
        self.events.close(linger=0)
        self.sock.close(linger=0)


def _terminate(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM to each, then SIGKILL what is still running after `timeout_s` in all."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
