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
from ._handlers import Handler
from ._server import NinepServer, _Connection
from ._session import ABORTED, Reply, Request

__all__ = ["HoldHook", "HoldingServer", "wait_listening", "RawClient", "DiodProcess", "free_port", "find_diod_tool", "serve_tcp", "until"]


class HoldHook:
    """Parks chosen requests of a :class:`HoldingServer`, so a test can force an order.

    ``hold(tag, "before")`` parks the request with that tag while it still waits for a
    worker (abortable: a Tflush drops it); ``hold(tag, "after")`` parks it after the file
    system work, with its reply decided (a Tflush then waits behind it).  ``await
    reached(tag, phase)`` returns once the server holds it; ``release(tag, phase)`` lets
    it go.  ``cancelled`` lists the held tags that were aborted; ``seen`` every message
    that went to the pool.
    """

    def __init__(self) -> None:
        self._gates: dict[tuple[int, str], asyncio.Event] = {}
        self._reached: dict[tuple[int, str], asyncio.Event] = {}
        self._held: list[Request] = []
        self.seen: list[Message] = []

    @property
    def cancelled(self) -> list[int]:
        return [r.tag for r in self._held if r.state is ABORTED]

    def hold(self, tag: int, phase: str = "before") -> None:
        self._gates[(tag, phase)] = asyncio.Event()
        self._reached[(tag, phase)] = asyncio.Event()

    def release(self, tag: int, phase: str = "before") -> None:
        self._gates.pop((tag, phase)).set()

    async def reached(self, tag: int, phase: str = "before") -> None:
        await self._reached[(tag, phase)].wait()

    def gate(self, req: Request, phase: str) -> asyncio.Event | None:
        key = (req.tag, phase)
        gate = self._gates.get(key)
        if gate is not None:
            self._held.append(req)
            self._reached[key].set()
        return gate


class _HeldConnection(_Connection):
    """A connection whose requests a :class:`HoldHook` can park (see HoldingServer)."""

    hook: HoldHook

    def _queue(self, req: Request, handler: Handler) -> None:
        self.hook.seen.append(req.msg)
        gate = self.hook.gate(req, "before")
        if gate is None:
            super()._queue(req, handler)
            return

        async def parked(gate: asyncio.Event) -> None:
            released = asyncio.ensure_future(gate.wait())
            self.closed.add_done_callback(lambda _: released.cancel())  # never released
            try:
                await released
            except asyncio.CancelledError:
                return
            if req.state is not ABORTED and not self.lost:
                super(_HeldConnection, self)._queue(req, handler)

        self._tasks.add(self._loop.create_task(parked(gate)))

    async def _answer(self, req: Request, handler: Handler) -> Reply:
        reply = await super()._answer(req, handler)
        gate = self.hook.gate(req, "after")
        if gate is not None:
            await gate.wait()
        return reply


class HoldingServer(NinepServer):
    """A :class:`NinepServer` whose requests all take the pool path, where ``hook`` (a
    :class:`HoldHook`) can hold them.  For tests: the production server has no hook."""

    def __init__(self, root: str | os.PathLike[str], hook: HoldHook, **kw: Any) -> None:
        kw["inline"] = False
        super().__init__(root, **kw)
        self.hook = hook

    def protocol(self, peer: str = "") -> _Connection:
        conn = _HeldConnection(self, peer)
        conn.hook = self.hook
        return conn


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
        assert isinstance(rv, c.Rversion) and rv.version == c.VERSION_9P2000L, rv
        ra = await self.rpc(c.Tattach(fid, c.NOFID, "root", aname, 0, tag=1))
        assert isinstance(ra, c.Rattach), ra
        return ra.qid

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


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 10) -> bool:
    """Wait until ``proc`` accepts connections on loopback ``port``: True, or False if it
    exited or ``timeout`` seconds passed first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)


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
        if not wait_listening(self.port, self.proc):
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            self.stop()
            raise RuntimeError(f"diod did not start: {err}")

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


async def serve_tcp(export: Any, hook: HoldHook | None = None,
                    **kw: Any) -> tuple[NinepServer, int]:
    """A :class:`NinepServer` for ``export`` listening on a free loopback port: (server,
    port); with ``hook``, a :class:`HoldingServer`."""
    server = NinepServer(str(export), **kw) if hook is None else HoldingServer(str(export), hook, **kw)
    # start_tcp promises only an AbstractServer; every loop's create_server (asyncio's,
    # uvloop's) returns a Server, which has the listening sockets.
    srv = cast(asyncio.Server, await server.start_tcp("127.0.0.1", 0))
    port: int = srv.sockets[0].getsockname()[1]
    return server, port

