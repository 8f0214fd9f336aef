"""9P2000.L client for asyncio, callable from other threads too.

Flush rules the client keeps (flush(5), and Linux's client does the same):

* Cancelling a task that waits on a request sends a Tflush for the request's tag and then
  waits -- ignoring further cancellation -- for the Rflush.
* The flushed tag is not reused until the Rflush has arrived: a late reply under a reused
  tag would otherwise be taken as the answer to a new request.
* A reply that arrives before the Rflush is the real outcome (the server did the work),
  so it is returned to the cancelled caller instead of CancelledError; only when the
  server dropped the request does the caller see CancelledError.

Outstanding tags are capped (``max_tags``, 256 by default): a caller past the cap waits
for a tag to come free rather than failing (a Tflush never waits: it may exceed the cap,
since it is what frees a tag).  A reply frame larger than the negotiated msize ends the
connection with a clear error, and an Rread or Rreaddir carrying more bytes than were
asked for is refused as a protocol error.

Replies are handed from the loop thread to waiters on any thread through :class:`_Slot`:
the reply is stored first and only then is the ``threading.Event`` set (the same order
as Linux's ``p9_client_cb``: payload, barrier, status), so a waiter that sees the
event set always sees the payload.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat as stat_mod
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import _codec as c
from ._codec import Message, Qid

__all__ = ["Client", "File", "NinepError", "Stat", "DEFAULT_MAX_TAGS"]

R = TypeVar("R", bound=Message)

#: Requests one client keeps outstanding at most (callers past it wait their turn).
DEFAULT_MAX_TAGS = 256

_DOTL_WRONLY, _DOTL_RDWR = 1, 2
_DOTL_CREATE, _DOTL_TRUNC, _DOTL_APPEND, _DOTL_EXCL = 0o100, 0o1000, 0o2000, 0o200


class NinepError(OSError):
    """An Rlerror from the server (``errno`` is the Linux errno it carried)."""


@dataclass(frozen=True)
class Stat:
    """The useful part of an Rgetattr."""

    qid: Qid
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)


class _Slot:
    """One outstanding request.  ``reply``/``error`` are written before ``event`` is set."""

    __slots__ = ("tag", "request", "reply", "error", "event", "future", "flushing", "counted")

    def __init__(self, tag: int, request: Message, counted: bool = False) -> None:
        self.tag = tag
        #: It holds one of the client's ``max_tags`` places (see Client._claim).
        self.counted = counted
        self.request = request
        self.reply: Message | None = None
        self.error: BaseException | None = None
        self.event = threading.Event()
        self.future: asyncio.Future[None] | None = None
        self.flushing = False

    def publish(self, reply: Message | None, error: BaseException | None = None) -> None:
        # Payload first, then the status (the Event, whose lock orders the two for any
        # thread that waits on it), then wake an asyncio waiter.
        self.reply = reply
        self.error = error
        self.event.set()
        fut = self.future
        if fut is not None and not fut.done():
            fut.set_result(None)

    def result(self) -> Message:
        if not self.event.is_set():
            raise RuntimeError("reply read before it was published")
        if self.error is not None:
            raise self.error
        reply = self.reply
        assert reply is not None
        if isinstance(reply, c.Rlerror):
            raise NinepError(reply.ecode, os.strerror(reply.ecode))
        request = self.request
        if type(reply) is not type(request).REPLY:
            raise c.ProtocolError(
                f"{type(reply).__name__} in answer to {type(request).__name__}"
            )
        if (isinstance(reply, (c.Rread, c.Rreaddir))
                and isinstance(request, (c.Tread, c.Treaddir))
                and len(reply.data) > request.count):
            raise c.ProtocolError(
                f"{type(reply).__name__} carries {len(reply.data)} bytes, more than the "
                f"{request.count} asked for"
            )
        return reply


class _ThreadWaiter:
    """A thread waiting for a free tag place (``owned`` is set when one is handed over)."""

    __slots__ = ("event", "owned")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.owned = False


class _Protocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client._data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(exc)


class Client:
    """A 9P2000.L session.  Create with :meth:`connect_tcp`, :meth:`connect_unix` or
    :meth:`connect_fds`; all coroutine methods run on the loop it was created on, and
    :meth:`rpc_blocking` may be called from any other thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, msize: int,
                 max_tags: int = DEFAULT_MAX_TAGS) -> None:
        if not isinstance(max_tags, int) or not 1 <= max_tags <= 0xFFFE // 2:
            raise ValueError(f"max_tags must be from 1 to {0xFFFE // 2}, got {max_tags!r}")
        self._loop = loop
        self._transport: asyncio.WriteTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._frames = c.FrameBuffer(msize)
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._free_tags = list(range(0xFFFE, -1, -1))
        # Outstanding requests holding a place, the cap, and who waits for a place (in
        # arrival order): futures of coroutines on the loop, _ThreadWaiters of threads.
        self._used = 0
        self.max_tags = max_tags
        self._tag_waiters: deque[asyncio.Future[None] | _ThreadWaiter] = deque()
        self._next_fid = 1
        self._free_fids: list[int] = []
        self._closed_exc: BaseException | None = None
        self._loop_thread = threading.get_ident()
        self.msize = msize
        self.root_fid = 0
        self.root_qid: Qid | None = None

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect_tcp(cls, host: str, port: int, **kw: Any) -> Client:
        """Connect over TCP and attach (keywords as for :meth:`_handshake`, plus
        ``max_tags``: requests outstanding at once, further callers wait)."""
        loop = asyncio.get_running_loop()
        self = cls(loop, kw.get("msize", 512 * 1024), kw.pop("max_tags", DEFAULT_MAX_TAGS))
        await loop.create_connection(lambda: _Protocol(self), host, port)
        await self._start(**kw)
        return self

    @classmethod
    async def connect_unix(cls, path: str, **kw: Any) -> Client:
        loop = asyncio.get_running_loop()
        self = cls(loop, kw.get("msize", 512 * 1024), kw.pop("max_tags", DEFAULT_MAX_TAGS))
        await loop.create_unix_connection(lambda: _Protocol(self), path)
        await self._start(**kw)
        return self

    @classmethod
    async def connect_fds(cls, rfd: int, wfd: int | None = None, **kw: Any) -> Client:
        """Use a connected socket fd, a tty or character device (one fd or two), or a read
        and a write pipe.  The fds are duplicated: the caller keeps its own.

        A tty is put in raw mode, and a device goes to the running loop's device watcher
        (:func:`sigpoll.device_watcher`) as a console does, so no readiness edge is lost
        on any loop; sockets and pipes use the loop's own transports.
        """
        import socket

        loop = asyncio.get_running_loop()
        self = cls(loop, kw.get("msize", 512 * 1024), kw.pop("max_tags", DEFAULT_MAX_TAGS))
        if wfd is None:
            wfd = rfd
        if os.isatty(rfd):
            import tty

            tty.setraw(rfd)
        if stat_mod.S_ISCHR(os.fstat(rfd).st_mode) and stat_mod.S_ISCHR(os.fstat(wfd).st_mode):
            from ..tty import ConsoleTransport

            # One transport for both directions: a write pipe on uvloop also reads its fd
            # (to notice the peer closing), and on a shared tty it would take replies.
            ConsoleTransport(loop, _Protocol(self), os.dup(rfd),
                             None if wfd == rfd else os.dup(wfd))
            await asyncio.sleep(0)  # connection_made runs before the first request
        elif wfd == rfd:
            sock = socket.socket(fileno=os.dup(rfd))
            sock.setblocking(False)
            await loop.connect_accepted_socket(lambda: _Protocol(self), sock)
        else:
            w = os.fdopen(os.dup(wfd), "wb", buffering=0)
            r = os.fdopen(os.dup(rfd), "rb", buffering=0)
            wt, _ = await loop.connect_write_pipe(asyncio.Protocol, w)
            self._writer = wt
            await loop.connect_read_pipe(lambda: _Protocol(self), r)
        await self._start(**kw)
        return self

    async def _start(self, **kw: Any) -> None:
        try:
            await self._handshake(**kw)
        except BaseException:
            await self.close()
            raise

    async def _handshake(self, *, msize: int = 512 * 1024, aname: str = "",
                         uname: str = "root", n_uname: int = 0, attach: bool = True) -> None:
        rv = await self._ask(c.Tversion(msize, c.VERSION_9P2000L), c.Rversion, tag=c.NOTAG)
        if rv.version != c.VERSION_9P2000L:
            raise c.ProtocolError(f"server speaks {rv.version!r}, not 9P2000.L")
        self.msize = min(msize, rv.msize)
        self._frames.max_size = max(self.msize, 4096)
        if attach:
            ra = await self._ask(c.Tattach(self.root_fid, c.NOFID, uname, aname, n_uname),
                                 c.Rattach)
            self.root_qid = ra.qid

    async def close(self) -> None:
        """Clunk the root fid, close the connection (pending requests then fail with
        ConnectionError)."""
        if self.root_qid is not None and self._closed_exc is None:
            self.root_qid = None
            try:
                await asyncio.wait_for(self.rpc(c.Tclunk(self.root_fid)), 2)
            except (OSError, asyncio.TimeoutError, c.ProtocolError):
                pass
        t = self._transport
        if t is not None:
            t.close()
        if self._writer is not None:
            self._writer.close()
        await asyncio.sleep(0)
        self._lost(None)

    # ------------------------------------------------------------------ wire

    def _data(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
        except c.FramingError as exc:
            for frame in exc.frames:
                self._reply_frame(frame)
            # Most likely a reply bigger than the msize both sides agreed on: nothing
            # after it can be trusted, so the connection ends, and every caller is told.
            self._lost(c.ProtocolError(
                f"server sent an unusable frame ({exc}; negotiated msize {self.msize})"))
            # A read pipe transport has no abort(); closing it drops its input as well.
            for t in (self._transport, self._writer):
                if t is not None and not t.is_closing():
                    getattr(t, "abort", t.close)()
            return
        for frame in frames:
            self._reply_frame(frame)

    def _reply_frame(self, frame: memoryview) -> None:
        msg: Message | None = None
        err: BaseException | None = None
        try:
            msg = c.decode(frame)
            tag = msg.tag
        except c.MessageError as exc:
            err, tag = exc, exc.tag if exc.tag is not None else -1
        with self._lock:
            slot = self._slots.get(tag)
        if slot is None or slot.event.is_set():
            return  # a reply nobody waits for (a server bug): ignore it
        slot.publish(msg, err)
        if isinstance(msg, c.Rflush) and isinstance(slot.request, c.Tflush):
            # Rflush: the flushed request's tag may be reused from now on.
            target = slot.request.oldtag
            with self._lock:
                tslot = self._slots.get(target)
                if tslot is not None and tslot.flushing:
                    self._release(tslot)
                self._release(slot)
            return
        if not slot.flushing:
            with self._lock:
                self._release(slot)

    def _release(self, slot: _Slot) -> None:
        # Called with self._lock held.
        if self._slots.get(slot.tag) is slot:
            del self._slots[slot.tag]
            if slot.tag != c.NOTAG:
                self._free_tags.append(slot.tag)
            if slot.counted:
                slot.counted = False
                self._unclaim()

    # ------------------------------------------------------------------ tag places

    def _unclaim(self) -> None:
        """A place is free again: hand it to the first waiter, if any.  Lock held."""
        while self._tag_waiters:
            w = self._tag_waiters.popleft()
            if isinstance(w, _ThreadWaiter):
                w.owned = True
                w.event.set()
                return
            if w.done():
                continue  # its coroutine was cancelled meanwhile
            if threading.get_ident() == self._loop_thread:
                w.set_result(None)
            else:
                self._loop.call_soon_threadsafe(self._hand_over, w)
            return
        self._used -= 1

    def _hand_over(self, fut: asyncio.Future[None]) -> None:
        with self._lock:
            if fut.done():
                self._unclaim()  # cancelled before it could take the place
            else:
                fut.set_result(None)

    async def _claim(self) -> None:
        """Take a place among ``max_tags``, waiting for one to come free."""
        with self._lock:
            if self._used < self.max_tags or self._closed_exc is not None:
                self._used += 1
                return
            fut: asyncio.Future[None] = self._loop.create_future()
            self._tag_waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                if fut.done() and not fut.cancelled():
                    self._unclaim()  # handed a place just as it was cancelled
                else:
                    try:
                        self._tag_waiters.remove(fut)
                    except ValueError:
                        pass
            raise

    def _claim_blocking(self, timeout: float | None) -> None:
        with self._lock:
            if self._used < self.max_tags or self._closed_exc is not None:
                self._used += 1
                return
            w = _ThreadWaiter()
            self._tag_waiters.append(w)
        w.event.wait(timeout)
        with self._lock:
            if w.owned:
                return
            self._tag_waiters.remove(w)
        raise TimeoutError(f"no free tag in {timeout}s ({self.max_tags} outstanding)")

    def _lost(self, exc: BaseException | None) -> None:
        with self._lock:
            if self._closed_exc is None:
                self._closed_exc = ConnectionError(f"9P connection closed: {exc or 'EOF'}")
            slots = list(self._slots.values())
            self._slots.clear()
            # Whoever waits for a tag place gets one, and then the closed error.
            while self._tag_waiters:
                self._used += 1
                self._unclaim()
        for slot in slots:
            if not slot.event.is_set():
                slot.publish(None, self._closed_exc)

    def _submit(self, msg: Message, tag: int | None = None, counted: bool = False) -> _Slot:
        """Assign a tag, register the slot, send.  Safe from any thread.

        ``counted``: the caller holds a place from :meth:`_claim`; the slot keeps it
        until it is released (or gives it back at once if nothing is sent)."""
        with self._lock:
            if self._closed_exc is not None or (tag is None and not self._free_tags):
                if counted:
                    self._unclaim()
                if self._closed_exc is not None:
                    raise self._closed_exc
                raise RuntimeError("all 65535 tags are in use")
            if tag is None:
                tag = self._free_tags.pop()
            msg.tag = tag
            slot = _Slot(tag, msg, counted)
            self._slots[tag] = slot
        try:
            data = c.encode(msg)
        except BaseException:
            # Nothing was sent: the tag and the max_tags place go back at once.
            with self._lock:
                self._release(slot)
            raise
        if threading.get_ident() == self._loop_thread:
            slot.future = self._loop.create_future()
            self._write(data)
        else:
            self._loop.call_soon_threadsafe(self._write, data)
        return slot

    def _write(self, data: bytes) -> None:
        w = self._writer or self._transport
        if w is not None and not w.is_closing():
            w.write(data)

    # ------------------------------------------------------------------ rpc

    async def rpc(self, msg: Message, *, tag: int | None = None) -> Message:
        """Send ``msg`` and return its reply (NinepError for Rlerror).

        Cancellation sends Tflush; see the module docstring for what is returned then.
        With ``max_tags`` requests outstanding, it first waits for one to finish.
        """
        counted = tag is None and not isinstance(msg, c.Tflush)
        if counted:
            await self._claim()
        slot = self._submit(msg, tag, counted)
        assert slot.future is not None
        try:
            await asyncio.shield(slot.future)
        except asyncio.CancelledError:
            if not slot.event.is_set():
                await self._flush(slot)
            if slot.event.is_set():
                # Answered before the cancellation took hold or before the Rflush: the
                # request took effect; honour it.
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                return slot.result()
            raise
        return slot.result()

    async def _ask(self, msg: Message, reply: type[R], *, tag: int | None = None) -> R:
        """:meth:`rpc`, for a caller that knows the reply's class (typed)."""
        r = await self.rpc(msg, tag=tag)
        if not isinstance(r, reply):  # rpc() already checked it answers ``msg``
            raise c.ProtocolError(f"{type(r).__name__} where {reply.__name__} was expected")
        return r

    async def _flush(self, slot: _Slot) -> None:
        slot.flushing = True
        fslot = self._submit(c.Tflush(slot.tag))
        assert fslot.future is not None
        # Like Linux: once a flush is sent, wait for its Rflush whatever else happens.
        # A server that never answers a Tflush is broken; the connection loss ends it.
        while not fslot.event.is_set():
            try:
                await asyncio.shield(fslot.future)
            except asyncio.CancelledError:
                continue

    def rpc_blocking(self, msg: Message, timeout: float | None = None) -> Message:
        """Send from a thread other than the loop's and wait for the reply there."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("rpc_blocking() would deadlock on the loop thread")
        self._claim_blocking(timeout)
        slot = self._submit(msg, counted=True)
        if not slot.event.wait(timeout):
            raise TimeoutError(f"no reply to {type(msg).__name__} in {timeout}s")
        return slot.result()

    # ------------------------------------------------------------------ fids

    def _alloc_fid(self) -> int:
        with self._lock:
            if self._free_fids:
                return self._free_fids.pop()
            fid = self._next_fid
            self._next_fid += 1
            return fid

    def _free_fid(self, fid: int) -> None:
        with self._lock:
            self._free_fids.append(fid)

    @staticmethod
    def _split(path: str) -> list[str]:
        return [p for p in path.split("/") if p and p != "."]

    async def walk(self, path: str | Iterable[str], fid: int | None = None) -> int:
        """A new fid for ``path`` (relative to the attach root).  Caller clunks it."""
        names = self._split(path) if isinstance(path, str) else list(path)
        newfid = self._alloc_fid()
        start = self.root_fid if fid is None else fid
        first = True
        try:
            # Twalk carries at most 16 names; longer paths walk in steps from the newfid.
            while first or names:
                chunk, names = names[:c.MAXWELEM], names[c.MAXWELEM:]
                r = await self._ask(c.Twalk(start if first else newfid, newfid, chunk), c.Rwalk)
                if len(r.wqids) != len(chunk):
                    if not first:
                        await self.clunk(newfid)
                    raise NinepError(errno.ENOENT, os.strerror(errno.ENOENT))
                first = False
        except BaseException:
            if first:
                self._free_fid(newfid)
            raise
        return newfid

    async def clunk(self, fid: int) -> None:
        try:
            await self.rpc(c.Tclunk(fid))
        finally:
            self._free_fid(fid)

    async def stat(self, path: str) -> Stat:
        fid = await self.walk(path)
        try:
            r = await self._ask(c.Tgetattr(fid, c.GETATTR_BASIC), c.Rgetattr)
        finally:
            await self.clunk(fid)
        return Stat(r.qid, r.mode, r.uid, r.gid, r.nlink, r.size,
                    r.mtime_sec * 10**9 + r.mtime_nsec)

    async def listdir(self, path: str = "") -> list[str]:
        """Names in a directory, without ``.`` and ``..``."""
        fid = await self.walk(path)
        names: list[str] = []
        try:
            await self.rpc(c.Tlopen(fid, 0))
            offset = 0
            while True:
                r = await self._ask(c.Treaddir(fid, offset, self.msize - 24), c.Rreaddir)
                ents = c.decode_dirents(r.data)
                if not ents:
                    break
                names.extend(e.name for e in ents if e.name not in (".", ".."))
                offset = ents[-1].offset
        finally:
            await self.clunk(fid)
        return names

    async def mkdir(self, path: str, mode: int = 0o755) -> Qid:
        *parent, name = self._split(path)
        fid = await self.walk(parent)
        try:
            r = await self._ask(c.Tmkdir(fid, name, mode, 0), c.Rmkdir)
        finally:
            await self.clunk(fid)
        return r.qid

    async def unlink(self, path: str, *, directory: bool = False) -> None:
        *parent, name = self._split(path)
        fid = await self.walk(parent)
        try:
            await self.rpc(c.Tunlinkat(fid, name, 0x200 if directory else 0))
            return
        except NinepError as exc:
            # Servers without Tunlinkat (diod 1.0) say EOPNOTSUPP; Linux then falls back
            # to Tremove, and so do we.
            if exc.errno != errno.EOPNOTSUPP:
                raise
        finally:
            await self.clunk(fid)
        fid = await self.walk(path)
        try:
            await self.rpc(c.Tremove(fid))
        finally:
            self._free_fid(fid)  # Tremove clunks the fid whatever its outcome

    async def open(self, path: str, mode: str = "r", perm: int = 0o644) -> File:
        """Open like :func:`open` (modes r, w, a, x, r+, w+; always binary)."""
        m = mode.replace("b", "")
        plus = "+" in m
        m = m.replace("+", "")
        if m == "r":
            flags = _DOTL_RDWR if plus else 0
            fid = await self.walk(path)
            try:
                ro = await self._ask(c.Tlopen(fid, flags), c.Rlopen)
            except BaseException:
                await self.clunk(fid)
                raise
            return File(self, fid, ro.iounit, 0)
        acc = _DOTL_RDWR if plus else _DOTL_WRONLY
        flags = acc | _DOTL_CREATE | {"w": _DOTL_TRUNC, "a": _DOTL_APPEND, "x": _DOTL_EXCL}[m]
        *parent, name = self._split(path)
        fid = await self.walk(parent)
        try:
            r: c.Rlcreate | c.Rlopen = await self._ask(c.Tlcreate(fid, name, flags, perm, 0),
                                                       c.Rlcreate)
        except NinepError as exc:
            if exc.errno != errno.EEXIST or m == "x":
                await self.clunk(fid)
                raise
            # Tlcreate fails on an existing file; open it instead (O_CREAT semantics).
            await self.clunk(fid)
            fid = await self.walk(path)
            try:
                r = await self._ask(c.Tlopen(fid, flags & ~(_DOTL_CREATE | _DOTL_EXCL)),
                                    c.Rlopen)
            except BaseException:
                await self.clunk(fid)
                raise
        except BaseException:
            await self.clunk(fid)
            raise
        pos = 0
        if m == "a":
            g = await self._ask(c.Tgetattr(fid, c.GETATTR_BASIC), c.Rgetattr)
            pos = g.size
        return File(self, fid, r.iounit, pos)

    async def read_file(self, path: str) -> bytes:
        f = await self.open(path)
        try:
            return await f.read()
        finally:
            await f.close()

    async def write_file(self, path: str, data: bytes) -> None:
        f = await self.open(path, "w")
        try:
            await f.write(data)
        finally:
            await f.close()


class File:
    """An open fid with a position; reads and writes are split to fit the msize."""

    def __init__(self, client: Client, fid: int, iounit: int, pos: int) -> None:
        self.client = client
        self.fid = fid
        limit = client.msize - 24
        self.iounit = min(iounit, limit) if iounit else limit
        self.pos = pos
        self.closed = False

    async def pread(self, size: int, offset: int) -> bytes:
        r = await self.client._ask(c.Tread(self.fid, offset, min(size, self.iounit)), c.Rread)
        return bytes(r.data)

    async def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all to EOF when negative)."""
        out = bytearray()
        while size < 0 or len(out) < size:
            want = self.iounit if size < 0 else min(self.iounit, size - len(out))
            data = await self.pread(want, self.pos)
            if not data:
                break
            out += data
            self.pos += len(data)
        return bytes(out)

    async def pwrite(self, data: bytes, offset: int) -> int:
        r = await self.client._ask(c.Twrite(self.fid, offset, data[:self.iounit]), c.Rwrite)
        return r.count

    async def write(self, data: bytes) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            n = await self.pwrite(bytes(view[done:done + self.iounit]), self.pos)
            if n <= 0:
                raise NinepError(errno.EIO, "short write")
            done += n
            self.pos += n
        return done

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.client.clunk(self.fid)

    async def __aenter__(self) -> File:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
