"""Helpers for testing 9P peers: a hook that holds requests, a raw wire client, diod.

Used by the project's tests and the benchmark; small enough to read in one go.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any, cast

from . import _codec as c
from ._codec import Message
from .._testing import until
from ._server import NinepServer, Request

__all__ = ["HoldHook", "RawClient", "DiodProcess", "free_port", "find_diod_tool", "serve_tcp", "until"]


class HoldHook:
    """A :class:`~sigpoll.ninep.ServerHook` that parks chosen requests.

    ``hold(tag, "before")`` parks the request with that tag while it is still abortable;
    ``hold(tag, "after")`` parks it after the file system work, with its reply decided.
    ``await reached(tag, phase)`` returns once the server holds it; ``release(tag,
    phase)`` lets it go.  ``cancelled`` lists tags aborted while held.
    """

    def __init__(self) -> None:
        self._gates: dict[tuple[int, str], asyncio.Event] = {}
        self._reached: dict[tuple[int, str], asyncio.Event] = {}
        self.cancelled: list[int] = []
        self.seen: list[Message] = []

    def hold(self, tag: int, phase: str = "before") -> None:
        self._gates[(tag, phase)] = asyncio.Event()
        self._reached[(tag, phase)] = asyncio.Event()

    def release(self, tag: int, phase: str = "before") -> None:
        self._gates.pop((tag, phase)).set()

    async def reached(self, tag: int, phase: str = "before") -> None:
        await self._reached[(tag, phase)].wait()

    async def _gate(self, req: Request, phase: str) -> None:
        key = (req.tag, phase)
        gate = self._gates.get(key)
        if gate is None:
            return
        self._reached[key].set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(req.tag)
            raise

    async def before(self, request: Request) -> None:
        self.seen.append(request.msg)
        await self._gate(request, "before")

    async def after(self, request: Request) -> None:
        await self._gate(request, "after")


class RawClient:
    """Speaks 9P frames over asyncio streams with no protocol logic at all."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    def send(self, *msgs: Message) -> None:
        self.writer.write(b"".join(c.encode(m) for m in msgs))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 5.0) -> Message:
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        size = int.from_bytes(head, "little")
        body = await asyncio.wait_for(self.reader.readexactly(size - 4), timeout)
        return c.decode(head + body)

    async def expect_nothing(self, timeout: float = 0.2) -> None:
        """Fail if a frame arrives within ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected bytes from server: {data!r}")

    async def rpc(self, msg: Message) -> Message:
        self.send(msg)
        return await self.recv()

    async def handshake(self, aname: str = "", msize: int = 65536, fid: int = 0) -> c.Qid:
        rv = await self.rpc(c.Tversion(msize, c.VERSION_9P2000L, tag=c.NOTAG))
        assert rv.version == c.VERSION_9P2000L, rv
        ra = await self.rpc(c.Tattach(fid, c.NOFID, "root", aname, 0, tag=1))
        assert ra.TYPE == 105, ra
        qid: c.Qid = ra.qid
        return qid

    async def at_eof(self, timeout: float = 5.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionError, asyncio.TimeoutError):
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_diod_tool(name: str) -> str | None:
    """Path of a diod program (they live in /usr/sbin on Debian)."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


class DiodProcess:
    """diod serving ``export`` on a loopback TCP port, no auth, everything as root."""

    def __init__(self, export: str, extra: Sequence[str] = ()) -> None:
        diod = find_diod_tool("diod")
        if diod is None:
            raise FileNotFoundError("diod is not installed")
        self.port = free_port()
        self.export = export
        self.proc = subprocess.Popen(
            [diod, "-f", "-n", "-S", "-U", "root", "-l", f"127.0.0.1:{self.port}",
             "-e", export, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.stop()
                    raise RuntimeError(f"diod did not start: {err}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> DiodProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_tcp(export: Any, **kw: Any) -> tuple[NinepServer, int]:
    """A :class:`NinepServer` for ``export`` listening on a free loopback port: (server, port)."""
    server = NinepServer(str(export), **kw)
    # start_tcp promises only an AbstractServer; every loop's create_server (asyncio's,
    # uvloop's) returns a Server, which has the listening sockets.
    srv = cast(asyncio.Server, await server.start_tcp("127.0.0.1", 0))
    port: int = srv.sockets[0].getsockname()[1]
    return server, port

