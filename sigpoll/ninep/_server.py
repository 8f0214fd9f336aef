"""9P2000.L server: one asyncio protocol per connection, file system work in threads.

Request life cycle (the ``state`` of a :class:`Request`)::

    HELD ──► QUEUED ──► RUNNING ──► REPLYING ──► done
    (test hook)  (waiting for a worker)  (fs work)   (test hook, then the reply)

A Tflush whose target is HELD or QUEUED aborts it: the target's task is cancelled before
it touched the file system, the target gets no reply at all, and the Rflush follows.  A
target that is RUNNING or REPLYING cannot be taken back (the file system may already have
changed), so its own reply is sent first and the Rflush right after it -- the order
flush(5) asks for and the order QEMU's ``pdu_complete`` and diod use.  Every Tflush is
answered, including several for one tag (in arrival order), flushes of flushes, and a
flush naming itself or a tag that is not pending.

Replies leave in completion order, not request order; a slow file system call never
holds up the others.  Blocking calls go to a bounded thread pool; each is retried on
EINTR so an interrupted host call never turns into an error the client sees.

Fast path.  A handoff to the pool and back costs far more than a walk, a getattr or a
read from the page cache, so the cheap operations (walk, getattr, clunk, statfs,
readlink, lopen of a regular file or directory, read and write of a regular file) run
inline on the loop, and their replies are batched into one write per batch of frames.
They are kept honest three ways: reads ask the kernel first with ``RWF_NOWAIT`` and go
to the pool when the data is not in the page cache; an inline call that takes longer
than :data:`INLINE_BUDGET` sends that kind of operation to the pool for the next
:data:`DEMOTE_SECONDS`; and anything that might wait on another party (fifos, devices,
fsync, locks, readdir, creation) always goes to the pool.  An inline request is never
pending when the next frame is read, so a Tflush naming it finds nothing to wait for and
its Rflush follows its reply, as flush(5) asks.  With a :class:`ServerHook` installed (the
flush tests) or ``inline=False`` every request takes the pool path, where it can be held.

Limits (:class:`Limits`): fids per connection (EMFILE beyond it; Tclunk frees one),
requests in the pool path per connection and bytes queued for the peer (past either,
the connection stops reading -- backpressure, not an error -- until it drops again),
connections per server (a new one is closed at once, with a log line), and the msize
(the ``msize`` argument).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import pwd
import resource
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, Union

from . import _codec as c
from ._codec import Message, MessageError, ProtocolError
from ._fs import Export, Handle

__all__ = ["NinepServer", "ServerHook", "Request", "Limits", "DEFAULT_MSIZE",
           "INLINE_BUDGET", "DEMOTE_SECONDS"]

log = logging.getLogger("sigpoll.ninep")

DEFAULT_MSIZE = 512 * 1024
#: Smallest msize we agree to: room for a header, a qid walk and a useful read.
MIN_MSIZE = 4096
#: Bytes of Rread/Twrite overhead (size, type, tag, count) and Linux's P9_IOHDRSZ.
_RW_OVERHEAD = 11
_IOHDRSZ = 24

V9FS_MAGIC = 0x01021997

#: Seconds an inline call may take before its kind of operation is sent to the pool.
INLINE_BUDGET = 0.005
#: How long such a demotion lasts before the operation is tried inline again.
DEMOTE_SECONDS = 1.0
#: Largest Twrite done inline (bigger ones go to the pool).
_INLINE_WRITE_MAX = 256 * 1024
#: Replies at least this big are written on their own instead of joined into a batch
#: (joining would copy them once more for nothing).
_BIG_REPLY = 16 * 1024
# Rread is size[4] type[1] tag[2] count[4] data: the hot path lays it out itself so the
# data is read straight into the reply (the layout is the codec's; a test compares).
_S_RREAD = struct.Struct("<IBHI")
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
_S_SIZE = struct.Struct("<I")


# ---------------------------------------------------------------------------- hot wire
#
# The codec is general (a plan per message type, every field checked); that generality
# costs a few microseconds per message, as much as the file system call behind a
# getattr.  The handful of messages that make up nearly all traffic (Twalk, Tread,
# Twrite, Tgetattr, Tclunk and their replies, Rlerror) are fixed layouts, laid out here
# with one precompiled struct each.  Anything irregular falls back to the codec, which
# then gives the usual errors; tests/test_ninep_server.py checks both agree.

_S_TREAD = struct.Struct("<IBHIQI")      # size type tag fid offset count
_S_TWRITE = struct.Struct("<IBHIQI")     # size type tag fid offset count, then data
_S_TGETATTR = struct.Struct("<IBHIQ")    # size type tag fid request_mask
_S_TCLUNK = struct.Struct("<IBHI")       # size type tag fid
_S_TWALK = struct.Struct("<IBHIIH")      # size type tag fid newfid nwname, then names
_S_R0 = struct.Struct("<IBH")            # a reply with no body
_S_R32 = struct.Struct("<IBHI")          # a reply with one u32 (Rwrite, Rlerror)
# valid, qid, mode uid gid, then nlink rdev size blksize blocks, four times sec+nsec,
# gen and data_version: 15 u64s.
_S_RGETATTR = struct.Struct("<IBHQBIQIII" + "Q" * 15)
_S_RWALK = struct.Struct("<IBHH")
_S_QID = struct.Struct("<BIQ")


def _quick_decode(frame: bytes | memoryview) -> Message | None:
    """The hot T-messages without the codec's generality (None: use the codec)."""
    n = len(frame)
    if n < 11:
        return None
    mtype = frame[4]
    if mtype == 116 and n == 23:
        _, _, tag, fid, offset, count = _S_TREAD.unpack_from(frame)
        m = _new(c.Tread)
        m.fid, m.offset, m.count = fid, offset, count
    elif mtype == 118 and n >= 23:
        _, _, tag, fid, offset, count = _S_TWRITE.unpack_from(frame)
        if count != n - 23:
            return None
        m = _new(c.Twrite)
        # A view, not a copy: the frame is never modified (see _Frames); a request
        # that goes to the pool gets its own copy first (_dispatch).
        m.fid, m.offset, m.data = fid, offset, memoryview(frame)[23:]
    elif mtype == 110 and n >= 17:
        _, _, tag, fid, newfid, nw = _S_TWALK.unpack_from(frame)
        if nw > c.MAXWELEM:
            return None
        names = []
        pos = 17
        for _ in range(nw):
            if pos + 2 > n:
                return None
            ln = frame[pos] | frame[pos + 1] << 8
            pos += 2
            if pos + ln > n:
                return None
            names.append(bytes(frame[pos:pos + ln]).decode("utf-8", "surrogateescape"))
            pos += ln
        if pos != n:
            return None
        m = _new(c.Twalk)
        m.fid, m.newfid, m.wnames = fid, newfid, names
    elif mtype == 24 and n == 19:
        _, _, tag, fid, mask = _S_TGETATTR.unpack_from(frame)
        m = _new(c.Tgetattr)
        m.fid, m.request_mask = fid, mask
    elif mtype == 120 and n == 11:
        _, _, tag, fid = _S_TCLUNK.unpack_from(frame)
        m = _new(c.Tclunk)
        m.fid = fid
    else:
        return None
    m.tag = tag
    out: Message = m  # m is Any (see _new): type the result without a call (no cast)
    return out


