"""9P2000.L server: listeners, one asyncio protocol per connection, scheduling.

The pieces, each in its own module:

* ``_codec``: messages and the wire; one framer (:class:`~._codec.FrameBuffer`).
* ``_session``: the protocol rules with no I/O (tags, Tflush, Tversion, the fid table).
  A connection feeds it every decoded message and carries out the actions it returns.
* ``_handlers``: what each T-message does, keyed by message class.
* ``_pool``: the worker threads, and the scheduler that shares them out.
* this module: transports, flow control and limits, and where each request runs.

Where a request runs.  A handoff to a worker thread and back costs far more than a
walk, a getattr or a read from the page cache, so the cheap operations (walk, getattr,
clunk, statfs, readlink, lopen of a regular file or directory, read and write of a
regular file) run inline on the loop, and their replies are batched into one write per
batch of frames.  They are kept honest three ways: reads ask the kernel first with
``RWF_NOWAIT`` and go to the pool when the data is not in the page cache; an inline call
that takes longer than :data:`INLINE_BUDGET` sends that kind of operation to the pool for
the next :data:`DEMOTE_SECONDS`; and anything that might wait on another party (fifos,
devices, fsync, locks, readdir, creation) always goes to the pool.  An inline request is
answered before the next frame is even looked at, so a Tflush naming it finds nothing
pending and its Rflush follows its reply, as flush(5) asks.  Replies leave in completion
order, not request order; a slow file system call never holds up the others.

Limits (:class:`Limits`): fids per connection (EMFILE beyond it; Tclunk frees one),
requests in the pool path per connection and bytes queued for the peer (past either,
the connection stops reading -- backpressure, not an error -- until it drops again),
connections per server (a new one is closed at once, with a log line), and the msize
(the ``msize`` argument).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import _codec as c
from ._codec import Message
from ._fs import Export
from ._handlers import FAST, HANDLERS, Defer, FileFid, Handler, error_reply, retry_eintr
from ._pool import Scheduler, WorkerPool
from ._session import MIN_MSIZE, QUEUED, Abort, Close, Reply, Request, Session

__all__ = ["NinepServer", "Limits", "DEFAULT_MSIZE", "MIN_MSIZE", "INLINE_BUDGET",
           "DEMOTE_SECONDS", "CLOSE_WAIT"]

log = logging.getLogger("sigpoll.ninep")

DEFAULT_MSIZE = 512 * 1024

#: Seconds an inline call may take before its kind of operation is sent to the pool.
INLINE_BUDGET = 0.005
#: How long such a demotion lasts before the operation is tried inline again.
DEMOTE_SECONDS = 1.0
#: Seconds :meth:`NinepServer.close` waits for calls already running in worker threads
#: before it abandons them (a call that never returns must not hold up the close).
CLOSE_WAIT = 0.5
#: Replies at least this big are written on their own instead of joined into a batch
#: (joining would copy them once more for nothing).
_BIG_REPLY = 16 * 1024

T = TypeVar("T")


def _sleeps() -> int:
    """Times this thread has gone to sleep of its own accord (blocked in a call) so far.

    An inline call over budget only counts as slow when this moved: a call that blocked
    on the disk sleeps, while one that was merely preempted on a busy machine does not.
    """
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


@dataclass(frozen=True)
class Limits:
    """Per-server caps; each is hit with a clear answer instead of growing without bound.

    ``max_fids``: fids one connection may hold; Tattach/Twalk/Txattrwalk past it get
    ``Rlerror(EMFILE)`` (Tclunk frees one).  ``max_inflight``: requests of one connection
    waiting for or running in the thread pool; past it the server stops reading that
    connection until one finishes (TCP then pushes back on the client).
    ``max_connections``: connections one server serves at once; a new one past it is
    closed at once and logged.  ``max_queued_output``: bytes of replies queued for a
    client that does not read them; past it the server stops reading that connection
    (and so stops taking new work) until the client drains them.
    """

    max_fids: int = 16384
    max_inflight: int = 256
    max_connections: int = 256
    max_queued_output: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_fids", "max_inflight", "max_connections", "max_queued_output"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class NinepServer:
    """Serves one directory over 9P2000.L on any number of connections.

    ``root``: the directory to export.  ``read_only``: refuse every change with EROFS.
    ``security_model``: ``"mapped"`` (default) or ``"passthrough"``, what clients may make
    of the host's files (docs/ninep.md, "Security models").  ``squash_uid``/``squash_gid``:
    the host owner of every new file (see :class:`~sigpoll.ninep._fs.Export`).
    ``msize``: the largest message we accept.
    ``workers``: threads for file system calls (and the bound on calls running at once).
    ``limits``: see :class:`Limits`.  ``inline``: run cheap calls on the loop (see the
    module docstring); turn it off for an export on a file system whose metadata calls
    may hang (a network file system), so that only pool threads ever wait on it.

    Use :meth:`start_tcp`, :meth:`start_unix` or :meth:`serve_fds` inside a running
    loop; :meth:`close` ends everything.
    """

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False,
                 squash_uid: int | None = None, squash_gid: int | None = None,
                 msize: int = DEFAULT_MSIZE, workers: int = 8,
                 limits: Limits | None = None, inline: bool = True,
                 security_model: str = "mapped") -> None:
        if not isinstance(msize, int) or msize < MIN_MSIZE or msize > 0xFFFFFFFF:
            raise ValueError(f"msize must be an integer from {MIN_MSIZE} to 4294967295")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.export = Export(root, read_only=read_only, squash_uid=squash_uid,
                             squash_gid=squash_gid, security_model=security_model)
        self.msize = msize
        self.limits = limits if limits is not None else Limits()
        self.inline = inline
        self._pool = WorkerPool(workers)
        self._scheduler = Scheduler(workers, workers)
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        # Message class -> time.monotonic() until which it runs in the pool, after an
        # inline call of that class went over INLINE_BUDGET.
        self._demoted: dict[type[Message], float] = {}
        self._closed = False

    # ------------------------------------------------------------------ transports

    def protocol(self, peer: str = "") -> _Connection:
        """A fresh protocol object for one connection (for custom transports)."""
        return _Connection(self, peer)

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.AbstractServer:
        """Listen on TCP; returns the asyncio server (``.sockets[0].getsockname()``)."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: self.protocol(), host, port)
        self._servers.append(srv)
        return srv

    async def start_socket(self, sock: socket.socket) -> asyncio.AbstractServer:
        """Serve on a socket that is already listening (made elsewhere, e.g. inside a
        private network namespace)."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: self.protocol(), sock=sock)
        self._servers.append(srv)
        return srv

    async def start_unix(self, path: str) -> asyncio.AbstractServer:
        """Listen on a unix socket at ``path``."""
        loop = asyncio.get_running_loop()
        srv = await loop.create_unix_server(lambda: self.protocol(), path)
        self._servers.append(srv)
        return srv

    async def serve_fds(self, rfd: int, wfd: int | None = None) -> None:
        """Serve one connection on inherited descriptors until the peer hangs up.

        ``rfd`` alone (or ``wfd == rfd``) may be a socket, a tty or a character device;
        two different fds may be pipes.  The descriptors are duplicated, so the caller
        keeps ownership of its own.
        """
        loop = asyncio.get_running_loop()
        if wfd is None:
            wfd = rfd
        conn = self.protocol(f"fd:{rfd},{wfd}")
        st = os.fstat(rfd)
        if rfd == wfd and stat.S_ISSOCK(st.st_mode):
            sock = socket.socket(fileno=os.dup(rfd))
            sock.setblocking(False)
            await loop.connect_accepted_socket(lambda: conn, sock)
        else:
            if os.isatty(rfd):
                import tty

                tty.setraw(rfd)
            r = os.fdopen(os.dup(rfd), "rb", buffering=0)
            w = os.fdopen(os.dup(wfd), "wb", buffering=0)
            wtransport, _ = await loop.connect_write_pipe(lambda: _WriteSide(conn), w)
            conn.set_writer(wtransport)
            await loop.connect_read_pipe(lambda: conn, r)
        await conn.closed

    async def close(self) -> None:
        """Stop listening, drop every connection and release every fid and thread.

        Calls already running in worker threads get :data:`CLOSE_WAIT` seconds to end;
        one that does not (a hung file system) is abandoned, never waited for.
        """
        if self._closed:
            return
        self._closed = True
        for srv in self._servers:
            srv.close()
        # Connections first: since Python 3.12, Server.wait_closed() also waits for every
        # connection the server accepted to end, so waiting before aborting them never returns.
        for conn in list(self.connections):
            conn.abort()
        for srv in self._servers:
            await srv.wait_closed()
        ending = [asyncio.shield(conn.closed) for conn in self.connections]
        if ending:
            await asyncio.wait(ending, timeout=CLOSE_WAIT)
        for conn in list(self.connections):
            conn.abandon()
        self._pool.shutdown()
        self.export.close()

    # ------------------------------------------------------------------ helpers

    def _inline_ok(self, cls: type[Message]) -> bool:
        until = self._demoted.get(cls)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        del self._demoted[cls]
        return True

    def _demote(self, cls: type[Message], took: float) -> None:
        log.debug("ninep: inline %s took %.1f ms; to the pool for %.1f s", cls.__name__,
                  took * 1e3, DEMOTE_SECONDS)
        self._demoted[cls] = time.monotonic() + DEMOTE_SECONDS


class _WriteSide(asyncio.Protocol):
    """Protocol of a separate write pipe: passes flow control on to the connection."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class _Connection(asyncio.Protocol):
    """One client connection: its transport, its :class:`~._session.Session`, flow
    control, and the requests it has given to the pool."""

    def __init__(self, server: NinepServer, peer: str) -> None:
        self.server = server
        self.fs = server.export
        self.limits = server.limits
        self.peer = peer
        self.peer_key: Hashable = peer
        self.session: Session[FileFid] = Session(server.msize, server.limits.max_fids)
        self.frames = c.FrameBuffer(server.msize)
        #: The negotiated msize (the session's, kept here for the handlers).
        self.msize = server.msize
        self.transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self.lost = False
        self.refused = False
        #: Requests given to the pool path and not finished (waiting or running).
        self.inflight = 0
        # Requests waiting for a worker thread, in order, with their handlers.
        self._runq: deque[tuple[Request, Handler]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        # Replies waiting to go out in one write, and whether a write is due.
        self._out: list[bytes | bytearray | memoryview] = []
        self._batching = False
        self._flush_due = False
        # Frames read but not dispatched yet, while the connection is over a limit.
        self._backlog: deque[memoryview] = deque()
        self._write_paused = False
        self._read_paused = False
        # _sleeps() when the current batch of frames started (see _dispatch).
        self._sleeps_mark = 0
        #: Set by a fast handler whose call cannot wait (see _handlers.Serving).
        self.self_timed = False
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # ------------------------------------------------------------------ for handlers

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread (EINTR retried)."""
        return await self.server._pool.run(retry_eintr, fn, *args)

    # ------------------------------------------------------------------ transport side

    def set_writer(self, transport: asyncio.WriteTransport) -> None:
        """Use a separate write transport (pipe pairs)."""
        self._writer = transport
        self._set_write_limit(transport)

    def _set_write_limit(self, transport: asyncio.BaseTransport) -> None:
        try:
            transport.set_write_buffer_limits(  # type: ignore[attr-defined]
                high=self.limits.max_queued_output)
        except (AttributeError, NotImplementedError):  # a transport without flow control
            pass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.peer:
            name = transport.get_extra_info("peername")
            self.peer = str(name) if name else "?"
            self.peer_key = self.peer
        max_conn = self.limits.max_connections
        if len(self.server.connections) >= max_conn:
            # Nothing has been said on this connection yet, so there is no tag to answer
            # with an error: close it and say why where the operator will see it.
            self.refused = True
            log.warning("ninep: refusing connection from %s: already %d connections "
                        "(max_connections)", self.peer, max_conn)
            transport.close()
            if self._writer is not None:
                self._writer.close()
            return
        if self._writer is None:
            self._writer = transport  # type: ignore[assignment]
            self._set_write_limit(transport)
        self.server.connections.add(self)
        log.info("ninep: connection from %s", self.peer)

    def abort(self) -> None:
        # A read pipe transport has no abort(); closing it drops its buffered input too.
        for t in (self.transport, self._writer if self._writer is not self.transport else None):
            if t is not None:
                getattr(t, "abort", t.close)()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._out.clear()
        self._backlog.clear()
        if self._writer is not None and self._writer is not self.transport:
            self._writer.close()
        if self.refused:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        log.info("ninep: connection from %s closed", self.peer)
        # Requests that have not reached the file system are dropped; running ones
        # finish in their threads and give back their fids, which then close.
        self.session.close()
        self._act()
        self._maybe_finish_close()

    def abandon(self) -> None:
        """Stop waiting for calls still running in threads (the server is closing)."""
        for task in list(self._tasks):
            task.cancel()
        self.server._scheduler.forget(self)
        if not self.closed.done():
            self.server.connections.discard(self)
            self.closed.set_result(None)

    def _maybe_finish_close(self) -> None:
        if self.lost and self.inflight == 0 and not self.closed.done():
            self.server._scheduler.forget(self)
            self.server.connections.discard(self)
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        try:
            frames = self.frames.feed(data)
        except c.FramingError as exc:
            self._begin_batch()
            try:
                # The good frames before the bad one are answered, unless the
                # connection is already over a limit (it is closing anyway).
                for good in exc.frames:
                    if self._backlog or self._over_limit():
                        break
                    self._dispatch(good)
            finally:
                self._batching = False
            self._flush_out()
            log.warning("ninep: %s: %s; closing", self.peer, exc)
            self.abort()
            return
        if not frames:
            return
        if self._backlog:
            self._backlog.extend(frames)
            return
        self._begin_batch()
        try:
            for i, frame in enumerate(frames):
                if self._over_limit():
                    # Keep the rest, in order, until the connection is under its limits.
                    self._backlog.extend(frames[i:])
                    self._pause_reading()
                    break
                self._dispatch(frame)
        finally:
            self._batching = False
        self._flush_out()

    def eof_received(self) -> bool | None:
        return None

    # ------------------------------------------------------------------ flow control

    def _begin_batch(self) -> None:
        self._batching = True
        self._sleeps_mark = _sleeps()

    def _over_limit(self) -> bool:
        return self.inflight >= self.limits.max_inflight or self._write_paused

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.lost:
            self._set_reading(False)

    def _set_reading(self, on: bool) -> None:
        # A transport without read flow control (or one already closing) simply keeps
        # reading; the limits then only hold back dispatch, through the backlog.
        self._read_paused = not on
        transport: Any = self.transport
        try:
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()
        except (AttributeError, NotImplementedError, RuntimeError):
            pass

    def _resume(self) -> None:
        """Dispatch the backlog while under the limits; read again once it is empty."""
        if self.lost or self._over_limit():
            return
        if self._backlog:
            self._begin_batch()
            try:
                while self._backlog and not self._over_limit() and not self.lost:
                    self._dispatch(self._backlog.popleft())
            finally:
                self._batching = False
            self._flush_out()
        if not self._backlog and self._read_paused and not self._over_limit():
            self._set_reading(True)

    def pause_writing(self) -> None:
        # The peer is not reading its replies: take no new work until it does.
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    # ------------------------------------------------------------------ output

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        if self.lost or self._writer is None:
            return
        if len(data) >= _BIG_REPLY:
            # Large payloads go out on their own (after what is queued before them).
            if self._out:
                self._flush_out()
            self._writer.write(data)
            return
        self._out.append(data)
        if not self._batching and not self._flush_due:
            # Replies finishing in the same loop iteration share one write.
            self._flush_due = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_due = False
        out = self._out
        if not out:
            return
        if self.lost or self._writer is None:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._writer.write(data)

    def _send(self, msg: Message) -> None:
        try:
            data = c.encode(msg)
        except c.ProtocolError as exc:  # a reply we cannot encode is a bug: say so
            log.error("ninep: cannot encode %r: %s", msg, exc)
            data = c.encode(c.Rlerror(errno.EIO, tag=msg.tag))
        self._emit(data)

    def _act(self) -> None:
        """Carry out what the session decided."""
        for action in self.session.take():
            if isinstance(action, Message):
                self._send(action)
            elif isinstance(action, Abort):
                # Its place is given back now; the scheduler skips it when it comes up.
                self.inflight -= 1
            elif isinstance(action, Close):
                log.warning("ninep: %s: %s; closing", self.peer, action.reason)
                self._flush_out()
                self.abort()
            else:  # a frame a fast handler laid out itself
                self._emit(action)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, frame: memoryview) -> None:
        session = self.session
        try:
            msg = c.decode(frame, views=True)
        except c.MessageError as exc:
            # An unknown type is "not supported" (Linux then falls back, as it does
            # from Trenameat to Trename); a malformed body is a protocol error.
            known = exc.type in c.MESSAGE_CLASSES
            session.reject(exc.tag, errno.EPROTO if known else errno.EOPNOTSUPP)
            self._act()
            return
        except c.ProtocolError:  # the framer checked the size: cannot happen
            self.abort()
            return
        req = session.receive(msg)
        if req is None:
            if isinstance(msg, c.Tversion):
                # Frames larger than the new msize end the connection from now on.
                self.msize = self.frames.max_size = session.msize
            self._act()
            return
        cls = type(msg)
        server = self.server
        handler: Handler | None = None
        if server.inline:
            fast = FAST.get(cls)
            if fast is not None and server._inline_ok(cls):
                # Run to completion before the next frame is looked at, so nothing can
                # abort it meanwhile: no Session.start() needed.
                self.self_timed = False
                t0 = time.perf_counter()
                try:
                    reply = fast(self, msg, req.fids)
                except Exception as exc:  # noqa: BLE001 - answered with its errno
                    reply = error_reply(exc, msg)
                took = time.perf_counter() - t0
                if took > INLINE_BUDGET and self._batching and not self.self_timed:
                    # The loop thread sleeps nowhere else within a batch, so a sleep
                    # since the batch began was this call waiting for the file system.
                    now = _sleeps()
                    if now != self._sleeps_mark:
                        server._demote(cls, took)
                        self._sleeps_mark = now
                if isinstance(reply, Defer):
                    handler = reply.handler
                elif reply is not None:
                    if session.answered_at_once(req):
                        if isinstance(reply, Message):
                            reply.tag = msg.tag
                            self._send(reply)
                        else:
                            self._emit(reply)
                    return
                # None or Defer: this one needs the pool after all (data not cached,
                # not a regular file...); it takes the ordinary path below.
        if handler is None:
            handler = HANDLERS.get(cls)
            if handler is None:
                session.complete(req, c.Rlerror(errno.EOPNOTSUPP, tag=msg.tag))
                self._act()
                return
        if isinstance(msg, c.Twrite) and isinstance(msg.data, memoryview):
            msg.data = bytes(msg.data)  # it may outlive this chunk in the pool path
        self.inflight += 1
        self._queue(req, handler)

    # ------------------------------------------------------------------ the pool path

    def _queue(self, req: Request, handler: Handler) -> None:
        """``req`` waits for a worker thread (abortable until it gets one)."""
        self._runq.append((req, handler))
        self.server._scheduler.wake(self)

    def has_waiting(self) -> bool:
        return bool(self._runq)

    def begin_next(self) -> bool:
        """Called by the scheduler with a thread free: give it the next waiting request."""
        while self._runq:
            req, handler = self._runq.popleft()
            if req.state is QUEUED:
                task = self._loop.create_task(self._serve(req, handler))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return True
        return False

    async def _serve(self, req: Request, handler: Handler) -> None:
        # Still abortable until this first step runs: a Tflush read in the same batch as
        # its target finds it queued, and the target then does nothing at all.
        if not self.session.start(req):
            self.server._scheduler.release(self)
            return
        try:
            reply = await self._answer(req, handler)
            self.session.complete(req, reply)
            self._act()
        finally:
            self._request_done()

    async def _answer(self, req: Request, handler: Handler) -> Reply:
        """Run ``handler`` on its thread; its reply, or the Rlerror for what it raised."""
        try:
            reply = await handler(self, req.msg, req.fids)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered with its errno
            reply = error_reply(exc, req.msg)
        finally:
            self.server._scheduler.release(self)
        if isinstance(reply, Message):
            reply.tag = req.tag
        return reply

    def _request_done(self) -> None:
        self.inflight -= 1
        self._maybe_finish_close()
        if self._backlog or self._read_paused:
            self._resume()
