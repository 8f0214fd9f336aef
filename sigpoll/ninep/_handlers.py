"""What the 9P server does for each T-message, keyed by message class.

``HANDLERS[cls]`` is a coroutine function that answers one request, calling blocking file
system work through ``ctx.call`` (a worker thread); ``FAST[cls]``, where present, is its
inline version for the loop thread, used while that kind of call is cheap (see
``_server``): it returns the reply, ``None`` to take the pool path after all, or
:class:`Defer` to continue in the pool with another handler.  Both raise to answer with
an error, and both paths turn an exception into the same Rlerror (:func:`error_reply`).

A handler gets the fid table of the session its request arrived in (see ``_session``)
and the :class:`Serving` context of its connection; it never sees the transport.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, Union

from . import _codec as c
from ._codec import Message, ProtocolError
from ._budget import Account
from ._dirents import read_entries
from ._fs import Export, Handle
from ._session import FidTable, Reply

__all__ = ["HANDLERS", "FAST", "Defer", "Serving", "FileFid", "Handler", "FastHandler",
           "error_reply", "retry_eintr", "pread_into", "V9FS_MAGIC", "IOHDRSZ"]

log = logging.getLogger("sigpoll.ninep")

V9FS_MAGIC = 0x01021997
#: Bytes of Rread/Twrite overhead (size, type, tag, count) and Linux's P9_IOHDRSZ.
RW_OVERHEAD = 11
IOHDRSZ = 24
#: Largest Twrite done inline (bigger ones go to the pool).
INLINE_WRITE_MAX = 256 * 1024
#: Largest xattr value (Linux's XATTR_SIZE_MAX).
XATTR_SIZE_MAX = 64 * 1024
#: Largest offset the host takes (off_t is signed); beyond it the client gets EINVAL.
MAX_OFFSET = (1 << 63) - 1

_RREAD = c.prefix_struct(c.Rread)          # the head of an Rread, up to its data
_RGETATTR = c.prefix_struct(c.Rgetattr)    # a whole Rgetattr
_RWRITE = c.prefix_struct(c.Rwrite)        # a whole Rwrite
_RCLUNK = c.prefix_struct(c.Rclunk)        # a whole Rclunk
_RWF_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: Unused bytes an Rread may keep at the end of its buffer before it is copied out.
_KEEP_SLACK = 4096

T = TypeVar("T")
M = TypeVar("M", bound=Message)


class Serving(Protocol):
    """What a handler may use of the connection serving it."""

    fs: Export
    #: The connection went away (nothing new may be installed).
    lost: bool
    #: Set by a fast handler whose call cannot wait (an RWF_NOWAIT read): it needs no
    #: timing (see the server's demotion rule).
    self_timed: bool

    #: The msize negotiated on the connection.
    msize: int
    #: The connection's share of the server's budgets (fds, fid state).
    account: Account

    async def call(self, fn: Callable[..., T], *args: Any) -> T: ...


class FileFid:
    """A fid: a handle on a file inside the export, and what was opened through it.

    It counts the fds it keeps open (its handle's from the start) and the bytes of state
    it keeps in ``account`` (the connection's), and gives them back when it closes.
    """

    __slots__ = ("handle", "uid", "account", "fds", "state", "open_fd", "xattr",
                 "xattr_new", "refs", "clunked", "regular", "nowait", "dir_lock", "drop_setid")

    def __init__(self, handle: Handle, uid: int, account: Account,
                 xattr: bytes | None = None) -> None:
        self.handle: Handle | None = handle
        self.uid = uid
        self.account = account
        #: Descriptors it keeps open (its handle's, its open file's), and state bytes.
        self.fds = 1
        account.fds_used += 1  # Account.add_fds(1), spelled out: a walk makes one of these
        account.share.fds_used += 1
        account.budget.fds_used += 1
        self.state = 0
        self.open_fd: int | None = None
        self.xattr = xattr
        #: (name, declared size, flags, buffer) while a Txattrcreate fid is being written.
        self.xattr_new: tuple[str, int, int, bytearray] | None = None
        self.refs = 0
        self.clunked = False
        #: The open file is a regular file (reads and writes may run inline).
        self.regular = False
        #: The file system answers RWF_NOWAIT reads (tried until it says EOPNOTSUPP).
        self.nowait = True
        #: Made by the first Treaddir (on the loop thread): one reader of the position at once.
        self.dir_lock: threading.Lock | None = None
        #: Set-id bits still to be cleared before this fid's first write (its uid is not
        #: root's, so it writes as Linux's callers without CAP_FSETID do: Export.drop_setid).
        self.drop_setid = False

    def __repr__(self) -> str:
        return f"<FileFid {self.handle!r} open={self.open_fd} refs={self.refs}>"

    def close(self) -> None:
        if self.open_fd is not None:
            os.close(self.open_fd)
            self.open_fd = None
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        account = self.account
        if self.fds:
            account.add_fds(-self.fds)
            self.fds = 0
        if self.state:
            account.drop_state(self.state)
            self.state = 0

    def read_dir(self, fs: Export, fd: int, offset: int, limit: int) -> list[c.Dirent]:
        """Entries of the open directory from ``offset`` (a worker's call: the position
        belongs to the open file, so one reader at a time)."""
        assert self.dir_lock is not None
        with self.dir_lock:
            return read_entries(fs, fd, self.the_handle(), offset, limit)

    def opened(self, fd: int) -> None:
        """Keep ``fd`` as the open file."""
        self.open_fd = fd
        self.fds += 1
        self.account.add_fds(1)

    def hold_state(self, n: int) -> None:
        """Keep ``n`` more bytes (ENOMEM past the connection's limit); negative: fewer."""
        if n > 0:
            self.account.hold_state(n)
        else:
            self.account.drop_state(-n)
        self.state += n

    def the_handle(self) -> Handle:
        if self.handle is None:
            raise OSError(errno.EBADF, "fid has no file")
        return self.handle


Fids = FidTable[FileFid]
Handler = Callable[[Serving, Any, Fids], Awaitable[Reply]]
FastHandler = Callable[[Serving, Any, Fids], Union[Reply, "Defer", None]]
HANDLERS: dict[type[Message], Handler] = {}
FAST: dict[type[Message], FastHandler] = {}


class Defer:
    """Returned by a fast handler: continue in the pool, with this handler."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler) -> None:
        self.handler = handler


def handles(cls: type[M]) -> Callable[[Callable[[Serving, M, Fids], Awaitable[Reply]]],
                                      Callable[[Serving, M, Fids], Awaitable[Reply]]]:
    def register(fn: Callable[[Serving, M, Fids], Awaitable[Reply]]
                 ) -> Callable[[Serving, M, Fids], Awaitable[Reply]]:
        HANDLERS[cls] = fn
        return fn

    return register


def fast(cls: type[M]) -> Callable[[Callable[[Serving, M, Fids], Reply | Defer | None]],
                                   Callable[[Serving, M, Fids], Reply | Defer | None]]:
    def register(fn: Callable[[Serving, M, Fids], Reply | Defer | None]
                 ) -> Callable[[Serving, M, Fids], Reply | Defer | None]:
        FAST[cls] = fn
        return fn

    return register


def error_reply(exc: BaseException, msg: Message) -> c.Rlerror:
    """The Rlerror for an exception a handler raised (both paths use this)."""
    if isinstance(exc, OSError):
        err = exc.errno or errno.EIO
    elif isinstance(exc, ProtocolError):
        err = exc.errno
    elif isinstance(exc, OverflowError):
        # A client's number that does not fit the host's type (an offset past off_t, a
        # time past time_t): Python ints never overflow on their own, so it is the input.
        err = errno.EINVAL
    else:  # a bug must not kill the connection
        log.error("%s failed", type(msg).__name__, exc_info=exc)
        err = errno.EIO
    return c.Rlerror(err, tag=msg.tag)


def retry_eintr(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, again on EINTR: a client must never see EINTR as a result.

    PEP 475 already retries most calls, but one whose signal handler raised, or a
    ctypes call, can still surface EINTR.
    """
    while True:
        try:
            return fn(*args)
        except InterruptedError:
            continue


def _offset(offset: int) -> int:
    if offset > MAX_OFFSET:
        raise OSError(errno.EINVAL, "offset past the largest the host takes")
    return offset


def _no_nul(text: str, what: str) -> str:
    if "\0" in text:
        raise OSError(errno.EINVAL, f"{what} contains NUL")
    return text


def _uid_for(uname: str, n_uname: int) -> int:
    if n_uname != c.NONUNAME:
        return n_uname
    try:
        return pwd.getpwnam(uname).pw_uid
    except KeyError:
        return 65534


def _iounit(ctx: Serving) -> int:
    return ctx.msize - IOHDRSZ


def _new_fid(ctx: Serving, h: Handle, uid: int, xattr: bytes | None = None) -> FileFid:
    """A fid for the new handle ``h``, its fd counted on the connection."""
    return FileFid(h, uid, ctx.account, xattr)


def _fd_room(ctx: Serving) -> None:
    """Raise EMFILE/ENFILE unless one more fd fits this connection's and server's budget."""
    a = ctx.account
    if (a.fds_used >= a.fds or a.share.fds_used >= a.share.fds
            or a.budget.fds_used >= a.budget.fds):  # Account.room_for_fds(), spelled out
        a.check_fds()


# ---------------------------------------------------------------------------- session


@handles(c.Tauth)
async def _auth(ctx: Serving, m: c.Tauth, fids: Fids) -> Reply:
    # No authentication: ENOENT is the answer diod's own clients take to mean "attach
    # without an afid" (any other errno makes them give up).
    raise OSError(errno.ENOENT, "no authentication needed")


@handles(c.Tattach)
async def _attach(ctx: Serving, m: c.Tattach, fids: Fids) -> Reply:
    if m.afid != c.NOFID:
        raise OSError(errno.EINVAL, "no authentication fids")
    fids.check_new(m.fid)
    _fd_room(ctx)
    fs = ctx.fs
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

    h, qid = await ctx.call(go)
    fids.install(m.fid, _new_fid(ctx, h, _uid_for(m.uname, m.n_uname)))
    return c.Rattach(qid)


# ---------------------------------------------------------------------------- walk


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
                nxt = retry_eintr(fs.walk1, h, name)
            except OSError as exc:
                if h is not start:
                    h.close()
                return None, qids, exc
            if h is not start:
                h.close()
            h = nxt
            qids.append(fs.qid(retry_eintr(fs.stat, h)))
    except BaseException:
        if h is not start:
            h.close()
        raise
    return h, qids, None


def _walk_done(ctx: Serving, m: c.Twalk, fids: Fids, f: FileFid, h: Handle | None,
               qids: list[c.Qid], err: OSError | None) -> Reply:
    if h is None:
        if not qids:
            assert err is not None
            raise err
        return c.Rwalk(qids)  # partial walk: newfid is not created
    if ctx.lost:
        h.close()
        raise OSError(errno.EBADF, "connection closed")
    if m.newfid == m.fid:
        # In place; a concurrent user keeps the old handle alive.
        fids.replace(m.fid, _new_fid(ctx, h, f.uid))
    else:
        fids.install(m.newfid, _new_fid(ctx, h, f.uid))
    return c.Rwalk(qids)


@handles(c.Twalk)
async def _walk(ctx: Serving, m: c.Twalk, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        if m.newfid != m.fid:
            fids.check_new(m.newfid)
        _fd_room(ctx)
        # Walking from an open fid is allowed (diodls lists a directory that way); the
        # walk only uses the O_PATH handle, never the open file.
        h, qids, err = await ctx.call(_walk_work, ctx.fs, f.the_handle(), m.wnames)
    return _walk_done(ctx, m, fids, f, h, qids, err)


@fast(c.Twalk)
def _walk_fast(ctx: Serving, m: c.Twalk, fids: Fids) -> Reply:
    f = fids.borrow(m.fid)
    try:
        if m.newfid != m.fid:
            fids.check_new(m.newfid)
        _fd_room(ctx)
        h, qids, err = _walk_work(ctx.fs, f.the_handle(), m.wnames)
    finally:
        fids.give_back(f)
    return _walk_done(ctx, m, fids, f, h, qids, err)


# ---------------------------------------------------------------------------- open, create


def _opened(ctx: Serving, f: FileFid, fd: int, st: os.stat_result) -> Reply:
    if f.clunked or f.open_fd is not None:
        os.close(fd)
        raise OSError(errno.EBADF, "fid went away meanwhile")
    f.opened(fd)
    f.regular = stat.S_ISREG(st.st_mode)
    f.drop_setid = f.regular and f.uid != 0
    return c.Rlopen(ctx.fs.qid(st), _iounit(ctx))


def _open_fd(fs: Export, h: Handle, flags: int) -> tuple[int, os.stat_result]:
    fd = fs.open(h, flags)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _openable(ctx: Serving, f: FileFid) -> Handle:
    if f.open_fd is not None or f.xattr is not None:
        raise OSError(errno.EBUSY, "fid already open")
    _fd_room(ctx)
    return f.the_handle()


@handles(c.Tlopen)
async def _lopen(ctx: Serving, m: c.Tlopen, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        fd, st = await ctx.call(_open_fd, ctx.fs, _openable(ctx, f), m.flags)
        return _opened(ctx, f, fd, st)


@fast(c.Tlopen)
def _lopen_fast(ctx: Serving, m: c.Tlopen, fids: Fids) -> Reply | None:
    f = fids.borrow(m.fid)
    try:
        h = _openable(ctx, f)
        # Only files whose open cannot wait for another party (a fifo's open waits for
        # its other end, a device's open may do anything): those go to the pool.
        mode = retry_eintr(ctx.fs.stat, h).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return None
        fd, st = retry_eintr(_open_fd, ctx.fs, h, m.flags)
        return _opened(ctx, f, fd, st)
    finally:
        fids.give_back(f)


@handles(c.Tlcreate)
async def _lcreate(ctx: Serving, m: c.Tlcreate, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        if f.open_fd is not None:
            raise OSError(errno.EBUSY, "fid already open")
        _fd_room(ctx)
        d = f.the_handle()
        fs = ctx.fs

        def go() -> tuple[Handle, int, os.stat_result]:
            h, fd = fs.create(d, m.name, m.flags, m.mode, f.uid, m.gid)
            try:
                return h, fd, os.fstat(fd)
            except BaseException:
                h.close()
                os.close(fd)
                raise

        h, fd, st = await ctx.call(go)
        if f.clunked:
            h.close()
            os.close(fd)
            raise OSError(errno.EBADF, "fid went away meanwhile")
        # Tlcreate turns the directory fid into the new, open file.
        old = f.handle
        f.handle = h
        f.opened(fd)
        f.regular = stat.S_ISREG(st.st_mode)
        f.drop_setid = f.regular and f.uid != 0
        if old is not None:
            old.close()
        return c.Rlcreate(fs.qid(st), _iounit(ctx))


# ---------------------------------------------------------------------------- simple calls


def _simple(cls: type[M], reply: Callable[..., Message], fid_fields: tuple[str, ...],
            work: Callable[..., Any], inline: bool = False) -> None:
    """Register a handler: borrow the named fids, run ``work`` in a thread, reply.

    ``inline``: ``work`` is cheap enough to also get an inline version.
    """

    def borrow(m: M, fids: Fids) -> list[FileFid]:
        # The fids ``m`` names, borrowed together (each with a handle), or none of them.
        taken: list[FileFid] = []
        try:
            for name in fid_fields:
                taken.append(fids.borrow(getattr(m, name)))
            for f in taken:
                f.the_handle()
        except BaseException:
            give_back(fids, taken)
            raise
        return taken

    def give_back(fids: Fids, taken: list[FileFid]) -> None:
        for f in taken:
            fids.give_back(f)

    def answer(result: Any) -> Message:
        return reply(*result) if isinstance(result, tuple) else reply()

    async def handler(ctx: Serving, m: M, fids: Fids) -> Reply:
        taken = borrow(m, fids)
        try:
            result = await ctx.call(work, ctx.fs, m, *taken)
        finally:
            give_back(fids, taken)
        return answer(result)

    HANDLERS[cls] = handler
    if not inline:
        return

    def fast_handler(ctx: Serving, m: M, fids: Fids) -> Reply:
        taken = borrow(m, fids)
        try:
            result = retry_eintr(work, ctx.fs, m, *taken)
        finally:
            give_back(fids, taken)
        return answer(result)

    FAST[cls] = fast_handler


def _w_symlink(fs: Export, m: c.Tsymlink, d: FileFid) -> tuple[c.Qid]:
    st = fs.symlink(d.the_handle(), m.name, _no_nul(m.symtgt, "symlink target"), d.uid, m.gid)
    return (fs.qid(st),)


def _w_mknod(fs: Export, m: c.Tmknod, d: FileFid) -> tuple[c.Qid]:
    st = fs.mknod(d.the_handle(), m.name, m.mode, m.major, m.minor, d.uid, m.gid)
    return (fs.qid(st),)


def _w_mkdir(fs: Export, m: c.Tmkdir, d: FileFid) -> tuple[c.Qid]:
    st = fs.mkdir(d.the_handle(), m.name, m.mode, d.uid, m.gid)
    return (fs.qid(st),)


def _w_readlink(fs: Export, m: c.Treadlink, f: FileFid) -> tuple[str]:
    return (fs.readlink(f.the_handle()),)


def _getattr_values(fs: Export, st: os.stat_result) -> tuple[Any, ...]:
    """Rgetattr's fields after its tag, for a stat result."""
    q = fs.qid(st)
    a, m_, c_ = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return (c.GETATTR_BASIC, q[0], q[1], q[2], st.st_mode, st.st_uid, st.st_gid,
            st.st_nlink, st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
            a // 10**9, a % 10**9, m_ // 10**9, m_ % 10**9, c_ // 10**9, c_ % 10**9,
            0, 0, 0, 0)


def _w_getattr(fs: Export, m: c.Tgetattr, f: FileFid) -> tuple[Any, ...]:
    v = _getattr_values(fs, fs.stat(f.the_handle()))
    return (v[0], c.Qid(v[1], v[2], v[3]), *v[4:])


def _w_setattr(fs: Export, m: c.Tsetattr, f: FileFid) -> None:
    fs.setattr(f.the_handle(), m.valid, m.mode, m.uid, m.gid, m.size,
               (m.atime_sec, m.atime_nsec), (m.mtime_sec, m.mtime_nsec))


def _w_statfs(fs: Export, m: c.Tstatfs, f: FileFid) -> tuple[int, ...]:
    v = fs.statfs(f.the_handle())
    return (V9FS_MAGIC, v.f_bsize, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files,
            v.f_ffree, v.f_fsid, v.f_namemax)


def _w_rename(fs: Export, m: c.Trename, f: FileFid, d: FileFid) -> None:
    h = f.the_handle()
    h.path = fs.rename(h, d.the_handle(), m.name)


def _w_renameat(fs: Export, m: c.Trenameat, od: FileFid, nd: FileFid) -> None:
    fs.renameat(od.the_handle(), m.oldname, nd.the_handle(), m.newname)


def _w_unlinkat(fs: Export, m: c.Tunlinkat, d: FileFid) -> None:
    fs.unlinkat(d.the_handle(), m.name, m.flags)


def _w_link(fs: Export, m: c.Tlink, d: FileFid, f: FileFid) -> None:
    fs.link(d.the_handle(), f.the_handle(), m.name)


def _open_of(f: FileFid) -> int:
    if f.open_fd is None:
        raise OSError(errno.EBADF, "not open")
    return f.open_fd


def _w_fsync(fs: Export, m: c.Tfsync, f: FileFid) -> None:
    if m.datasync:
        os.fdatasync(_open_of(f))
    else:
        os.fsync(_open_of(f))


def _w_lock(fs: Export, m: c.Tlock, f: FileFid) -> tuple[int]:
    # Never block a worker: a contended lock answers BLOCKED and the client retries.
    ok = fs.lock(_open_of(f), m.type, m.start, m.length)
    return (c.LOCK_SUCCESS if ok else c.LOCK_BLOCKED,)


def _w_getlock(fs: Export, m: c.Tgetlock, f: FileFid) -> tuple[Any, ...]:
    t, s, n = fs.getlock(_open_of(f), m.type, m.start, m.length)
    return (t, s, n, m.proc_id, m.client_id)


_simple(c.Tsymlink, c.Rsymlink, ("fid",), _w_symlink)
_simple(c.Tmknod, c.Rmknod, ("dfid",), _w_mknod)
_simple(c.Tmkdir, c.Rmkdir, ("dfid",), _w_mkdir)
_simple(c.Treadlink, c.Rreadlink, ("fid",), _w_readlink, inline=True)
_simple(c.Tgetattr, c.Rgetattr, ("fid",), _w_getattr)
_simple(c.Tsetattr, c.Rsetattr, ("fid",), _w_setattr)
_simple(c.Tstatfs, c.Rstatfs, ("fid",), _w_statfs, inline=True)
_simple(c.Trename, c.Rrename, ("fid", "dfid"), _w_rename)
_simple(c.Trenameat, c.Rrenameat, ("olddirfid", "newdirfid"), _w_renameat)
_simple(c.Tunlinkat, c.Runlinkat, ("dirfid",), _w_unlinkat)
_simple(c.Tlink, c.Rlink, ("dfid", "fid"), _w_link)
_simple(c.Tfsync, c.Rfsync, ("fid",), _w_fsync)
_simple(c.Tlock, c.Rlock, ("fid",), _w_lock)
_simple(c.Tgetlock, c.Rgetlock, ("fid",), _w_getlock)


@fast(c.Tgetattr)
def _getattr_fast(ctx: Serving, m: c.Tgetattr, fids: Fids) -> Reply | None:
    # _w_getattr's reply, laid out in one struct call.
    f = fids.borrow(m.fid)
    try:
        st = retry_eintr(ctx.fs.stat, f.the_handle())
    finally:
        fids.give_back(f)
    try:
        return _RGETATTR.pack(_RGETATTR.size, c.Rgetattr.TYPE, m.tag, *_getattr_values(ctx.fs, st))
    except struct.error:  # a value that does not fit (a time before 1970): the pool
        return None  # path, whose codec says which


# ---------------------------------------------------------------------------- read, write


def _rread_frame(count: int) -> bytearray:
    """A zeroed Rread frame with room for ``count`` bytes; :func:`_rread_seal` writes
    the header once the real count is known."""
    return bytearray(_RREAD.size + count)


def _rread_seal(buf: bytearray, tag: int, n: int) -> Reply:
    _RREAD.pack_into(buf, 0, _RREAD.size + n, c.Rread.TYPE, tag, n)
    size = _RREAD.size + n
    if len(buf) - size > _KEEP_SLACK:
        # A short read (the end of the file): a reply of its own size, so that a few
        # bytes queued for a slow client do not keep a buffer the size of the count.
        return bytes(memoryview(buf)[:size])
    return memoryview(buf)[:size]


def pread_into(fd: int, buf: bytearray, got: int, count: int, offset: int,
               regular: bool) -> int:
    """Fill ``buf``'s data part from ``fd`` at ``offset``, from byte ``got`` on."""
    view = memoryview(buf)[_RREAD.size:_RREAD.size + count]
    try:
        while got < count:
            try:
                n = retry_eintr(os.preadv, fd, [view[got:]], offset + got)
            except OSError as exc:
                if exc.errno != errno.ESPIPE or regular:
                    raise
                # A fifo or a character device has no offsets: read it as a stream.
                n = retry_eintr(os.readv, fd, [view[got:]])
            got += n
            # A regular file reads short only at its end; anything else (a fifo, a
            # device) answers with what one read gave, as a local read would.
            if n == 0 or not regular:
                break
    finally:
        view.release()
    return got


async def _read_rest(ctx: Serving, m: c.Tread, fids: Fids, buf: bytearray | None,
                     got: int) -> Reply:
    """Read in a worker; ``buf`` may already hold the first ``got`` bytes."""
    with fids.borrowed(m.fid) as f:
        count = min(m.count, ctx.msize - RW_OVERHEAD)
        if f.xattr is not None:
            return c.Rread(f.xattr[m.offset:m.offset + count])
        fd = _open_of(f)
        if buf is None:
            buf = _rread_frame(count)
        n = await ctx.call(pread_into, fd, buf, got, count, _offset(m.offset), f.regular)
        return _rread_seal(buf, m.tag, n)


@handles(c.Tread)
async def _read(ctx: Serving, m: c.Tread, fids: Fids) -> Reply:
    return await _read_rest(ctx, m, fids, None, 0)


@fast(c.Tread)
def _read_fast(ctx: Serving, m: c.Tread, fids: Fids) -> Reply | Defer | None:
    f = fids.get(m.fid)
    if (f is None or f.clunked or f.open_fd is None or not f.regular or f.xattr is not None
            or m.offset > MAX_OFFSET):
        return None  # errors and the rarer cases are the pool path's business
    fd = f.open_fd
    count = min(m.count, ctx.msize - RW_OVERHEAD)
    buf = _rread_frame(count)
    view = memoryview(buf)[_RREAD.size:]
    try:
        while True:
            try:
                if f.nowait and _RWF_NOWAIT:
                    # Only what the page cache holds, never waiting for the disk; so
                    # this call needs no timing.
                    ctx.self_timed = True
                    n = os.preadv(fd, [view], m.offset, _RWF_NOWAIT)
                    if n < count and m.offset + n < os.fstat(fd).st_size:
                        # Only part of it is cached: a worker reads the rest.
                        return Defer(lambda ctx, m, fids: _read_rest(ctx, m, fids, buf, n))
                else:
                    n = os.preadv(fd, [view], m.offset)
                break
            except InterruptedError:
                continue
            except BlockingIOError:
                # Not cached: a worker thread waits for the disk instead.
                return Defer(lambda ctx, m, fids: _read_rest(ctx, m, fids, buf, 0))
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP or not f.nowait:
                    raise
                # No RWF_NOWAIT on this file system (tmpfs): plain reads, timed.
                f.nowait = False
                ctx.self_timed = False
    finally:
        view.release()
    return _rread_seal(buf, m.tag, n)


def _pwrite(fd: int, data: c.Data, offset: int, regular: bool) -> int:
    try:
        return os.pwrite(fd, data, offset)
    except OSError as exc:
        if exc.errno != errno.ESPIPE or regular:
            raise
        return os.write(fd, data)  # a fifo or a character device has no offsets


@handles(c.Twrite)
async def _write(ctx: Serving, m: c.Twrite, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        if f.xattr_new is not None:
            name, size, flags, buf = f.xattr_new
            end = m.offset + len(m.data)
            if end > size:
                raise OSError(errno.ENOSPC, "past the declared xattr size")
            if len(buf) < end:
                buf.extend(bytes(end - len(buf)))
            buf[m.offset:end] = m.data
            return c.Rwrite(len(m.data))
        if f.drop_setid and f.uid != 0:
            await ctx.call(ctx.fs.drop_setid, f.the_handle())
            f.drop_setid = False
        n = await ctx.call(_pwrite, _open_of(f), m.data, _offset(m.offset), f.regular)
        return c.Rwrite(n)


@fast(c.Twrite)
def _write_fast(ctx: Serving, m: c.Twrite, fids: Fids) -> Reply | None:
    f = fids.get(m.fid)
    if (f is None or f.clunked or f.open_fd is None or not f.regular
            or f.xattr_new is not None or len(m.data) > INLINE_WRITE_MAX
            or m.offset > MAX_OFFSET or (f.drop_setid and f.uid != 0)):
        return None
    n = retry_eintr(os.pwrite, f.open_fd, m.data, m.offset)
    return _RWRITE.pack(_RWRITE.size, c.Rwrite.TYPE, m.tag, n)


# ---------------------------------------------------------------------------- directories


@handles(c.Treaddir)
async def _readdir(ctx: Serving, m: c.Treaddir, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        fd = _open_of(f)
        if f.dir_lock is None:
            f.dir_lock = threading.Lock()
        limit = min(m.count, ctx.msize - RW_OVERHEAD)
        # Read from the kernel's own position each time: nothing is kept between two
        # Treaddirs, however large the directory (see _dirents).
        entries = await ctx.call(f.read_dir, ctx.fs, fd, m.offset, limit)
        data, _ = c.encode_dirents(entries, limit)
        return c.Rreaddir(data)


# ---------------------------------------------------------------------------- clunk, remove


@handles(c.Tclunk)
async def _clunk(ctx: Serving, m: c.Tclunk, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        fids.drop(m.fid)
        if f.xattr_new is not None:
            name, size, flags, buf = f.xattr_new
            f.xattr_new = None
            if len(buf) != size:
                raise OSError(errno.EINVAL, "xattr value shorter than declared")
            # An empty value with XATTR_REPLACE removes the attribute.
            value = bytes(buf) if size or not flags & c.XATTR_REPLACE else None
            await ctx.call(ctx.fs.setxattr, f.the_handle(), name, value, flags)
        return c.Rclunk()


@fast(c.Tclunk)
def _clunk_fast(ctx: Serving, m: c.Tclunk, fids: Fids) -> Reply | None:
    f = fids.get(m.fid)
    if f is None or f.xattr_new is not None:
        return None  # an error, or an xattr to set: the pool path
    fids.drop(m.fid)
    return _RCLUNK.pack(_RCLUNK.size, c.Rclunk.TYPE, m.tag)


@handles(c.Tremove)
async def _remove(ctx: Serving, m: c.Tremove, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        # The fid is clunked whether or not the remove succeeds (9P's rule).
        fids.drop(m.fid)
        await ctx.call(ctx.fs.remove, f.the_handle())
        return c.Rremove()


# ---------------------------------------------------------------------------- xattrs


@handles(c.Txattrwalk)
async def _xattrwalk(ctx: Serving, m: c.Txattrwalk, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        fids.check_new(m.newfid)
        _fd_room(ctx)
        h = f.the_handle()
        value = await ctx.call(ctx.fs.getxattr, h, _no_nul(m.name, "xattr name"))
        x = _new_fid(ctx, ctx.fs.clone(h), f.uid, xattr=value)
        try:
            x.hold_state(len(value))  # kept on the new fid until it is clunked: it counts
        except OSError:
            x.close()
            raise
        fids.install(m.newfid, x)
        return c.Rxattrwalk(len(value))


@handles(c.Txattrcreate)
async def _xattrcreate(ctx: Serving, m: c.Txattrcreate, fids: Fids) -> Reply:
    with fids.borrowed(m.fid) as f:
        if ctx.fs.read_only:
            raise OSError(errno.EROFS, "read-only export")
        if m.attr_size > XATTR_SIZE_MAX:
            raise OSError(errno.E2BIG, "xattr value too large")
        # The value arrives in Twrites on this fid and is applied when it is clunked; its
        # declared size counts from now on.
        name = _no_nul(m.name, "xattr name")
        ctx.fs.check_xattr_name(name)  # a name the security model refuses fails here
        if f.xattr_new is not None:
            f.hold_state(-f.xattr_new[1])
        f.xattr_new = None
        f.hold_state(m.attr_size)
        f.xattr_new = (name, m.attr_size, m.flags, bytearray())
        return c.Rxattrcreate()
