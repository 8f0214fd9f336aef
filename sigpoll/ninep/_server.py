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

Bounds (:class:`Limits`; docs/reliability.md gives each as a formula, with its test).
Every request is charged against its connection's and the server's memory budget before
it is taken off the wire: its frame, its reply's worst case, and then the reply itself
until the kernel has taken it; a connection over either budget stops reading
(backpressure, not an error) until bytes come back.  Fids hold descriptors, counted per
connection and per server against budgets derived from RLIMIT_NOFILE (EMFILE/ENFILE past
them).  Connections are capped per server and per peer; one that has not negotiated a
version within ``version_timeout`` is closed; a peer gets at most its share of the worker
threads; nothing a peer does makes :meth:`NinepServer.close` wait more than
:data:`CLOSE_WAIT` seconds.
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
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .._devices import DeviceWatcher
from . import _codec as c
from ._budget import Account, Budget, PeerShare
from ._codec import Message
from ._fs import Export
from ._handlers import FAST, HANDLERS, Defer, FileFid, Handler, error_reply, retry_eintr
from ._pool import Scheduler, WorkerPool
from ._session import MIN_MSIZE, QUEUED, Abort, Close, Reply, Request, Session

__all__ = ["NinepServer", "Limits", "DEFAULT_MSIZE", "MIN_MSIZE", "INLINE_BUDGET",
           "DEMOTE_SECONDS", "CLOSE_WAIT", "REQUEST_OVERHEAD", "FD_RESERVE", "fd_limit"]

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
#: A batch of replies is written once it holds this many bytes (joining copies it, so a
#: larger batch would briefly take twice its size).
_BATCH_MAX = 256 * 1024
#: Bytes charged per request besides its frame and reply: the Python objects that stand
#: for it while it is in flight (message, request, task), measured at well under this.
REQUEST_OVERHEAD = 1024
#: Fds kept out of the fid budget: listeners, connections' sockets, the event loop's own,
#: and the few a running call opens for a moment (a walk's steps, a rename's parent).
FD_RESERVE = 64
# The wire types whose replies can be large, and the worst case of any other reply (the
# largest fixed reply is Rgetattr's 160 bytes; Rwalk's 217; Rgetlock echoes its request).
_TREAD, _TREADDIR, _TREADLINK = c.Tread.TYPE, c.Treaddir.TYPE, c.Treadlink.TYPE
_SMALL_REPLY = 256
_PATH_MAX = 4096

T = TypeVar("T")


def _sleeps() -> int:
    """Times this thread has gone to sleep of its own accord (blocked in a call) so far.

    An inline call over budget only counts as slow when this moved: a call that blocked
    on the disk sleeps, while one that was merely preempted on a busy machine does not.
    """
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


@dataclass(frozen=True)
class Limits:
    """What one peer can make the server hold; each is hit with backpressure or a clear
    answer, never unbounded growth (docs/reliability.md states each as a formula).

    ``max_fids``: fids one connection may hold; Tattach/Twalk/Txattrwalk past it get
    ``Rlerror(EMFILE)`` (Tclunk frees one).  ``max_inflight``: requests of one connection
    waiting for or running in the thread pool; past it the server stops reading that
    connection until one finishes (TCP then pushes back on the client).
    ``max_connections``: connections one server serves at once, and
    ``max_connections_per_peer`` per peer (an IP address; a unix socket's peer user); a new
    one past either is closed at once and logged.  ``max_connection_memory``: bytes one
    connection's requests may hold (frames, replies reserved at their worst case before
    they run, replies queued for a client that does not read), and ``max_server_memory``
    all connections together: past either the connection stops reading until bytes come
    back (a connection holding nothing may always take one request); the same number
    bounds what one connection's fids keep between requests (xattr values: ENOMEM past
    it).  ``max_fds``: descriptors all fids may hold (None: RLIMIT_NOFILE's soft limit less
    :data:`FD_RESERVE`), ``max_connection_fds`` one connection's fids (None: an eighth of
    that, at least 64) and ``max_peer_fds`` all of one peer's (None: half of ``max_fds``):
    ENFILE and EMFILE past them.  ``version_timeout``: seconds a
    connection has to negotiate a version before it is closed.
    ``max_threads_per_peer``: worker threads one peer's calls may hold at once (None: half
    the pool, at least one), so calls that never return cannot take the whole pool.
    ``max_queued_output``: the former name of ``max_connection_memory`` (kept for callers
    and the command line; setting it sets that).
    """

    max_fids: int = 16384
    max_inflight: int = 256
    max_connections: int = 256
    max_connections_per_peer: int = 64
    max_connection_memory: int = 8 * 1024 * 1024
    max_server_memory: int = 256 * 1024 * 1024
    max_fds: int | None = None
    max_connection_fds: int | None = None
    version_timeout: float = 10.0
    max_threads_per_peer: int | None = None
    max_peer_fds: int | None = None
    max_queued_output: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if f.name == "version_timeout":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise ValueError(f"{f.name} must be a positive "
                                 f"{'number' if f.name == 'version_timeout' else 'integer'}, "
                                 f"got {value!r}")
        if self.max_queued_output is not None:
            object.__setattr__(self, "max_connection_memory", self.max_queued_output)


