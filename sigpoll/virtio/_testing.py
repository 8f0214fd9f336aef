"""Helpers the virtio test suites share (not part of the public API).

A host-side protocol that records what a port delivers, a context manager that runs a
:class:`VhostUserBackend` for the length of a block, and a blocking read of an exact count
from a port's unix socket.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._backend import VhostUserBackend

__all__ = ["Collect", "recv_exactly", "serving"]


class Collect(asyncio.Protocol):
    """Host-side protocol that keeps everything it receives.

    ``data`` holds the bytes, ``eof`` turns true on eof_received, ``lost`` resolves (with
    the exception, if any) on connection_lost, and ``paused``/``resumed`` count the flow
    control calls.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_event_loop().create_future()
        self.paused = 0
        self.resumed = 0
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1


@asynccontextmanager
async def serving(backend: VhostUserBackend, path: str) -> AsyncIterator[VhostUserBackend]:
    """Listen on ``path`` and run ``backend.serve()`` as a task for the block; yields the backend.

    On leaving the block, also by an exception, the task is cancelled and awaited (its
    outcome, cancellation included, is swallowed).
    """
    backend.listen(path)
    server = asyncio.ensure_future(backend.serve())
    try:
        yield backend
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a blocking socket (its timeout applies to each read); EOFError if
    the peer closes first."""
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError(f"{len(got)} of {n} bytes, then EOF")
        got += chunk
    return bytes(got)
