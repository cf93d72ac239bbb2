"""The actor that serves the OpenAI-compatible HTTP API with uvicorn inside its own event loop.

Front door of the HTTP path: it starts first and binds the port in `setup`, answering 503 while
the engine behind it starts (protocols/openai/readiness.py); then each request becomes an
AsyncEngineClient call to the gateway (`addresses.front`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import anyio
import uvicorn

from protocols.client import AsyncEngineClient
from protocols.openai.app import build_app
from protocols.openai.drain import DrainGuard
from protocols.openai.generation_config import sampling_defaults
from protocols.openai.readiness import StartupGate
from protocols.stage import Stage

HEADER_SLACK_BYTES = 8192  # request line and header syntax beyond the names and values
STOP_GRACE_S = 3  # whole seconds: uvicorn's timeout_graceful_shutdown is an int


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the actor kernel owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound now so a taken port fails `setup` and port 0 gets a real port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.setblocking(False)
    return sock


class OpenAIServerActor(Stage):
    """Serves the OpenAI routes (/v1/...), /tokenize, /detokenize, /health, /ping, /metrics and
    /version."""

    async def setup(self) -> dict[str, Any]:
        defaults = sampling_defaults(self.config)  # a bad generation_config.json fails the start
        if defaults:
            self.log.info(
                "request sampling defaults from generation_config.json (--generation-config "
                "vllm ignores them)",
                **defaults,
            )
        self.client = AsyncEngineClient(self.addresses.front)
        self.app = build_app(self.client, self.config, defaults)
        self.startup = StartupGate(self.app)  # 503 until the engine reports ready
        self.guard = DrainGuard(self.startup)  # outermost: counts and, on shutdown, refuses
        self.sock = bind(self.config.host, self.config.port)
        port = self.sock.getsockname()[1]
        c = self.config
        config = uvicorn.Config(
            self.guard,
            host=c.host,
            port=port,
            log_level=c.uvicorn_log_level,
            lifespan="off",
            timeout_graceful_shutdown=STOP_GRACE_S,
            root_path=c.root_path,
            ssl_keyfile=c.ssl_keyfile,
            ssl_certfile=c.ssl_certfile,
            # h11 stops an oversized header block as it arrives; RequestGate words the 431
            h11_max_incomplete_event_size=c.max_request_header_bytes + HEADER_SLACK_BYTES,
        )
        config.load()  # now, so a bad TLS key or certificate fails the start, not the first request
        self.server = EmbeddedServer(config)
        url = f"{'https' if c.uses_tls else 'http'}://{c.host}:{port}"
        self.log.info("openai server listening", url=url, models=self.config.model_names)
        return {"url": url, "port": port}

    async def run(self) -> None:
        serving = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        watching = asyncio.ensure_future(self.startup.watch(self.client))
        try:
            await asyncio.wait({serving})  # ends only if uvicorn stops by itself
            serving.result()
        finally:
            watching.cancel()
            drain = max(0.0, self.config.shutdown_timeout_s)
            with anyio.move_on_after(drain + STOP_GRACE_S + 2, shield=True):
                await self._drain(serving, drain)
                await self._stop(serving)
            if not serving.done():
                serving.cancel()
            self.client.close()

    async def _drain(self, serving: asyncio.Future[None], seconds: float) -> None:
        """Answer new requests 503 while those in flight finish, for up to `seconds`."""
        if seconds <= 0 or serving.done() or self.orphaned():  # orphaned: no engine to wait on
            return
        self.guard.draining = True
        self.log.info("draining", requests=self.guard.in_flight, timeout_s=seconds)
        deadline = time.monotonic() + seconds
        while self.guard.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.guard.in_flight:
            self.log.warning("drain timed out; ending the rest", requests=self.guard.in_flight)

    async def _stop(self, serving: asyncio.Future[None]) -> None:
        """Stop promptly: close the listener, cancel in-flight requests (aborting them upstream)."""
        self.server.should_exit = True
        self.server.force_exit = True
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # cancelled requests
        for task in list(self.server.server_state.tasks):
            task.cancel()
        if not serving.done():
            await asyncio.wait({serving}, timeout=STOP_GRACE_S)
