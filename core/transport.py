"""ZeroMQ sockets for actors: mailboxes (PULL/ROUTER) to receive, outboxes (PUSH/DEALER) to send.

Every send and receive goes through core.codec, so only registered records ever cross a socket.
"""

from __future__ import annotations

import os
from typing import Any

import zmq
import zmq.asyncio

from core.codec import decode, encode


class Transport:
    """Owns one asyncio ZMQ context per process and the sockets made from it."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context()
        self._sockets: list[zmq.asyncio.Socket] = []

    def _socket(self, kind: int, address: str, bind: bool) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if bind:
            if address.startswith("ipc://"):
                path = address[len("ipc://") :]
                if os.path.exists(path):
                    os.unlink(path)
            sock.bind(address)
        else:
            sock.connect(address)
        self._sockets.append(sock)
        return sock

    def mailbox(self, address: str, bind: bool = True) -> Mailbox:
        return Mailbox(self._socket(zmq.PULL, address, bind))

    def outbox(self, address: str, bind: bool = False) -> Outbox:
        return Outbox(self._socket(zmq.PUSH, address, bind))

    def router(self, address: str) -> zmq.asyncio.Socket:
        sock = self._socket(zmq.ROUTER, address, bind=True)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        return sock

    def dealer(self, address: str) -> zmq.asyncio.Socket:
        return self._socket(zmq.DEALER, address, bind=False)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self.ctx.term()


class Mailbox:
    """A PULL socket: `await recv()` returns the next decoded record."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def recv(self) -> Any:
        frames = await self.sock.recv_multipart(copy=False)
        return decode(frames)


class Outbox:
    """A PUSH socket: `await send(record)`."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def send(self, record: Any) -> None:
        await self.sock.send_multipart(encode(record), copy=False)