def fd_limit() -> int:
    """RLIMIT_NOFILE's soft limit, raised to the hard one first (as virtiofsd does): the
    descriptors this process may have.  For a program that serves; a library leaves the
    limit alone and the server takes its budget from what it finds."""
    import resource as r

    soft, hard = r.getrlimit(r.RLIMIT_NOFILE)
    if hard != r.RLIM_INFINITY and soft != hard:
        try:
            r.setrlimit(r.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft if soft != r.RLIM_INFINITY else 1 << 20


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
    ``require_privileged_port``: refuse a TCP peer whose source port is 1024 or above
    (only root can bind below it: with Linux's ``privport`` mount option, this keeps a
    guest's unprivileged users from attaching on their own).
    ``devices``: watches the fds :meth:`serve_fds` serves when they are a tty or another
    character device (default: :func:`sigpoll.device_watcher` of the running loop).

    Use :meth:`start_tcp`, :meth:`start_unix` or :meth:`serve_fds` inside a running
    loop; :meth:`close` ends everything.
    """

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False,
                 squash_uid: int | None = None, squash_gid: int | None = None,
                 msize: int = DEFAULT_MSIZE, workers: int = 8,
                 limits: Limits | None = None, inline: bool = True,
                 require_privileged_port: bool = False,
                 security_model: str = "mapped",
                 devices: DeviceWatcher | None = None) -> None:
        if not isinstance(msize, int) or msize < MIN_MSIZE or msize > 0xFFFFFFFF:
            raise ValueError(f"msize must be an integer from {MIN_MSIZE} to 4294967295")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.export = Export(root, read_only=read_only, squash_uid=squash_uid,
                             squash_gid=squash_gid, security_model=security_model)
        self.msize = msize
        self.limits = limits = limits if limits is not None else Limits()
        self.inline = inline
        self.require_privileged_port = require_privileged_port
        self.devices = devices
        self._pool = WorkerPool(workers)
        share = limits.max_threads_per_peer or max(1, workers // 2)
        self._scheduler = Scheduler(workers, min(share, workers))
        import resource as r

        soft = r.getrlimit(r.RLIMIT_NOFILE)[0]
        soft = soft if soft != r.RLIM_INFINITY else 1 << 20
        #: Descriptors all fids may hold, and one connection's fids.
        self.max_fds = limits.max_fds or max(64, soft - FD_RESERVE)
        self.max_connection_fds = limits.max_connection_fds or max(64, self.max_fds // 8)
        #: And all connections of one peer: half the server's, so no one peer takes it all.
        self.max_peer_fds = limits.max_peer_fds or max(self.max_connection_fds, self.max_fds // 2)
        self.budget = Budget(limits.max_server_memory, self.max_fds)
        self.budget.on_release = self._memory_released
        self._servers: list[asyncio.AbstractServer] = []
        # Unix socket paths we made, with their inodes (removed on close if still ours).
        self._unix_paths: list[tuple[str, int]] = []
        self.connections: set[_Connection] = set()
        # Peer -> what its connections hold together (and how many there are).
        self._peers: dict[Hashable, PeerShare] = {}
        self._wake_due = False
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
        """Listen on a unix socket at ``path`` (mode 0600; a stale socket file there is
        replaced, any other file is an error); :meth:`close` removes it if it is still
        the one made here."""
        from .._unixsock import listen_unix

        sock = listen_unix(path, backlog=64)
        self._unix_paths.append((path, os.stat(path).st_ino))
        return await self.start_socket(sock)

    async def serve_fds(self, rfd: int, wfd: int | None = None) -> None:
        """Serve one connection on inherited descriptors until the peer hangs up.

        ``rfd`` alone (or ``wfd == rfd``) may be a socket, a tty or a character device;
        two different fds may be pipes.  The descriptors are duplicated, so the caller
        keeps ownership of its own.  A tty or character device (both fds) goes to the
        device watcher (``devices``), as a console does; sockets and pipes stay on the
        loop's own transports.
        """
        loop = asyncio.get_running_loop()
        if wfd is None:
            wfd = rfd
        conn = self.protocol(f"fd:{rfd},{wfd}")
        st = os.fstat(rfd)
        if os.isatty(rfd):
            import tty

            tty.setraw(rfd)
        if rfd == wfd and stat.S_ISSOCK(st.st_mode):
            sock = socket.socket(fileno=os.dup(rfd))
            sock.setblocking(False)
            await loop.connect_accepted_socket(lambda: conn, sock)
        elif stat.S_ISCHR(st.st_mode) and (rfd == wfd or stat.S_ISCHR(os.fstat(wfd).st_mode)):
            # A device: readiness hints may beat epoll (the seed's race), so the fds go to
            # sigpoll's poller, whichever loop this runs on.
            from ..tty import ConsoleTransport

            r_dup = os.dup(rfd)
            w_dup = None if wfd == rfd else os.dup(wfd)
            ConsoleTransport(loop, conn, r_dup, w_dup,
                             devices=self.devices)  # None: the loop's own watcher
        else:
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
        for path, ino in self._unix_paths:
            try:
                if os.lstat(path).st_ino == ino:
                    os.unlink(path)
            except OSError:
                pass

    # ------------------------------------------------------------------ connections

    def _admit(self, conn: _Connection) -> str | None:
        """Count ``conn`` in, or say why not (it is then closed)."""
        limits = self.limits
        if self.require_privileged_port:
            name = conn.transport.get_extra_info("peername") if conn.transport else None
            if isinstance(name, tuple) and len(name) >= 2 and name[1] >= 1024:
                return f"source port {name[1]} is not privileged (require_privileged_port)"
        if len(self.connections) >= limits.max_connections:
            return f"already {len(self.connections)} connections (max_connections)"
        share = self._peers.get(conn.peer_key)
        if share is None:
            share = self._peers[conn.peer_key] = PeerShare(self.max_peer_fds)
        if share.connections >= limits.max_connections_per_peer:
            return (f"already {share.connections} connections from that peer "
                    "(max_connections_per_peer)")
        share.connections += 1
        conn.account.share = share
        self.connections.add(conn)
        return None

    def _forget(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            share = self._peers[conn.peer_key]
            share.connections -= 1
            if not share.connections and not share.fds_used:
                del self._peers[conn.peer_key]
        self.budget.waiting.pop(conn, None)
        self._scheduler.forget(conn)

    def _memory_released(self) -> None:
        # Bytes came back while connections wait for the whole budget: they look again,
        # soon (not from inside whatever gave the bytes back).
        if not self._wake_due:
            self._wake_due = True
            asyncio.get_running_loop().call_soon(self._wake_waiting)

    def _wake_waiting(self) -> None:
        self._wake_due = False
        waiting, self.budget.waiting = self.budget.waiting, {}
        for conn in waiting:
            if isinstance(conn, _Connection):
                conn._pump()

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
        log.debug("inline %s took %.1f ms; to the pool for %.1f s", cls.__name__,
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


def _peer_key(transport: asyncio.BaseTransport, fallback: str) -> Hashable:
    """Whom a connection counts against: its IP address, or a unix peer's user."""
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and name and isinstance(name[0], str):
        return name[0]
    sock = transport.get_extra_info("socket")
    if sock is not None and getattr(sock, "family", None) == socket.AF_UNIX:
        try:
            import struct

            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            return f"uid:{struct.unpack('3i', creds)[1]}"
        except OSError:
            pass
    return fallback


class _Connection(asyncio.Protocol):
    """One client connection: its transport, its :class:`~._session.Session`, its share
    of the server's budgets, and the requests it has given to the pool.

    Flow control.  Frames read wait in ``_backlog`` until they can be taken: while the
    connection has :attr:`Limits.max_inflight` requests in the pool path, or taking the
    next one would pass the connection's or the server's memory budget, they wait and
    reading stops.  :meth:`_pump` takes what it can; every event that can make room calls
    it (a request finishing, bytes reaching the kernel, the server's budget freeing up),
    and whenever frames wait, one of those events is due: that is what makes a stall
    without a resume impossible (``tests/test_ninep_flow.py``).
    """

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
        self.account = Account(server.budget, server.limits.max_connection_memory,
                               server.max_connection_fds, peer)
        self.transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self.lost = False
        self.refused = False
        #: Requests given to the pool path and not finished (waiting or running).
        self.inflight = 0
        # Requests waiting for a worker thread, in order, with their handlers.
        self._runq: deque[tuple[Request, Handler]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        # Replies waiting to go out in one write (and their bytes), whether a write is
        # due, and the bytes written that the transport may still hold.
        self._out: list[bytes | bytearray | memoryview] = []
        self._out_bytes = 0
        self._unsent = 0
        self._batching = False
        self._flush_due = False
        self._pumping = False
        # Frames read but not taken yet.
        self._backlog: deque[memoryview] = deque()
        self._write_paused = False
        self._read_paused = False
        self._version_timer: asyncio.TimerHandle | None = None
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
        # Told the moment anything stays in the transport's buffer, and again once it is
        # empty: the bytes it holds are counted against the budget meanwhile.
        try:
            transport.set_write_buffer_limits(high=0)  # type: ignore[attr-defined]
        except (AttributeError, NotImplementedError):  # a transport without flow control
            pass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if not self.peer:
            name = transport.get_extra_info("peername")
            self.peer = str(name) if name else "?"
            self.account.peer = self.peer
        self.peer_key = _peer_key(transport, self.peer)
        why = self.server._admit(self)
        if why is not None:
            # Nothing has been said on this connection yet, so there is no tag to answer
            # with an error: close it and say why where the operator will see it.
            self.refused = True
            self.server.budget.log.warning("refuse", "refusing connection from %s: %s",
                                           self.peer, why)
            transport.close()
            if self._writer is not None:
                self._writer.close()
            return
        if self._writer is None:
            self._writer = transport  # type: ignore[assignment]
            self._set_write_limit(transport)
        self._version_timer = self._loop.call_later(self.limits.version_timeout,
                                                    self._version_expired)
        log.info("connection from %s", self.peer)

    def _version_expired(self) -> None:
        self._version_timer = None
        if not self.session.versioned and not self.lost:
            self.server.budget.log.warning(
                "version", "%s: no version negotiated within %g s (version_timeout); "
                "closing", self.peer, self.limits.version_timeout)
            self.abort()

    def abort(self) -> None:
        # A read pipe transport has no abort(); closing it drops its buffered input too.
        # One already closing is left alone (asyncio's abort() is not idempotent).
        for t in (self.transport, self._writer if self._writer is not self.transport else None):
            if t is not None and not t.is_closing():
                getattr(t, "abort", t.close)()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._version_timer is not None:
            self._version_timer.cancel()
            self._version_timer = None
        self._out.clear()
        self._backlog.clear()
        self.account.give(self._unsent)
        self._out_bytes = self._unsent = 0
        if (self._writer is not None and self._writer is not self.transport
                and not self._writer.is_closing()):
            self._writer.close()
        if self.refused:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        log.info("connection from %s closed", self.peer)
        # Requests that have not reached the file system are dropped; running ones
        # finish in their threads and give back their fids, which then close.
        self.session.close()
        self._act()
        self._maybe_finish_close()

    def abandon(self) -> None:
        """Stop waiting for calls still running in threads (the server is closing)."""
        for task in list(self._tasks):
            task.cancel()
        if not self.closed.done():
            self.server._forget(self)
            self.closed.set_result(None)

    def _maybe_finish_close(self) -> None:
        if self.lost and self.inflight == 0 and not self.closed.done():
            self.server._forget(self)
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.lost:
            return
        try:
            frames = self.frames.feed(data)
        except c.FramingError as exc:
            # The good frames before the bad one are answered as far as the limits
            # allow (the connection is closing anyway), then it closes.
            self._backlog.extend(exc.frames)
            self._pump()
            self._backlog.clear()
            log.warning("%s: %s; closing", self.peer, exc)
            self.abort()
            return
        if frames:
            self._backlog.extend(frames)
            self._pump()

    def eof_received(self) -> bool | None:
        return None

    # ------------------------------------------------------------------ flow control

    def _pump(self) -> None:
        """Take frames from the backlog while the connection is under its limits; read
        again once none wait.

        A frame is taken while the connection holds less than its budget and the server
        less than its own (or the connection holds nothing at all, so that none can be
        starved); what its request then keeps is charged (see :meth:`_charge`).  So a
        connection holds at most its budget plus one request's worth.
        """
        if self._pumping or self.lost:
            return
        self._pumping = self._batching = True
        backlog = self._backlog
        account = self.account
        budget = account.budget
        max_inflight = self.limits.max_inflight
        try:
            self._sleeps_mark = _sleeps()
            while backlog:
                if self.inflight >= max_inflight:
                    break  # a request finishing pumps again
                used = account.mem_used + self._out_bytes
                if used and (used >= account.memory or budget.mem_used >= budget.memory):
                    if self._out:
                        self._flush_out()  # the batch goes to the kernel: look again
                        continue
                    if not self._make_room():
                        break
                self._dispatch(backlog.popleft())
                if self.lost:
                    break
        finally:
            self._pumping = self._batching = False
        if self._out:
            self._flush_out()
        if self._read_paused != bool(backlog) and not self.lost:
            self._set_reading(not backlog)

    def _charge(self, req: Request, frame: memoryview) -> None:
        """Charge what a request kept past its frame's dispatch holds (it waits for a
        thread, or is a Tflush waiting for its target): its frame, its reply at the worst
        its type and count allow (a read at its end of file too), and what stands for it
        in memory.  The session hands the bytes back when the request is over."""
        n = len(frame)
        kind = frame[4]
        if (kind == _TREAD or kind == _TREADDIR) and n >= 23:
            count = frame[19] | frame[20] << 8 | frame[21] << 16 | frame[22] << 24
            cost = REQUEST_OVERHEAD + n + 11 + min(count, self.msize - 11)
        elif kind == _TREADLINK:
            cost = REQUEST_OVERHEAD + n + 9 + _PATH_MAX
        else:
            cost = REQUEST_OVERHEAD + 2 * n + _SMALL_REPLY
        req.held += cost
        self.account.take(cost)

    def _make_room(self) -> bool:
        """The budgets look full: True if counting what the transport really still holds
        makes room; else note who will call :meth:`_pump` again."""
        account = self.account
        budget = account.budget
        self._refresh_unsent()
        used = account.mem_used + self._out_bytes
        if used >= account.memory:
            return False  # its own requests or replies finishing pump again
        if budget.mem_used >= budget.memory:
            budget.waiting[self] = None  # others giving bytes back pump again
            return False
        return True

    def stalled(self) -> str | None:
        """Why frames wait with nothing due to take them up again, or None (the flow
        control's invariant, checked by the tests: never anything but None)."""
        if not self._backlog or self.lost or self._pumping:
            return None
        if self.inflight:
            return None  # a request finishing pumps
        if self._unsent and self._write_paused:
            return None  # the transport draining pumps
        if self._out_bytes and self._flush_due:
            return None  # the batched write pumps
        if self in self.server.budget.waiting and self.server.budget.mem_used > self.account.mem_used:
            return None  # other connections giving bytes back pump
        return (f"{len(self._backlog)} frames wait: inflight {self.inflight}, held "
                f"{self.account.mem_used}, unsent {self._unsent}, queued {self._out_bytes}, "
                f"writing paused {self._write_paused}, reading paused {self._read_paused}")

    def _give_back(self) -> None:
        session = self.session
        if session.freed:
            self.account.give(session.freed)
            session.freed = 0

    def _refresh_unsent(self) -> None:
        """Count what the transport really still holds (less than written while paused)."""
        try:
            actual = self._writer.get_write_buffer_size()  # type: ignore[union-attr]
        except (AttributeError, NotImplementedError):
            return
        if actual < self._unsent:
            self.account.give(self._unsent - actual)
            self._unsent = actual

    def _set_reading(self, on: bool) -> None:
        # A transport without read flow control (or one already closing) simply keeps
        # reading; the limits then only hold back dispatch, through the backlog.
        if self._read_paused != on or self.transport is None:
            return
        self._read_paused = not on
        transport: Any = self.transport
        try:
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()
        except (AttributeError, NotImplementedError, RuntimeError):
            pass

    def pause_writing(self) -> None:
        # Something stays in the transport's buffer: what we write now is counted as held
        # until it has drained.
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        unsent, self._unsent = self._unsent, 0
        if unsent:
            self.account.give(unsent)
        if self._backlog:
            self._pump()

    # ------------------------------------------------------------------ output

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        if self.lost or self._writer is None:
            return
        n = len(data)
        if n >= _BIG_REPLY:
            # Large payloads go out on their own (after what is queued before them).
            if self._out:
                self._flush_out()
            self._write(data, n)
            return
        # Batched: counted against this connection's budget (_out_bytes) until written.
        self._out.append(data)
        self._out_bytes += n
        if self._out_bytes >= _BATCH_MAX:
            self._flush_out()
        elif not self._batching and not self._flush_due:
            # Replies finishing in the same loop iteration share one write.
            self._flush_due = True
            self._loop.call_soon(self._flush_out)

    def _write(self, data: bytes | bytearray | memoryview, n: int) -> None:
        assert self._writer is not None
        self._writer.write(data)  # may call pause_writing() before it returns
        if self._write_paused:
            # Held by the transport until it has drained: counted until resume_writing().
            self._unsent += n
            self.account.take(n)

    def _flush_out(self) -> None:
        self._flush_due = False
        out = self._out
        if not out:
            return
        n, self._out_bytes = self._out_bytes, 0
        if self.lost or self._writer is None:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._write(data, n)
        if self._backlog and not self._pumping:
            self._pump()  # those bytes held back frames

    def _send(self, msg: Message) -> None:
        try:
            data = c.encode(msg)
        except c.ProtocolError as exc:  # a reply we cannot encode is a bug: say so
            log.error("cannot encode %r: %s", msg, exc)
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
                self.server.budget.log.warning("protocol", "%s: %s; closing",
                                               self.peer, action.reason)
                self._flush_out()
                self.abort()
            else:  # a frame a fast handler laid out itself
                self._emit(action)
        self._give_back()

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, frame: memoryview) -> None:
        """Take one frame: answer it, run it inline, or queue it for a thread."""
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
        cls = type(msg)
        server = self.server
        handler: Handler | None = None
        fast = FAST.get(cls) if server.inline else None
        if fast is not None and server._inline_ok(cls):
            # Answered before the next frame is looked at, so nothing can abort it or
            # come between it and its reply: the session registers nothing for it.
            if not session.may_answer(msg):
                self._act()  # an error, or a tag in flight: the session has answered
                return
            self.self_timed = False
            t0 = time.perf_counter()
            try:
                reply = fast(self, msg, session.fids)
            except Exception as exc:  # noqa: BLE001 - answered with its errno
                reply = error_reply(exc, msg)
            took = time.perf_counter() - t0
            if took > INLINE_BUDGET and self._batching and not self.self_timed:
                # The loop thread sleeps nowhere else within a batch, so a sleep since
                # the batch began was this call waiting for the file system.
                now = _sleeps()
                if now != self._sleeps_mark:
                    server._demote(cls, took)
                    self._sleeps_mark = now
            if isinstance(reply, Defer):
                handler = reply.handler
            elif reply is not None:
                if isinstance(reply, Message):
                    reply.tag = msg.tag
                    self._send(reply)
                else:
                    self._emit(reply)
                return
            # None or Defer: this one needs the pool after all (data not cached, not a
            # regular file...); it takes the ordinary path below.
        req = session.receive(msg)
        if req is None:
            if isinstance(msg, c.Tflush):
                waiting = session.pending.get(msg.tag)
                if waiting is not None and waiting.msg is msg:
                    self._charge(waiting, frame)  # it waits for its target: it counts
            elif isinstance(msg, c.Tversion):
                # Frames larger than the new msize end the connection from now on.
                self.msize = self.frames.max_size = session.msize
                if session.versioned and self._version_timer is not None:
                    self._version_timer.cancel()
                    self._version_timer = None
            self._act()
            return
        if handler is None:
            handler = HANDLERS.get(cls)
            if handler is None:
                session.complete(req, c.Rlerror(errno.EOPNOTSUPP, tag=msg.tag))
                self._act()
                return
        if isinstance(msg, c.Twrite) and isinstance(msg.data, memoryview):
            msg.data = bytes(msg.data)  # it may outlive this chunk in the pool path
        self._charge(req, frame)
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
        if self._backlog:
            self._pump()