def _new(cls: type[Message]) -> Any:
    # What Message.__init__ does, without its generic checks: fields are set by the caller.
    return cls.__new__(cls)


def _quick_encode(msg: Message) -> bytes | None:
    """The hot R-messages without the codec's generality (None: use the codec)."""
    t = msg.TYPE
    if t == 25:
        q = msg.qid
        return _S_RGETATTR.pack(
            _S_RGETATTR.size, 25, msg.tag, msg.valid, q[0], q[1], q[2], msg.mode, msg.uid,
            msg.gid, msg.nlink, msg.rdev, msg.size, msg.blksize, msg.blocks, msg.atime_sec,
            msg.atime_nsec, msg.mtime_sec, msg.mtime_nsec, msg.ctime_sec, msg.ctime_nsec,
            msg.btime_sec, msg.btime_nsec, msg.gen, msg.data_version)
    if t == 111:
        qids = msg.wqids
        if len(qids) > c.MAXWELEM:
            return None
        parts = [_S_RWALK.pack(_S_RWALK.size + 13 * len(qids), 111, msg.tag, len(qids))]
        parts.extend(_S_QID.pack(*q) for q in qids)
        return b"".join(parts)
    if t == 121:
        return _S_R0.pack(7, 121, msg.tag)
    if t == 119:
        return _S_R32.pack(11, 119, msg.tag, msg.count)
    if t == 7:
        return _S_R32.pack(11, 7, msg.tag, msg.ecode)
    return None


class _Frames:
    """Cuts the byte stream into frames, copying as little as possible.

    Whole frames inside one chunk from the transport are handed out as views of that
    chunk (``bytes``, never modified); only a frame split across chunks is assembled in
    a fresh ``bytearray``, which is never resized once a view of it exists.  A size
    field below the header or above ``max_size`` raises ``FramingError`` (with the whole
    frames that came before it), after which the stream is refused.
    """

    __slots__ = ("max_size", "_part", "_broken")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._part = bytearray()
        self._broken = False

    def __len__(self) -> int:
        return len(self._part)

    def _check(self, size: int, frames: list[memoryview]) -> None:
        if size < c.HEADER_SIZE or size > self.max_size:
            self._broken = True
            self._part = bytearray()
            raise c.FramingError(
                f"frame size {size} outside [{c.HEADER_SIZE}, {self.max_size}]",
                [bytes(f) for f in frames])

    def feed(self, data: bytes) -> list[memoryview]:
        if self._broken:
            raise c.FramingError("stream already failed to frame")
        frames: list[memoryview] = []
        view = memoryview(data)
        n = len(view)
        pos = 0
        part = self._part
        if part:
            # Finish the frame left over from the last chunk, copying only its bytes.
            if len(part) < 4:
                take = min(4 - len(part), n)
                part += view[:take]
                pos = take
                if len(part) < 4:
                    return frames
            (size,) = _S_SIZE.unpack_from(part)
            self._check(size, frames)
            take = min(size - len(part), n - pos)
            part += view[pos:pos + take]
            pos += take
            if len(part) < size:
                return frames
            frames.append(memoryview(part))
            self._part = bytearray()
        while n - pos >= 4:
            (size,) = _S_SIZE.unpack_from(view, pos)
            self._check(size, frames)
            if n - pos < size:
                break
            frames.append(view[pos:pos + size])
            pos += size
        if pos < n:
            self._part = bytearray(view[pos:])
        return frames



class _Defer:
    """Returned by a fast handler: take the pool path, with this handler."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[_Connection, Message], Awaitable[_Reply]]) -> None:
        self.handler = handler


def _sleeps() -> int:
    """Times this thread has gone to sleep of its own accord (blocked in a call) so far.

    An inline call over budget only counts as slow when this moved: a call that blocked
    on the disk sleeps, while one that was merely preempted on a busy machine does not.
    """
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


#: A reply: a message, or bytes already encoded (with their tag) by a fast path.
_Reply = Union[Message, bytes, bytearray, memoryview]

T = TypeVar("T")

HELD, QUEUED, RUNNING, REPLYING, DONE = "held", "queued", "running", "replying", "done"


class ServerHook(Protocol):
    """Test hook: awaited around each request so a test can hold one deterministically.

    ``before`` runs while the request is still abortable (a Tflush cancels it there);
    ``after`` runs once the file system work is done and the reply is decided (a Tflush
    then only queues its Rflush behind the reply).
    """

    async def before(self, request: Request) -> None: ...

    async def after(self, request: Request) -> None: ...


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


@dataclass(eq=False)
class Request:
    """One pending T-message on a connection."""

    tag: int
    msg: Message
    state: str = HELD
    task: asyncio.Task[None] | None = None
    #: Tags of the Tflush requests waiting on this one, in arrival order.
    flushers: list[int] = field(default_factory=list)
    #: The reply decided for it (None while running, or when aborted).
    reply: _Reply | None = None
    #: Its task has begun to run (a task cancelled before that never enters ``_run``).
    started: bool = False


@dataclass(eq=False)
class _Fid:
    handle: Handle | None
    uid: int
    open_fd: int | None = None
    dirents: list[c.Dirent] | None = None
    xattr: bytes | None = None
    # (name, declared size, flags, buffer) while a Txattrcreate fid is being written.
    xattr_new: tuple[str, int, int, bytearray] | None = None
    refs: int = 0
    clunked: bool = False
    #: The open file is a regular file (reads and writes may run inline).
    regular: bool = False
    #: The file system answers RWF_NOWAIT reads (tried until it says EOPNOTSUPP).
    nowait: bool = True

    def close(self) -> None:
        if self.open_fd is not None:
            os.close(self.open_fd)
            self.open_fd = None
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        self.dirents = None


class _Error(Exception):
    """An errno to answer with."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def _retry_eintr(fn: Callable[..., T], *args: Any) -> T:
    # PEP 475 already retries most calls, but one whose signal handler raised, or a
    # ctypes call, can still surface EINTR; a client must never see it as a result.
    while True:
        try:
            return fn(*args)
        except InterruptedError:
            continue


