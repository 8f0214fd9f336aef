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
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import socket
import stat
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from . import _codec as c
from ._codec import Message, MessageError, ProtocolError
from ._fs import Export, Handle

__all__ = ["NinepServer", "ServerHook", "Request", "DEFAULT_MSIZE"]

log = logging.getLogger("sigpoll.ninep")

DEFAULT_MSIZE = 512 * 1024
#: Smallest msize we agree to: room for a header, a qid walk and a useful read.
MIN_MSIZE = 4096
#: Bytes of Rread/Twrite overhead (size, type, tag, count) and Linux's P9_IOHDRSZ.
_RW_OVERHEAD = 11
_IOHDRSZ = 24

V9FS_MAGIC = 0x01021997

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
    reply: Message | None = None


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
    ``hook``: see :class:`ServerHook`.

    Use :meth:`start_tcp`, :meth:`start_unix` or :meth:`serve_fds` inside a running
    loop; :meth:`close` ends everything.
    """

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False,
                 squash_uid: int | None = None, squash_gid: int | None = None,
                 msize: int = DEFAULT_MSIZE, workers: int = 8,
                 hook: ServerHook | None = None) -> None:
        if msize < MIN_MSIZE:
            raise ValueError(f"msize must be at least {MIN_MSIZE}")
        self.export = Export(root, read_only=read_only, squash_uid=squash_uid,
                             squash_gid=squash_gid)
        self.msize = msize
        self.hook = hook
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ninep-fs")
        self._workers = workers
        self._slots: asyncio.Semaphore | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self.connections: set[_Connection] = set()
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
            wtransport, _ = await loop.connect_write_pipe(asyncio.Protocol, w)
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
        for srv in self._servers:
            await srv.wait_closed()
        for conn in list(self.connections):
            conn.abort()
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


class _Connection(asyncio.Protocol):
    """State of one client connection: negotiated msize, fids, pending requests."""

    def __init__(self, server: NinepServer, peer: str) -> None:
        self.server = server
        self.fs = server.export
        self.peer = peer
        self.msize = server.msize
        self.frames = c.FrameBuffer(server.msize)
        self.transport: asyncio.BaseTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self.fids: dict[int, _Fid] = {}
        self.pending: dict[int, Request] = {}
        self.versioned = False
        self.lost = False
        self._running = 0
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()

    # ------------------------------------------------------------------ transport side

    def set_writer(self, transport: asyncio.WriteTransport) -> None:
        """Use a separate write transport (pipe pairs)."""
        self._writer = transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self._writer is None:
            self._writer = transport  # type: ignore[assignment]
        if not self.peer:
            name = transport.get_extra_info("peername")
            self.peer = str(name) if name else "?"
        self.server.connections.add(self)
        log.info("ninep: connection from %s", self.peer)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        if self._writer is not None and self._writer is not self.transport:
            self._writer.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._writer is not None and self._writer is not self.transport:
            self._writer.close()
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
            for frame in exc.frames:
                self._dispatch(frame)
            log.warning("ninep: %s: %s; closing", self.peer, exc)
            self.abort()
            return
        for frame in frames:
            self._dispatch(frame)

    def eof_received(self) -> bool | None:
        return None

    def _send(self, msg: Message) -> None:
        if self.lost or self._writer is None:
            return
        try:
            data = c.encode(msg)
        except ProtocolError as exc:  # a reply we cannot encode is a bug: say so
            log.error("ninep: cannot encode %r: %s", msg, exc)
            data = c.encode(c.Rlerror(errno.EIO, tag=msg.tag))
        self._writer.write(data)

    def _error(self, tag: int, err: int) -> None:
        self._send(c.Rlerror(err, tag=tag))

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, frame: bytes) -> None:
        try:
            msg = c.decode(frame)
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
        req = Request(msg.tag, msg)
        self.pending[msg.tag] = req
        self._running += 1
        req.task = asyncio.get_running_loop().create_task(self._run(req, handler))

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

    def _finish(self, req: Request, reply: Message | None) -> None:
        """Send ``reply`` (None: aborted, say nothing), then the Rflush of each flusher."""
        if self.pending.get(req.tag) is req:
            del self.pending[req.tag]
        req.state = DONE
        if reply is not None:
            self._send(reply)
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

    async def _run(self, req: Request, handler: Callable[[_Connection, Message],
                                                           Awaitable[Message]]) -> None:
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
            reply.tag = req.tag
            req.reply = reply
            req.state = REPLYING
            if self.server.hook is not None:
                await asyncio.shield(self.server.hook.after(req))
            self._finish(req, reply)
        finally:
            self._running -= 1
            self._maybe_finish_close()

    # ------------------------------------------------------------------ fid helpers

    def _take(self, fid: int) -> _Fid:
        """Borrow a fid for the duration of a request (its fds stay open meanwhile)."""
        f = self.fids.get(fid)
        if f is None or f.clunked:
            raise _Error(errno.EBADF)
        f.refs += 1
        return f

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

    def _iounit(self) -> int:
        return self.msize - _IOHDRSZ


# ---------------------------------------------------------------------------- handlers

_Handler = Callable[[_Connection, Message], Awaitable[Message]]
_HANDLERS: dict[int, _Handler] = {}


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
    if m.fid in conn.fids or conn.lost:
        h.close()
        raise _Error(errno.EBADF)
    conn.fids[m.fid] = _Fid(h, _uid_for(m.uname, m.n_uname))
    return c.Rattach(qid)


@_handles(110)
async def _walk(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
        if m.newfid != m.fid:
            conn._check_new(m.newfid)
        fs = conn.fs
        # Walking from an open fid is allowed (diodls lists a directory that way); the
        # walk only uses the O_PATH handle, never the open file.
        start = conn._handle(f)

        def go() -> tuple[Handle | None, list[c.Qid], OSError | None]:
            h = fs.clone(start)
            qids: list[c.Qid] = []
            try:
                for name in m.wnames:
                    try:
                        nxt = fs.walk1(h, name)
                    except OSError as exc:
                        h.close()
                        return None, qids, exc
                    h.close()
                    h = nxt
                    qids.append(fs.qid(fs.stat(h)))
            except BaseException:
                h.close()
                raise
            return h, qids, None

        h, qids, err = await conn.server._call(go)
    finally:
        conn._give_back(f)
    if h is None:
        if not qids:
            assert err is not None
            raise err
        return c.Rwalk(qids)  # partial walk: newfid is not created
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
        if m.newfid in conn.fids:
            h.close()
            raise _Error(errno.EBADF)
        conn.fids[m.newfid] = _Fid(h, f.uid)
    return c.Rwalk(qids)


@_handles(12)
async def _lopen(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
        if f.open_fd is not None or f.xattr is not None:
            raise _Error(errno.EBUSY)
        h = conn._handle(f)
        fs = conn.fs

        def go() -> tuple[int, c.Qid]:
            fd = fs.open(h, m.flags)
            return fd, fs.qid(os.fstat(fd))

        fd, qid = await conn.server._call(go)
        if f.clunked or f.open_fd is not None:
            os.close(fd)
            raise _Error(errno.EBADF)
        f.open_fd = fd
        return c.Rlopen(qid, conn._iounit())
    finally:
        conn._give_back(f)


@_handles(14)
async def _lcreate(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
        if f.open_fd is not None:
            raise _Error(errno.EBUSY)
        d = conn._handle(f)
        fs = conn.fs

        def go() -> tuple[Handle, int, c.Qid]:
            h, fd = fs.create(d, m.name, m.flags, m.mode, f.uid, m.gid)
            return h, fd, fs.qid(os.fstat(fd))

        h, fd, qid = await conn.server._call(go)
        if f.clunked:
            h.close()
            os.close(fd)
            raise _Error(errno.EBADF)
        # Tlcreate turns the directory fid into the new, open file.
        old = f.handle
        f.handle = h
        f.open_fd = fd
        if old is not None:
            old.close()
        return c.Rlcreate(qid, conn._iounit())
    finally:
        conn._give_back(f)


def _simple(mtype: int, reply: Callable[..., Message], fids: tuple[str, ...],
            work: Callable[..., Any]) -> None:
    """Register a handler: borrow the named fids, run ``work`` in a thread, reply."""

    async def handler(conn: _Connection, m: Message) -> Message:
        taken: list[_Fid] = []
        try:
            for name in fids:
                taken.append(conn._take(getattr(m, name)))
            for f in taken:
                conn._handle(f)
            result = await conn.server._call(work, conn, m, *taken)
        finally:
            for f in taken:
                conn._give_back(f)
        return reply(*result) if isinstance(result, tuple) else reply()

    _HANDLERS[mtype] = handler


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
_simple(22, c.Rreadlink, ("fid",), _w_readlink)
_simple(24, c.Rgetattr, ("fid",), _w_getattr)
_simple(26, c.Rsetattr, ("fid",), _w_setattr)
_simple(8, c.Rstatfs, ("fid",), _w_statfs)
_simple(20, c.Rrename, ("fid", "dfid"), _w_rename)
_simple(74, c.Rrenameat, ("olddirfid", "newdirfid"), _w_renameat)
_simple(76, c.Runlinkat, ("dirfid",), _w_unlinkat)
_simple(70, c.Rlink, ("dfid", "fid"), _w_link)
_simple(50, c.Rfsync, ("fid",), _w_fsync)
_simple(52, c.Rlock, ("fid",), _w_lock)
_simple(54, c.Rgetlock, ("fid",), _w_getlock)


@_handles(116)
async def _read(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
        count = min(m.count, conn.msize - _RW_OVERHEAD)
        if f.xattr is not None:
            return c.Rread(f.xattr[m.offset:m.offset + count])
        if f.open_fd is None:
            raise _Error(errno.EBADF)
        data = await conn.server._call(os.pread, f.open_fd, count, m.offset)
        return c.Rread(data)
    finally:
        conn._give_back(f)


@_handles(118)
async def _write(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
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
        n = await conn.server._call(os.pwrite, f.open_fd, m.data, m.offset)
        return c.Rwrite(n)
    finally:
        conn._give_back(f)


@_handles(40)
async def _readdir(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
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
    finally:
        conn._give_back(f)


@_handles(120)
async def _clunk(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
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
    finally:
        conn._give_back(f)


@_handles(122)
async def _remove(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
        # The fid is clunked whether or not the remove succeeds (9P's rule).
        conn._drop(m.fid)
        await conn.server._call(conn.fs.remove, conn._handle(f))
        return c.Rremove()
    finally:
        conn._give_back(f)


@_handles(30)
async def _xattrwalk(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
        conn._check_new(m.newfid)
        h = conn._handle(f)
        value = await conn.server._call(conn.fs.getxattr, h, m.name)
        if m.newfid in conn.fids or conn.lost:
            raise _Error(errno.EBADF)
        nf = _Fid(conn.fs.clone(h), f.uid, xattr=value)
        conn.fids[m.newfid] = nf
        return c.Rxattrwalk(len(value))
    finally:
        conn._give_back(f)


@_handles(32)
async def _xattrcreate(conn: _Connection, m: Message) -> Message:
    f = conn._take(m.fid)
    try:
        if conn.fs.read_only:
            raise _Error(errno.EROFS)
        if m.attr_size > 64 * 1024:
            raise _Error(errno.E2BIG)
        # The value arrives in Twrites on this fid and is applied when it is clunked.
        f.xattr_new = (m.name, m.attr_size, m.flags, bytearray())
        return c.Rxattrcreate()
    finally:
        conn._give_back(f)
