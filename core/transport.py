"""ZeroMQ sockets for actors: mailboxes (PULL/ROUTER) to receive, outboxes (PUSH/DEALER) to send.

Every send and receive goes through core.codec, so only registered records ever cross a socket.
"""

from __future__ import annotations

import os
from typing import Any

import zmq
import zmq.asyncio

from core.codec import decode, encode


def remove_ipc_file(address: str) -> None:
    """Remove the socket file of an ipc:// address (nothing for tcp://, or a file gone)."""
    if address.startswith("ipc://"):
        try:
            os.unlink(address[len("ipc://") :])
        except FileNotFoundError:
            pass


def bind_address(address: str, bind_host: str | None) -> str:
    """The address to bind for `address`: a tcp:// one on `bind_host` instead (all interfaces
    for "0.0.0.0") when given, since the name peers connect to may not be a local interface."""
    if bind_host is None or not address.startswith("tcp://"):
        return address
    port = address.rsplit(":", 1)[1]
    return f"tcp://{bind_host}:{port}"


class Transport:
    """Owns one asyncio ZMQ context per process and the sockets made from it; tcp:// sockets
    bind on `bind_host` when given (see bind_address)."""

    def __init__(self, bind_host: str | None = None) -> None:
        self.bind_host = bind_host
        self.ctx = zmq.asyncio.Context()
        self._sockets: list[zmq.asyncio.Socket] = []
        self._bound_paths: list[str] = []  # ipc socket files this process made (removed on close)

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
                self._bound_paths.append(path)
            sock.bind(bind_address(address, self.bind_host))
        else:
            sock.connect(address)
        self._sockets.append(sock)
        return sock

    def _joined(self, kind: int, address: str | list[str], bind: bool) -> zmq.asyncio.Socket:
        """A socket on `address`; given several, it is on the first and connects to the rest."""
        addresses = [address] if isinstance(address, str) else address
        sock = self._socket(kind, addresses[0], bind)
        for extra in addresses[1:]:
            sock.connect(extra)
        return sock

    def mailbox(self, address: str | list[str], bind: bool = True) -> Mailbox:
        """A PULL socket; given several addresses it connects to all and takes from each fairly."""
        return Mailbox(self._joined(zmq.PULL, address, bind))

    def outbox(self, address: str | list[str], bind: bool = False) -> Outbox:
        """A PUSH socket; given several addresses it connects to all and round-robins."""
        return Outbox(self._joined(zmq.PUSH, address, bind))

    def front_door(self, address: str) -> FrontDoor:
        sock = self._socket(zmq.ROUTER, address, bind=True)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        return FrontDoor(sock)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self.ctx.term()
        for path in self._bound_paths:  # no socket file outlives its process
            remove_ipc_file("ipc://" + path)


class Mailbox:
    """A PULL socket: `await recv()` returns the next decoded record."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def recv(self) -> Any:
        frames = await self.sock.recv_multipart(copy=False)
        return decode(frames)

    async def ready(self) -> bool:
        """True when a record is waiting, so `recv` will not block."""
        return bool(await self.sock.poll(0))


class Outbox:
    """A PUSH socket: `await send(record)`."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def send(self, record: Any) -> None:
        await self.sock.send_multipart(encode(record), copy=False)


class FrontDoor:
    """A ROUTER socket for many clients: records come in and go out tagged with a client id."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock

    async def recv(self) -> tuple[bytes, Any]:
        """The next (client id, record); raises CodecError for a bad record (client id kept)."""
        client, *frames = await self.sock.recv_multipart(copy=False)
        # zmq.Frame has the buffer protocol, but pyzmq's stubs do not declare it.
        return bytes(client), decode(frames)  # type: ignore[call-overload]

    async def send(self, client: bytes, record: Any) -> None:
        await self.sock.send_multipart([client, *encode(record)], copy=False)