class NinepServer:
    """Serves one directory over 9P2000.L on any number of connections.

    ``root``: the directory to export.  ``read_only``: refuse every change with EROFS.
    ``squash_uid``/``squash_gid``: give new files to this user instead of the attaching
    one, and ignore chown requests.  ``msize``: the largest message we accept.
    ``workers``: threads for file system calls (and the bound on calls running at once).
    ``limits``: see :class:`Limits`.  ``inline``: run cheap calls on the loop (see the
    module docstring); turn it off for an export on a file system whose metadata calls
    may hang (a network file system), so that only pool threads ever wait on it.
    ``hook``: see :class:`ServerHook` (it turns the inline path off).

    Use :meth:`start_tcp`, :meth:`start_unix` or :meth:`serve_fds` inside a running
    loop; :meth:`close` ends everything.
    """

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False,
                 squash_uid: int | None = None, squash_gid: int | None = None,
                 msize: int = DEFAULT_MSIZE, workers: int = 8,
                 limits: Limits | None = None, inline: bool = True,
                 hook: ServerHook | None = None) -> None:
        if not isinstance(msize, int) or msize < MIN_MSIZE or msize > 0xFFFFFFFF:
            raise ValueError(f"msize must be an integer from {MIN_MSIZE} to 4294967295")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.export = Export(root, read_only=read_only, squash_uid=squash_uid,
                             squash_gid=squash_gid)
        self.msize = msize
        self.limits = limits if limits is not None else Limits()
        self.hook = hook
        self.inline = inline and hook is None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ninep-fs")
        self._workers = workers
        self._slots: asyncio.Semaphore | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
        # Message type -> time.monotonic() until which it runs in the pool, after an
        # inline call of that type went over INLINE_BUDGET.
        self._demoted: dict[int, float] = {}
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
        """Stop listening, drop every connection and release every fid and thread."""
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
        for conn in list(self.connections):
            await conn.closed
        self._pool.shutdown(wait=True)
        self.export.close()

    # ------------------------------------------------------------------ helpers

    def _slot(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._workers)
        return self._slots

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _retry_eintr, fn, *args)

    def _inline_ok(self, mtype: int) -> bool:
        until = self._demoted.get(mtype)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        del self._demoted[mtype]
        return True

    def _demote(self, mtype: int, took: float) -> None:
        log.debug("ninep: inline %d took %.1f ms; to the pool for %.1f s", mtype,
                  took * 1e3, DEMOTE_SECONDS)
        self._demoted[mtype] = time.monotonic() + DEMOTE_SECONDS


class _WriteSide(asyncio.Protocol):
    """Protocol of a separate write pipe: passes flow control on to the connection."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class _Connection(asyncio.Protocol):
    """State of one client connection: negotiated msize, fids, pending requests."""

    def __init__(self, server: NinepServer, peer: str) -> None:
        self.server = server
        self.fs = server.export
        self.limits = server.limits
        self.peer = peer
        self.msize = server.msize
        self.frames = _Frames(server.msize)
        self.transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self.fids: dict[int, _Fid] = {}
        self.pending: dict[int, Request] = {}
        self.versioned = False
        self.lost = False
        self.refused = False
        self._running = 0
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
        # Set by a fast handler whose call cannot wait (an RWF_NOWAIT read).
        self._self_timed = False
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()

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
            if t is not None and not t.is_closing():  # a closed pipe transport's abort() raises
                getattr(t, "abort", t.close)()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        self._out.clear()
        self._backlog.clear()
        if self._writer is not None and self._writer is not self.transport and not self._writer.is_closing():
            self._writer.close()
        if self.refused:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        log.info("ninep: connection from %s closed", self.peer)
        # Requests that have not reached the file system are dropped; running ones
        # finish in their threads and release their fids, after which all fids close.
        for req in list(self.pending.values()):
            if req.state in (HELD, QUEUED) and req.task is not None:
                req.task.cancel()
        self._maybe_finish_close()

    def _maybe_finish_close(self) -> None:
        if self.lost and self._running == 0 and not self.closed.done():
            for fid in self.fids.values():
                fid.clunked = True
                if fid.refs == 0:
                    fid.close()
            self.fids.clear()
            self.server.connections.discard(self)
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        try:
            frames = self.frames.feed(data)
        except c.FramingError as exc:
            self._batching = True
            self._sleeps_mark = _sleeps()
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
        self._batching = True
        self._sleeps_mark = _sleeps()
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

    def _over_limit(self) -> bool:
        return self._running >= self.limits.max_inflight or self._write_paused

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
            self._batching = True
            self._sleeps_mark = _sleeps()
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
        if self.lost or self._writer is None:
            return
        try:
            try:
                data = _quick_encode(msg)
            except struct.error:  # a value out of range: the codec says which
                data = None
            if data is None:
                data = c.encode(msg)
        except ProtocolError as exc:  # a reply we cannot encode is a bug: say so
            log.error("ninep: cannot encode %r: %s", msg, exc)
            data = c.encode(c.Rlerror(errno.EIO, tag=msg.tag))
        self._emit(data)

    def _send_reply(self, reply: _Reply) -> None:
        if isinstance(reply, Message):
            self._send(reply)
        else:
            self._emit(reply)

    def _error(self, tag: int, err: int) -> None:
        self._send(c.Rlerror(err, tag=tag))

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, frame: bytes | memoryview) -> None:
        try:
            msg = _quick_decode(frame) or c.decode(frame)
        except MessageError as exc:
            if exc.tag is None:
                return
            # An unknown type is "not supported" (Linux then falls back, as it does
            # from Trenameat to Trename); a malformed body is a protocol error.
            known = exc.type in c.MESSAGE_CLASSES
            self._error(exc.tag, errno.EPROTO if known else errno.EOPNOTSUPP)
            return
        except ProtocolError:
            self.abort()
            return
        mtype = msg.TYPE
        if mtype % 2 == 1 or mtype == 6:
            # An R-message sent to a server: answer it as unsupported.
            self._error(msg.tag, errno.EOPNOTSUPP)
            return
        if mtype == 100:
            self._version(msg)
            return
        if not self.versioned:
            self._error(msg.tag, errno.EPROTO)
            return
        if mtype == 108:
            self._flush(msg)
            return
        if msg.tag in self.pending:
            # A tag that is still in flight: the client broke the rules.  Any reply with
            # that tag would be matched to the earlier request, so refuse it loudly.
            log.warning("ninep: %s reused pending tag %d", self.peer, msg.tag)
            self._error(msg.tag, errno.EBADMSG)
            return
        handler = _HANDLERS.get(mtype)
        if handler is None:
            self._error(msg.tag, errno.EOPNOTSUPP)
            return
        server = self.server
        if server.inline:
            fast = _FAST.get(mtype)
            if fast is not None and server._inline_ok(mtype):
                self._self_timed = False
                t0 = time.perf_counter()
                reply = self._run_fast(fast, msg)
                took = time.perf_counter() - t0
                if took > INLINE_BUDGET and self._batching and not self._self_timed:
                    # The loop thread sleeps nowhere else within a batch, so a sleep
                    # since the batch began was this call waiting for the file system.
                    now = _sleeps()
                    if now != self._sleeps_mark:
                        server._demote(mtype, took)
                        self._sleeps_mark = now
                if isinstance(reply, _Defer):
                    handler = reply.handler
                elif reply is not None:
                    self._send_reply(reply)
                    return
                # None or _Defer: this one needs the pool after all (data not cached,
                # not a regular file...); it takes the ordinary path below.
        if mtype == 118 and isinstance(msg.data, memoryview):
            wmsg: Any = msg
            wmsg.data = bytes(msg.data)  # it may outlive this chunk in the pool path
        req = Request(msg.tag, msg)
        self.pending[msg.tag] = req
        self._running += 1
        req.task = self._loop.create_task(self._run(req, handler))

        def cancelled_unstarted(task: asyncio.Task[None], req: Request = req) -> None:
            self._cancelled_unstarted(req)

        req.task.add_done_callback(cancelled_unstarted)

    def _run_fast(self, fast: _Fast, msg: Message) -> _Reply | _Defer | None:
        try:
            reply = fast(self, msg)
        except _Error as exc:
            return c.Rlerror(exc.errno, tag=msg.tag)
        except OSError as exc:
            return c.Rlerror(exc.errno or errno.EIO, tag=msg.tag)
        except ProtocolError as exc:
            return c.Rlerror(exc.errno, tag=msg.tag)
        except Exception:  # a bug must not kill the connection
            log.exception("ninep: %s failed", type(msg).__name__)
            return c.Rlerror(errno.EIO, tag=msg.tag)
        if isinstance(reply, Message):
            reply.tag = msg.tag
        return reply

    def _version(self, msg: Message) -> None:
        # Tversion starts a new session: everything pending is abandoned and every fid
        # released (the client will not be waiting for those replies).
        for req in list(self.pending.values()):
            if req.state in (HELD, QUEUED) and req.task is not None:
                req.task.cancel()
        self.pending.clear()
        for fid in self.fids.values():
            fid.clunked = True
            if fid.refs == 0:
                fid.close()
        self.fids.clear()
        if msg.msize < MIN_MSIZE:
            # Too small to carry a directory read: say no by the version string.
            self._send(c.Rversion(self.server.msize, "unknown", tag=msg.tag))
            self.versioned = False
            return
        self.msize = min(msg.msize, self.server.msize)
        if not msg.version.startswith(c.VERSION_9P2000L):
            self._send(c.Rversion(self.msize, "unknown", tag=msg.tag))
            self.versioned = False
            return
        self.frames.max_size = self.msize
        self.versioned = True
        self._send(c.Rversion(self.msize, c.VERSION_9P2000L, tag=msg.tag))

    def _flush(self, msg: Message) -> None:
        target = self.pending.get(msg.oldtag)
        if target is None:
            # Nothing pending under that tag (already answered, never sent, or the flush
            # names itself): the flush is trivially done.
            self._send(c.Rflush(tag=msg.tag))
            return
        target.flushers.append(msg.tag)
        if msg.tag not in self.pending:
            # Registered so that a later Tflush can name this one; its Rflush goes out
            # when its target is finished.
            self.pending[msg.tag] = Request(msg.tag, msg, state=RUNNING)
        if target.state in (HELD, QUEUED) and target.task is not None:
            target.task.cancel()

    def _finish(self, req: Request, reply: _Reply | None) -> None:
        """Send ``reply`` (None: aborted, say nothing), then the Rflush of each flusher."""
        if self.pending.get(req.tag) is req:
            del self.pending[req.tag]
        req.state = DONE
        if reply is not None:
            self._send_reply(reply)
        for ftag in req.flushers:
            freq = self.pending.get(ftag)
            if freq is not None and freq.msg.TYPE == 108:
                self._finish(freq, c.Rflush(tag=ftag))
            elif freq is None:
                self._send(c.Rflush(tag=ftag))
            else:
                # The flush's tag collided with another pending request; answer the
                # flush and leave that request alone.
                self._send(c.Rflush(tag=ftag))

    def _cancelled_unstarted(self, req: Request) -> None:
        # A Tflush, a Tversion or a lost connection in the same read as its target cancels
        # the target's task before its first step, and then none of _run's clean-up runs:
        # without this the flush would never be answered and the connection never close.
        if not req.started:
            self._finish(req, None)
            self._request_done()

    def _request_done(self) -> None:
        self._running -= 1
        self._maybe_finish_close()
        if self._backlog or self._read_paused:
            self._resume()

    async def _run(self, req: Request, handler: _Handler) -> None:
        req.started = True
        try:
            try:
                if self.server.hook is not None:
                    await self.server.hook.before(req)
                req.state = QUEUED
                slots = self.server._slot()
                await slots.acquire()
            except asyncio.CancelledError:
                # Aborted by Tflush, Tversion or a lost connection before touching
                # anything: no reply at all.
                self._finish(req, None)
                return
            try:
                req.state = RUNNING
                try:
                    reply = await handler(self, req.msg)
                except _Error as exc:
                    reply = c.Rlerror(exc.errno, tag=req.tag)
                except OSError as exc:
                    reply = c.Rlerror(exc.errno or errno.EIO, tag=req.tag)
                except ProtocolError as exc:
                    reply = c.Rlerror(exc.errno, tag=req.tag)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not kill the connection
                    log.exception("ninep: %s failed", type(req.msg).__name__)
                    reply = c.Rlerror(errno.EIO, tag=req.tag)
            finally:
                slots.release()
            if isinstance(reply, Message):
                reply.tag = req.tag
            req.reply = reply
            req.state = REPLYING
            if self.server.hook is not None:
                await asyncio.shield(self.server.hook.after(req))
            self._finish(req, reply)
        finally:
            self._request_done()

    # ------------------------------------------------------------------ fid helpers

    def _take(self, fid: int) -> _Fid:
        """Borrow a fid for the duration of a request (its fds stay open meanwhile)."""
        f = self.fids.get(fid)
        if f is None or f.clunked:
            raise _Error(errno.EBADF)
        f.refs += 1
        return f

    @contextlib.contextmanager
    def _borrowed(self, fid: int) -> Iterator[_Fid]:
        """``with conn._borrowed(fid) as f:`` -- :meth:`_take` for the block's duration."""
        f = self._take(fid)
        try:
            yield f
        finally:
            self._give_back(f)

    def _give_back(self, f: _Fid) -> None:
        f.refs -= 1
        if f.refs == 0 and f.clunked:
            f.close()

    def _drop(self, fid: int) -> _Fid | None:
        f = self.fids.pop(fid, None)
        if f is not None:
            f.clunked = True
            if f.refs == 0:
                f.close()
        return f

    def _handle(self, f: _Fid) -> Handle:
        if f.handle is None:
            raise _Error(errno.EBADF)
        return f.handle

    def _check_new(self, fid: int) -> None:
        if fid in self.fids or fid == c.NOFID:
            raise _Error(errno.EBADF)
        if len(self.fids) >= self.limits.max_fids:
            raise _Error(errno.EMFILE)

    def _install(self, fid: int, f: _Fid) -> None:
        """Add a new fid, or close it and raise when that is no longer possible (the
        connection went away, the number was taken or the cap was reached meanwhile)."""
        if fid in self.fids or self.lost or fid == c.NOFID:
            f.close()
            raise _Error(errno.EBADF)
        if len(self.fids) >= self.limits.max_fids:
            f.close()
            raise _Error(errno.EMFILE)
        self.fids[fid] = f

    def _iounit(self) -> int:
        return self.msize - _IOHDRSZ


# ---------------------------------------------------------------------------- handlers

_Handler = Callable[[_Connection, Message], Awaitable[_Reply]]
_HANDLERS: dict[int, _Handler] = {}
#: Inline versions: return the reply, or None to take the pool path after all.
_Fast = Callable[[_Connection, Message], Union[_Reply, _Defer, None]]
_FAST: dict[int, _Fast] = {}


def _fast(mtype: int) -> Callable[[_Fast], _Fast]:
    def deco(fn: _Fast) -> _Fast:
        _FAST[mtype] = fn
        return fn

    return deco


def _handles(mtype: int) -> Callable[[_Handler], _Handler]:
    def deco(fn: _Handler) -> _Handler:
        _HANDLERS[mtype] = fn
        return fn

    return deco


def _uid_for(uname: str, n_uname: int) -> int:
    if n_uname != c.NONUNAME:
        return n_uname
    try:
        return pwd.getpwnam(uname).pw_uid
    except KeyError:
        return 65534


@_handles(102)
async def _auth(conn: _Connection, m: Message) -> Message:
    # No authentication: ENOENT is the answer diod's own clients take to mean "attach
    # without an afid" (any other errno makes them give up).
    raise _Error(errno.ENOENT)


@_handles(104)
async def _attach(conn: _Connection, m: Message) -> Message:
    if m.afid != c.NOFID:
        raise _Error(errno.EINVAL)
    conn._check_new(m.fid)
    fs = conn.fs
    # The aname may be the export's own path, or a directory inside it.
    aname = m.aname
    root = fs.root_path.rstrip("/") or "/"
    if aname == root or aname.rstrip("/") == root:
        rel = ""
    elif aname.startswith(root + "/"):
        rel = aname[len(root) + 1:]
    else:
        rel = aname
    names = [n for n in rel.split("/") if n and n != "."]

    def go() -> tuple[Handle, c.Qid]:
        h = fs.root()
        try:
            for name in names:
                nxt = fs.walk1(h, name)
                h.close()
                h = nxt
            st = fs.stat(h)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "aname is not a directory")
            return h, fs.qid(st)
        except BaseException:
            h.close()
            raise

    h, qid = await conn.server._call(go)
    conn._install(m.fid, _Fid(h, _uid_for(m.uname, m.n_uname)))
    return c.Rattach(qid)


def _walk_work(fs: Export, start: Handle,
               wnames: list[str]) -> tuple[Handle | None, list[c.Qid], OSError | None]:
    if not wnames:
        return fs.clone(start), [], None
    # Each step opens the next handle from the one before; only the handles this walk
    # made are closed (``start`` belongs to the fid).
    h = start
    qids: list[c.Qid] = []
    try:
        for name in wnames:
            try:
                nxt = _retry_eintr(fs.walk1, h, name)
            except OSError as exc:
                if h is not start:
                    h.close()
                return None, qids, exc
            if h is not start:
                h.close()
            h = nxt
            qids.append(fs.qid(_retry_eintr(fs.stat, h)))
    except BaseException:
        if h is not start:
            h.close()
        raise
    return h, qids, None


def _rwalk(tag: int, qids: list[c.Qid]) -> bytes:
    parts = [_S_RWALK.pack(_S_RWALK.size + 13 * len(qids), 111, tag, len(qids))]
    parts.extend(_S_QID.pack(*q) for q in qids)
    return b"".join(parts)


def _walk_done(conn: _Connection, m: Message, f: _Fid, h: Handle | None,
               qids: list[c.Qid], err: OSError | None) -> bytes:
    if h is None:
        if not qids:
            assert err is not None
            raise err
        return _rwalk(m.tag, qids)  # partial walk: newfid is not created
    if conn.lost:
        h.close()
        raise _Error(errno.EBADF)
    if m.newfid == m.fid:
        old = conn.fids.get(m.fid)
        if old is not None and not old.clunked:
            # Replace the handle in place; a concurrent user keeps the old one alive.
            conn._drop(m.fid)
            conn.fids[m.fid] = _Fid(h, old.uid)
        else:
            h.close()
            raise _Error(errno.EBADF)
    else:
        conn._install(m.newfid, _Fid(h, f.uid))
    return _rwalk(m.tag, qids)  # at most MAXWELEM qids: the codec checked the Twalk


@_handles(110)
async def _walk(conn: _Connection, m: Message) -> _Reply:
    with conn._borrowed(m.fid) as f:
        if m.newfid != m.fid:
            conn._check_new(m.newfid)
        # Walking from an open fid is allowed (diodls lists a directory that way); the
        # walk only uses the O_PATH handle, never the open file.
        start = conn._handle(f)
        h, qids, err = await conn.server._call(_walk_work, conn.fs, start, m.wnames)
    return _walk_done(conn, m, f, h, qids, err)


@_fast(110)
def _walk_fast(conn: _Connection, m: Message) -> _Reply:
    # try/finally, not _borrowed(): the inline path saves the generator.
    f = conn._take(m.fid)
    try:
        if m.newfid != m.fid:
            conn._check_new(m.newfid)
        h, qids, err = _walk_work(conn.fs, conn._handle(f), m.wnames)
    finally:
        conn._give_back(f)
    return _walk_done(conn, m, f, h, qids, err)


@_handles(12)
async def _lopen(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        if f.open_fd is not None or f.xattr is not None:
            raise _Error(errno.EBUSY)
        h = conn._handle(f)
        fs = conn.fs

        def go() -> tuple[int, os.stat_result]:
            fd = fs.open(h, m.flags)
            try:
                return fd, os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise

        fd, st = await conn.server._call(go)
        return _lopen_done(conn, f, fd, st)


def _lopen_done(conn: _Connection, f: _Fid, fd: int, st: os.stat_result) -> Message:
    if f.clunked or f.open_fd is not None:
        os.close(fd)
        raise _Error(errno.EBADF)
    f.open_fd = fd
    f.regular = stat.S_ISREG(st.st_mode)
    return c.Rlopen(conn.fs.qid(st), conn._iounit())


@_fast(12)
def _lopen_fast(conn: _Connection, m: Message) -> Message | None:
    # try/finally, not _borrowed(): the inline path saves the generator.
    f = conn._take(m.fid)
    try:
        if f.open_fd is not None or f.xattr is not None:
            raise _Error(errno.EBUSY)
        h = conn._handle(f)
        # Only files whose open cannot wait for another party (a fifo's open waits for
        # its other end, a device's open may do anything): those go to the pool.
        mode = _retry_eintr(conn.fs.stat, h).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return None
        fd = _retry_eintr(conn.fs.open, h, m.flags)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return _lopen_done(conn, f, fd, st)
    finally:
        conn._give_back(f)


@_handles(14)
async def _lcreate(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        if f.open_fd is not None:
            raise _Error(errno.EBUSY)
        d = conn._handle(f)
        fs = conn.fs

        def go() -> tuple[Handle, int, os.stat_result]:
            h, fd = fs.create(d, m.name, m.flags, m.mode, f.uid, m.gid)
            try:
                return h, fd, os.fstat(fd)
            except BaseException:
                h.close()
                os.close(fd)
                raise

        h, fd, st = await conn.server._call(go)
        if f.clunked:
            h.close()
            os.close(fd)
            raise _Error(errno.EBADF)
        # Tlcreate turns the directory fid into the new, open file.
        old = f.handle
        f.handle = h
        f.open_fd = fd
        f.regular = stat.S_ISREG(st.st_mode)
        if old is not None:
            old.close()
        return c.Rlcreate(fs.qid(st), conn._iounit())


def _simple(mtype: int, reply: Callable[..., Message], fids: tuple[str, ...],
            work: Callable[..., Any], inline: bool = False) -> None:
    """Register a handler: borrow the named fids, run ``work`` in a thread, reply.

    ``inline``: ``work`` is cheap enough to also get an inline version.
    """

    def borrow(conn: _Connection, m: Message) -> list[_Fid]:
        # The fids ``m`` names, borrowed together (each with a handle), or none of them.
        taken: list[_Fid] = []
        try:
            for name in fids:
                taken.append(conn._take(getattr(m, name)))
            for f in taken:
                conn._handle(f)
        except BaseException:
            give_back(conn, taken)
            raise
        return taken

    def give_back(conn: _Connection, taken: list[_Fid]) -> None:
        for f in taken:
            conn._give_back(f)

    def answer(result: Any) -> Message:
        return reply(*result) if isinstance(result, tuple) else reply()

    async def handler(conn: _Connection, m: Message) -> Message:
        taken = borrow(conn, m)
        try:
            result = await conn.server._call(work, conn, m, *taken)
        finally:
            give_back(conn, taken)
        return answer(result)

    _HANDLERS[mtype] = handler
    if not inline:
        return

    def fast(conn: _Connection, m: Message) -> Message:
        taken = borrow(conn, m)
        try:
            result = _retry_eintr(work, conn, m, *taken)
        finally:
            give_back(conn, taken)
        return answer(result)

    _FAST[mtype] = fast


def _w_symlink(conn: _Connection, m: Message, d: _Fid) -> tuple[c.Qid]:
    st = conn.fs.symlink(d.handle, m.name, m.symtgt, d.uid, m.gid)  # type: ignore[arg-type]
    return (conn.fs.qid(st),)


def _w_mknod(conn: _Connection, m: Message, d: _Fid) -> tuple[c.Qid]:
    st = conn.fs.mknod(d.handle, m.name, m.mode, m.major, m.minor,  # type: ignore[arg-type]
                       d.uid, m.gid)
    return (conn.fs.qid(st),)


def _w_mkdir(conn: _Connection, m: Message, d: _Fid) -> tuple[c.Qid]:
    st = conn.fs.mkdir(d.handle, m.name, m.mode, d.uid, m.gid)  # type: ignore[arg-type]
    return (conn.fs.qid(st),)


def _w_readlink(conn: _Connection, m: Message, f: _Fid) -> tuple[str]:
    return (conn.fs.readlink(f.handle),)  # type: ignore[arg-type]


def _w_getattr(conn: _Connection, m: Message, f: _Fid) -> tuple[Any, ...]:
    st = conn.fs.stat(f.handle)  # type: ignore[arg-type]
    return (
        c.GETATTR_BASIC, conn.fs.qid(st), st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
        st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
        st.st_atime_ns // 10**9, st.st_atime_ns % 10**9,
        st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9,
        st.st_ctime_ns // 10**9, st.st_ctime_ns % 10**9,
        0, 0, 0, 0,
    )


def _w_setattr(conn: _Connection, m: Message, f: _Fid) -> None:
    conn.fs.setattr(f.handle, m.valid, m.mode, m.uid, m.gid, m.size,  # type: ignore[arg-type]
                    (m.atime_sec, m.atime_nsec), (m.mtime_sec, m.mtime_nsec))


def _w_statfs(conn: _Connection, m: Message, f: _Fid) -> tuple[int, ...]:
    v = conn.fs.statfs(f.handle)  # type: ignore[arg-type]
    return (V9FS_MAGIC, v.f_bsize, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files,
            v.f_ffree, v.f_fsid, v.f_namemax)


def _w_rename(conn: _Connection, m: Message, f: _Fid, d: _Fid) -> None:
    newpath = conn.fs.rename(f.handle, d.handle, m.name)  # type: ignore[arg-type]
    if f.handle is not None:
        f.handle.path = newpath


def _w_renameat(conn: _Connection, m: Message, od: _Fid, nd: _Fid) -> None:
    conn.fs.renameat(od.handle, m.oldname, nd.handle, m.newname)  # type: ignore[arg-type]


def _w_unlinkat(conn: _Connection, m: Message, d: _Fid) -> None:
    conn.fs.unlinkat(d.handle, m.name, m.flags)  # type: ignore[arg-type]


def _w_link(conn: _Connection, m: Message, d: _Fid, f: _Fid) -> None:
    conn.fs.link(d.handle, f.handle, m.name)  # type: ignore[arg-type]


def _w_fsync(conn: _Connection, m: Message, f: _Fid) -> None:
    if f.open_fd is None:
        raise OSError(errno.EBADF, "not open")
    if m.datasync:
        os.fdatasync(f.open_fd)
    else:
        os.fsync(f.open_fd)


def _w_lock(conn: _Connection, m: Message, f: _Fid) -> tuple[int]:
    if f.open_fd is None:
        raise OSError(errno.EBADF, "not open")
    # Never block a worker: a contended lock answers BLOCKED and the client retries.
    ok = conn.fs.lock(f.open_fd, m.type, m.start, m.length)
    return (c.LOCK_SUCCESS if ok else c.LOCK_BLOCKED,)


def _w_getlock(conn: _Connection, m: Message, f: _Fid) -> tuple[Any, ...]:
    if f.open_fd is None:
        raise OSError(errno.EBADF, "not open")
    t, s, n = conn.fs.getlock(f.open_fd, m.type, m.start, m.length)
    return (t, s, n, m.proc_id, m.client_id)


_simple(16, c.Rsymlink, ("fid",), _w_symlink)
_simple(18, c.Rmknod, ("dfid",), _w_mknod)
_simple(72, c.Rmkdir, ("dfid",), _w_mkdir)
_simple(22, c.Rreadlink, ("fid",), _w_readlink, inline=True)
_simple(24, c.Rgetattr, ("fid",), _w_getattr)


@_fast(24)
def _getattr_fast(conn: _Connection, m: Message) -> _Reply | None:
    # _w_getattr's reply, laid out directly (see "hot wire" above).  try/finally, not
    # _borrowed(): the inline path saves the generator.
    f = conn._take(m.fid)
    try:
        st = _retry_eintr(conn.fs.stat, conn._handle(f))
    finally:
        conn._give_back(f)
    q = conn.fs.qid(st)
    a, m_, c_ = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    try:
        return _S_RGETATTR.pack(
            _S_RGETATTR.size, 25, m.tag, c.GETATTR_BASIC, q[0], q[1], q[2], st.st_mode,
            st.st_uid, st.st_gid, st.st_nlink, st.st_rdev, st.st_size, st.st_blksize,
            st.st_blocks, a // 10**9, a % 10**9, m_ // 10**9, m_ % 10**9, c_ // 10**9,
            c_ % 10**9, 0, 0, 0, 0)
    except struct.error:
        return None  # a value that does not fit (a time before 1970): the codec's path
_simple(26, c.Rsetattr, ("fid",), _w_setattr)
_simple(8, c.Rstatfs, ("fid",), _w_statfs, inline=True)
_simple(20, c.Rrename, ("fid", "dfid"), _w_rename)
_simple(74, c.Rrenameat, ("olddirfid", "newdirfid"), _w_renameat)
_simple(76, c.Runlinkat, ("dirfid",), _w_unlinkat)
_simple(70, c.Rlink, ("dfid", "fid"), _w_link)
_simple(50, c.Rfsync, ("fid",), _w_fsync)
_simple(52, c.Rlock, ("fid",), _w_lock)
_simple(54, c.Rgetlock, ("fid",), _w_getlock)


@_handles(116)
async def _read(conn: _Connection, m: Message) -> _Reply:
    return await _read_rest(conn, m, None, 0)


async def _read_rest(conn: _Connection, m: Message, buf: bytearray | None,
                     got: int) -> _Reply:
    """Read in a worker; ``buf`` may already hold the first ``got`` bytes."""
    with conn._borrowed(m.fid) as f:
        count = min(m.count, conn.msize - _RW_OVERHEAD)
        if f.xattr is not None:
            return c.Rread(f.xattr[m.offset:m.offset + count])
        if f.open_fd is None:
            raise _Error(errno.EBADF)
        if buf is None:
            buf = _rread_frame(count)
        n = await conn.server._call(_pread_into, f.open_fd, buf, got, count, m.offset,
                                    f.regular)
        return _rread_seal(buf, m.tag, n)


def _pread_into(fd: int, buf: bytearray, got: int, count: int, offset: int,
                regular: bool) -> int:
    view = memoryview(buf)[_S_RREAD.size:_S_RREAD.size + count]
    try:
        while got < count:
            try:
                n = _retry_eintr(os.preadv, fd, [view[got:]], offset + got)
            except OSError as exc:
                if exc.errno != errno.ESPIPE or regular:
                    raise
                # A fifo or a character device has no offsets: read it as a stream.
                n = _retry_eintr(os.readv, fd, [view[got:]])
            got += n
            # A regular file reads short only at its end; anything else (a fifo, a
            # device) answers with what one read gave, as a local read would.
            if n == 0 or not regular:
                break
    finally:
        view.release()
    return got


@_handles(118)
async def _write(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        if f.xattr_new is not None:
            name, size, flags, buf = f.xattr_new
            end = m.offset + len(m.data)
            if end > size:
                raise _Error(errno.ENOSPC)
            if len(buf) < end:
                buf.extend(bytes(end - len(buf)))
            buf[m.offset:end] = m.data
            return c.Rwrite(len(m.data))
        if f.open_fd is None:
            raise _Error(errno.EBADF)
        n = await conn.server._call(_pwrite, f.open_fd, m.data, m.offset, f.regular)
        return c.Rwrite(n)


def _rread_frame(count: int) -> bytearray:
    """A zeroed Rread frame with room for ``count`` bytes; :func:`_rread_seal` writes
    the header once the real count is known."""
    return bytearray(_S_RREAD.size + count)


def _rread_seal(buf: bytearray, tag: int, n: int) -> memoryview:
    _S_RREAD.pack_into(buf, 0, _S_RREAD.size + n, 117, tag, n)
    return memoryview(buf)[:_S_RREAD.size + n]


@_fast(116)
def _read_fast(conn: _Connection, m: Message) -> _Reply | _Defer | None:
    f = conn.fids.get(m.fid)
    if f is None or f.clunked or f.open_fd is None or not f.regular or f.xattr is not None:
        return None  # errors and the rarer cases are the pool path's business
    fd = f.open_fd
    count = min(m.count, conn.msize - _RW_OVERHEAD)
    buf = _rread_frame(count)
    view = memoryview(buf)[_S_RREAD.size:]
    try:
        while True:
            try:
                if f.nowait and _RWF_NOWAIT:
                    # Only what the page cache holds, never waiting for the disk; so
                    # this call needs no timing (see _dispatch).
                    conn._self_timed = True
                    n = os.preadv(fd, [view], m.offset, _RWF_NOWAIT)
                    if n < count and m.offset + n < os.fstat(fd).st_size:
                        # Only part of it is cached: a worker reads the rest.
                        return _Defer(lambda conn, m: _read_rest(conn, m, buf, n))
                else:
                    n = os.preadv(fd, [view], m.offset)
                break
            except InterruptedError:
                continue
            except BlockingIOError:
                # Not cached: a worker thread waits for the disk instead.
                return _Defer(lambda conn, m: _read_rest(conn, m, buf, 0))
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP or not f.nowait:
                    raise
                # No RWF_NOWAIT on this file system (tmpfs): plain reads, timed.
                f.nowait = False
                conn._self_timed = False
    finally:
        view.release()
    return _rread_seal(buf, m.tag, n)


@_fast(118)
def _write_fast(conn: _Connection, m: Message) -> _Reply | None:
    f = conn.fids.get(m.fid)
    if (f is None or f.clunked or f.open_fd is None or not f.regular
            or f.xattr_new is not None or len(m.data) > _INLINE_WRITE_MAX):
        return None
    return _S_R32.pack(11, 119, m.tag, _retry_eintr(os.pwrite, f.open_fd, m.data, m.offset))


@_fast(120)
def _clunk_fast(conn: _Connection, m: Message) -> _Reply | None:
    f = conn.fids.get(m.fid)
    if f is None or f.xattr_new is not None:
        return None  # an error, or an xattr to set: the pool path
    with conn._borrowed(m.fid) as f:
        conn._drop(m.fid)
    return _S_R0.pack(7, 121, m.tag)


def _pwrite(fd: int, data: bytes, offset: int, regular: bool) -> int:
    try:
        return os.pwrite(fd, data, offset)
    except OSError as exc:
        if exc.errno != errno.ESPIPE or regular:
            raise
        return os.write(fd, data)  # a fifo or a character device has no offsets


@_handles(40)
async def _readdir(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        if f.open_fd is None:
            raise _Error(errno.EBADF)
        h = conn._handle(f)
        if m.offset == 0 or f.dirents is None:
            # A fresh listing at offset 0; later offsets index into that snapshot so a
            # directory changing under a reader never repeats or skips entries.
            f.dirents = await conn.server._call(conn.fs.readdir, f.open_fd, h)
        entries = f.dirents[m.offset:] if m.offset < len(f.dirents) else []
        limit = min(m.count, conn.msize - _RW_OVERHEAD)
        data, _ = c.encode_dirents(entries, limit)
        return c.Rreaddir(data)


@_handles(120)
async def _clunk(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        conn._drop(m.fid)
        if f.xattr_new is not None:
            name, size, flags, buf = f.xattr_new
            f.xattr_new = None
            if len(buf) != size:
                raise _Error(errno.EINVAL)
            h = conn._handle(f)
            value = bytes(buf) if size or not flags & 2 else None
            await conn.server._call(conn.fs.setxattr, h, name, value, flags)
        return c.Rclunk()


@_handles(122)
async def _remove(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        # The fid is clunked whether or not the remove succeeds (9P's rule).
        conn._drop(m.fid)
        await conn.server._call(conn.fs.remove, conn._handle(f))
        return c.Rremove()


@_handles(30)
async def _xattrwalk(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        conn._check_new(m.newfid)
        h = conn._handle(f)
        value = await conn.server._call(conn.fs.getxattr, h, m.name)
        if m.newfid in conn.fids or conn.lost:
            raise _Error(errno.EBADF)
        conn._install(m.newfid, _Fid(conn.fs.clone(h), f.uid, xattr=value))
        return c.Rxattrwalk(len(value))


@_handles(32)
async def _xattrcreate(conn: _Connection, m: Message) -> Message:
    with conn._borrowed(m.fid) as f:
        if conn.fs.read_only:
            raise _Error(errno.EROFS)
        if m.attr_size > 64 * 1024:
            raise _Error(errno.E2BIG)
        # The value arrives in Twrites on this fid and is applied when it is clunked.
        f.xattr_new = (m.name, m.attr_size, m.flags, bytearray())
        return c.Rxattrcreate()
