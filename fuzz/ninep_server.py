"""Fuzz target: the 9P2000.L server's state machine, over a real socket, on sigpoll's loop.

One long-lived :class:`NinepServer` exports a scratch directory that sits next to an
``outside`` directory holding a ``secret``; the export starts every input with the same
small tree (a file, a directory, symlinks pointing at the secret by relative and absolute
paths).  Each input becomes a byte stream sent over a socketpair to a fresh connection:

* even first byte -- *raw*: the rest of the input is the stream, as is (only cut into
  frames by a reference framer, so the harness knows what the server should see);
* odd first byte -- *structured*: Tversion and Tattach, then a program of T-messages
  with fields from a vocabulary that hits the interesting cases (fids 0-5 and NOFID,
  ``..``, ``.``, empty names, slashes, NULs, symlinks out of the export, huge offsets,
  odd open flags and modes, tag reuse, flushes of recent tags, R-messages, new Tversions).

Two things are rewritten before sending, for the machine's sake and not the server's:
Tsymlink targets are replaced by targets inside the scratch area (so a server bug could
only ever reach the ``secret``), and Tmknod creates regular files or sockets (never a device
node, nor a FIFO whose open would block a worker forever -- see docs/fuzzing.md).

Checked after each input: no exception escaped into the loop; every reply decodes;
every reply's tag was sent and its type answers a request with that tag (or is
Rlerror); no tag gets more replies than requests; while the connection stays up every
request gets its reply unless a Tflush or a later Tversion may have aborted it; the
connection is closed by the server only when the framing was broken (a size field below
7 or above the negotiated msize) or a tag was sent again (maybe while still in flight);
nothing outside the export appeared, changed mode or
content; the connection's fids are all released when it ends.  The server must reach
that end within a deadline (a hang fails).  Handler exceptions the server catches and
answers with EIO (logged with a traceback) are recorded in :data:`CAUGHT` and reported;
they fail the input (``SIGPOLL_FUZZ_STRICT=0`` only counts them).

Run longer: ``python fuzz/ninep_server.py [workdir] [-max_total_time=600] ...``
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import errno
import logging
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

from _fuzzcommon import ByteReader, fuzz_main, instrumentation  # noqa: E402

with instrumentation(__name__):
    import sigpoll
    from sigpoll.ninep import _codec as c
    from sigpoll.ninep._server import NinepServer

__all__ = ["TARGET", "CAUGHT", "Reader", "one_input", "structured_input", "raw_input",
           "shutdown"]

TARGET = "ninep_server"

MSIZE = 16384
DEADLINE = float(os.environ.get("SIGPOLL_FUZZ_DEADLINE", "20"))
_STRICT = os.environ.get("SIGPOLL_FUZZ_STRICT", "1") == "1"  # findings fixed: strict by default
_HEADER = struct.Struct("<IBH")

#: ``"Tname: ExcType: message"`` -> count, for handler exceptions the server caught.
CAUGHT: collections.Counter[str] = collections.Counter()

_T_TYPES = sorted(t for t in c.MESSAGE_CLASSES if t % 2 == 0)
_FIDS_U32 = ("fid", "dfid", "newfid", "olddirfid", "newdirfid", "dirfid")
_NAMES = ["file", "dir", "inner", "link_out", "abs_out", "dirlink", "new", "new2", "..", ".",
          "", "a/b", "x\0y", "/", "..\x2f..", "\udcff", "n" * 300, "dir/inner"]
_OPEN_FLAGS = [0, 1, 2, 3, 0o100 | 2, 0o1000 | 1, 0o200000, 0o2000 | 1, 0o4000, 0o10000 | 2,
               0o40000, 0o400000, 0o1000000, 0o4000000 | 2, 0xFFFFFFFF]
_MODES = [0o644, 0o755, 0o100644, 0o140644, 0o10644, 0o20644, 0o60644, 0o4755, 0, 0xFFFFFFFF]
_U64S = [0, 1, 5, 4096, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
_COUNTS = [0, 1, 7, 4096, MSIZE, 1 << 31, 0xFFFFFFFF]
_XATTRS = ["user.fuzz", "user.x", "", "trusted.x", "security.x", "system.posix_acl_access",
           "user." + "a" * 300]


# --------------------------------------------------------------------------- environment


class _Env:
    """The loop, server and scratch tree shared by every input (built on first use)."""

    def __init__(self) -> None:
        self.loop = sigpoll.new_event_loop()
        self.top = tempfile.mkdtemp(prefix="fuzz-9p-")
        self.export = os.path.join(self.top, "export")
        self.outside = os.path.join(self.top, "outside")
        self.secret = os.path.join(self.outside, "secret")
        os.mkdir(self.export)
        os.mkdir(self.outside)
        with open(self.secret, "wb") as f:
            f.write(b"do not touch\n")
        self.safe_targets = ["../outside/secret", self.secret, "../outside", "file", "dir/inner",
                             "/", "..", "dangling", self.outside]
        self.snapshot = self._outside_state()
        self.server = NinepServer(self.export, msize=MSIZE, workers=4)
        self.escaped: list[str] = []
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(self._loop_error)
        handler = _Trap()
        logging.getLogger("sigpoll.ninep").addHandler(handler)
        self.trap = handler
        atexit.register(self.close)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, object]) -> None:
        exc = ctx.get("exception")
        self.loop_errors.append(f"{ctx.get('message')}: {exc!r}")

    def _outside_state(self) -> list[tuple[str, int, int, int, int, bytes]]:
        state = []
        for path in (self.top, self.outside, self.secret):
            st = os.lstat(path)
            body = open(path, "rb").read() if stat.S_ISREG(st.st_mode) else b""
            state.append((path, st.st_mode, st.st_uid, st.st_gid, st.st_size, body))
        return state

    def check_outside(self) -> None:
        top = sorted(os.listdir(self.top))
        assert top == ["export", "outside"], f"escaped: {top} next to the export"
        out = sorted(os.listdir(self.outside))
        assert out == ["secret"], f"escaped: {out} in the outside directory"
        now = self._outside_state()
        assert now == self.snapshot, f"escaped: outside changed {self.snapshot} -> {now}"

    def reset_export(self) -> None:
        """Back to the baseline tree, in place (the server holds the root open)."""
        os.chmod(self.export, 0o755)
        os.chown(self.export, 0, 0)
        for name in os.listxattr(self.export):
            try:
                os.removexattr(self.export, name)
            except OSError:
                pass
        for name in os.listdir(self.export):
            path = os.path.join(self.export, name)
            if os.path.isdir(path) and not os.path.islink(path):
                for root, dirs, _ in os.walk(path):
                    for d in dirs:
                        p = os.path.join(root, d)
                        if not os.path.islink(p):
                            os.chmod(p, 0o700)
                shutil.rmtree(path)
            else:
                os.unlink(path)
        with open(os.path.join(self.export, "file"), "wb") as f:
            f.write(b"hello 9p\n")
        os.mkdir(os.path.join(self.export, "dir"))
        with open(os.path.join(self.export, "dir", "inner"), "wb") as f:
            f.write(b"inner\n")
        os.symlink("../outside/secret", os.path.join(self.export, "link_out"))
        os.symlink(self.secret, os.path.join(self.export, "abs_out"))
        os.symlink("../outside", os.path.join(self.export, "dirlink"))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        atexit.unregister(self.close)
        try:
            self.loop.run_until_complete(self.server.close())
            self.loop.close()
        finally:
            shutil.rmtree(self.top, ignore_errors=True)
        if CAUGHT:
            print("ninep_server: handler exceptions the server caught (answered EIO):",
                  file=sys.stderr)
            for what, n in CAUGHT.most_common():
                print(f"  {n:6d}  {what}", file=sys.stderr)


class _Trap(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_env: _Env | None = None


def shutdown() -> None:
    """Close the shared server, loop and scratch tree (the next input builds new ones)."""
    global _env
    env, _env = _env, None
    if env is not None:
        env.close()


def _get_env() -> _Env:
    global _env
    if _env is None:
        _env = _Env()
    return _env


# --------------------------------------------------------------------------- inputs


def _value(r: ByteReader, name: str, kind: str, cls: type[c.Message], tags: list[int]) -> object:
    kind = kind.rstrip("?")
    if kind == "u32" and name in _FIDS_U32 + ("afid",):
        sel = r.u8()
        return sel % 6 if sel < 240 else (c.NOFID if sel < 250 else r.uint(4))
    if kind == "s":
        if name == "version":
            return r.pick(["9P2000.L", "9P2000.L", "9P2000", "9P2000.u", "", "9P2000.Lx"])
        if name == "name" and cls.TYPE in (30, 32):
            return r.pick(_XATTRS)
        if name == "symtgt":
            return r.pick(["../outside/secret", "x"])  # rewritten anyway
        if name == "aname":
            return r.pick(["", "dir", "/", "..", "dirlink", "link_out"])
        if name == "uname":
            return r.pick(["root", "nobody", "", "no-such-user"])
        sel = r.u8()
        return _NAMES[sel % len(_NAMES)] if sel < 250 else r.take(r.u8() % 16).decode("latin-1")
    if kind == "u8":
        return r.u8() % 4 if r.u8() % 8 else r.u8()
    if kind == "u16":  # only Tflush's oldtag
        return r.pick(tags) if tags and r.u8() % 4 else r.uint(2)
    if kind == "u32":
        if name == "flags" and cls.TYPE in (12, 14):
            return r.pick(_OPEN_FLAGS) if r.u8() % 8 else r.uint(4)
        if name == "mode":
            return r.pick(_MODES)
        if name == "count":
            return r.pick(_COUNTS)
        if name == "msize":
            return r.pick([MSIZE, 8192, 4096, 4095, 0, 1 << 20, 0xFFFFFFFF])
        if name == "n_uname":
            return r.pick([c.NONUNAME, 0, 65534, 1000])
        if name == "valid":
            return r.uint(2) & 0x1FF
        if name in ("gid", "uid"):
            return r.pick([0, 65534, 0xFFFFFFFF, 1000])
        return r.pick([0, 1, 2, 0xFFFFFFFF]) if r.u8() % 2 else r.uint(4)
    if kind == "u64":
        if name == "request_mask":
            return c.GETATTR_ALL
        return r.pick(_U64S) if r.u8() % 2 else r.uint(2)
    if kind == "data":
        return r.take(r.u8())
    if kind == "wnames":
        n = r.u8() % 4 if r.u8() % 16 else 17
        return [r.pick(_NAMES) for _ in range(n)]
    if kind == "qid":
        return c.Qid(0, 0, 0)
    if kind == "wqids":
        return []
    raise AssertionError(kind)


def structured_input(data: bytes) -> list[bytes]:
    """Frames of a structured program (the first byte of a fuzz input is already gone)."""
    r = ByteReader(data)
    frames = [c.encode(c.Tversion(MSIZE, c.VERSION_9P2000L, tag=c.NOTAG)),
              c.encode(c.Tattach(0, c.NOFID, "root", "", 0, tag=1))]
    tags = [1]
    next_tag = 2
    while len(r) and len(frames) < 48:
        sel = r.u8()
        if sel >= 250:  # garbage frame: any type id, any body
            body = r.take(r.u8() % 32)
            frames.append(_HEADER.pack(7 + len(body), r.u8(), r.uint(2)) + body)
            continue
        mtype = _T_TYPES[sel % len(_T_TYPES)] if sel < 240 else r.pick(sorted(c.MESSAGE_CLASSES))
        cls = c.MESSAGE_CLASSES[mtype]
        if r.u8() % 16 == 0 and tags:
            tag = r.pick(tags)  # reuse: possibly still pending
        else:
            tag, next_tag = next_tag, next_tag + 1
        values = [_value(r, n, k, cls, tags) for n, k in zip(cls.FIELDS, cls.KINDS)]
        msg = cls(*values, tag=c.NOTAG if mtype == 100 else tag)
        try:
            frames.append(c.encode(msg))
        except c.ProtocolError:
            continue
        tags.append(tag)
    return frames


def raw_input(data: bytes) -> tuple[list[bytes], bool]:
    """Frames of a raw stream, and whether its framing is broken.

    A last frame cut short (size field included) is completed with zero bytes --
    otherwise the server would only wait for the rest; a size field below 7 or above
    MSIZE ends the stream there, as broken.
    """
    frames: list[bytes] = []
    pos = 0
    while pos < len(data):
        head = data[pos:pos + 4].ljust(4, b"\0")
        (size,) = struct.unpack("<I", head)
        if size < c.HEADER_SIZE or size > MSIZE:
            frames.append(data[pos:].ljust(4, b"\0"))
            return frames, True
        frames.append(data[pos:pos + size].ljust(size, b"\0"))
        pos += size
    return frames, False


def _sanitize(frame: bytes, env: _Env, salt: int) -> bytes:
    """Keep the machine safe: no symlink targets outside the scratch area, no device
    nodes or FIFOs.  Anything else goes through untouched."""
    if len(frame) < c.HEADER_SIZE or frame[4] not in (16, 18):
        return frame
    try:
        msg = c.decode(frame)
    except c.ProtocolError:
        return frame
    if msg.TYPE == 16:
        msg.symtgt = env.safe_targets[(salt + len(msg.name)) % len(env.safe_targets)]
    else:
        fmt = stat.S_IFMT(msg.mode)
        if fmt not in (0, stat.S_IFREG, stat.S_IFSOCK):
            msg.mode = (msg.mode & 0o7777) | stat.S_IFREG
    return c.encode(msg)


# --------------------------------------------------------------------------- the run


class Reader:
    """Reads a socket with a time limit per read, losing nothing.

    ``asyncio.wait_for(loop.sock_recv(...), t)`` loses the bytes of a recv that completes
    in the same loop iteration as the timeout on Python 3.12 and later (its ``wait_for``
    cancels the finished task and drops its result); that made this harness report a
    server "hung" with nothing pending (issue 19, item 3).  Here one recv stays
    outstanding across reads and a timeout never cancels it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._recv: asyncio.Future[bytes] | None = None

    async def read(self, timeout: float) -> bytes | None:
        """The next bytes (b"" at EOF), or None if none came within ``timeout``."""
        if self._recv is None:
            self._recv = asyncio.ensure_future(
                asyncio.get_running_loop().sock_recv(self.sock, 1 << 16))
        done, _ = await asyncio.wait({self._recv}, timeout=timeout)
        if not done:
            return None
        recv, self._recv = self._recv, None
        try:
            return recv.result()
        except ConnectionResetError:
            return b""

    def close(self) -> None:
        if self._recv is not None:
            self._recv.cancel()
            self._recv = None



def _segments(frames: list[bytes], broken: bool) -> list[list[bytes]]:
    """Where to pause sending (finding S1, fixed; see docs/fuzzing.md).

    The server used to lose a request whose task was cancelled before its first step,
    which a Tflush, a Tversion or a lost connection in the *same read* does.  Strict (the
    default) sends everything in one write, so that path stays covered;
    SIGPOLL_FUZZ_STRICT=0 pauses before each Tflush/Tversion and broken framing, as the
    harness did while the bug was open.
    """
    if _STRICT:
        return [frames]
    out: list[list[bytes]] = [[]]
    for i, f in enumerate(frames):
        kind = f[4] if len(f) >= c.HEADER_SIZE else -1
        last = broken and i == len(frames) - 1
        if out[-1] and (kind == 108 or (kind == 100 and i > 0) or last):
            out.append([])
        out[-1].append(f)
    return out


async def _exchange(env: _Env, frames: list[bytes], broken: bool) -> tuple[bytes, bool, list[int]]:
    """Send the frames (with sentinels) and collect every reply.

    Returns the replies' bytes, whether the server closed the connection, and the
    sentinel tags used (each a Tflush of itself, answered like any request).
    """
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    conn = env.server.protocol("fuzz")
    await loop.connect_accepted_socket(lambda: conn, theirs)
    used = {_HEADER.unpack_from(f)[2] for f in frames if len(f) >= c.HEADER_SIZE}
    sentinels: list[int] = []

    def fresh() -> int:
        tag = next(t for t in range(0x7000 + len(sentinels), 0x10000) if t not in used)
        used.add(tag)
        sentinels.append(tag)
        return tag

    segments = _segments(frames, broken)
    replies = bytearray()
    closed = False

    def answered(tag: int) -> bool:
        # The sentinel's answer: Rflush, or Rlerror while no session is negotiated.
        pos = 0
        while len(replies) - pos >= c.HEADER_SIZE:
            size, _, rtag = _HEADER.unpack_from(replies, pos)
            if size < c.HEADER_SIZE or len(replies) - pos < size:
                return False
            if rtag == tag:
                return True
            pos += size
        return False

    reader = Reader(ours)

    async def receive_until(done: object) -> bool:
        """Read replies until ``done()``; False if the server closed first."""
        nonlocal closed
        while not done():  # type: ignore[operator]
            chunk = await reader.read(0.05)
            if chunk is None:
                continue
            if not chunk:
                closed = True
                return False
            replies.extend(chunk)
        return True

    try:
        async with asyncio.timeout(DEADLINE):
            for i, seg in enumerate(segments):
                stream = b"".join(seg)
                final = i == len(segments) - 1
                sentinel = None
                if not (final and broken):
                    # A Tflush of a tag nobody uses is answered at once, in order: once
                    # its Rflush is back, the server has dispatched everything before it.
                    sentinel = fresh()
                    stream += c.encode(c.Tflush(sentinel, tag=sentinel))
                try:
                    await loop.sock_sendall(ours, stream)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                if sentinel is None:
                    await receive_until(lambda: False)
                    break
                if not await receive_until(lambda: answered(sentinel)):
                    break
            if not closed:
                await receive_until(lambda: not conn.session.pending)
                # Replies may still sit in the server's write path; one more sentinel,
                # answered after all of them, flushes them out to us.
                last = fresh()
                await loop.sock_sendall(ours, c.encode(c.Tflush(last, tag=last)))
                await receive_until(lambda: answered(last))
            ours.close()
            await conn.closed
    except TimeoutError:
        raise AssertionError(f"server hung: pending={conn.session.pending!r} inflight={conn.inflight} "
                             f"closed={conn.closed.done()} stalled={conn.stalled()}") from None
    finally:
        reader.close()
        ours.close()
    assert not conn.session.fids, "fids left after the connection ended"
    return bytes(replies), closed, sentinels


def _check(frames: list[bytes], broken: bool, replies: bytes, closed: bool, sentinels: list[int]) -> None:
    requests: collections.Counter[int] = collections.Counter(sentinels)
    types: dict[int, set[int]] = collections.defaultdict(set)
    for tag in sentinels:
        types[tag].add(108)
    must_answer: collections.Counter[int] = collections.Counter()
    limit = MSIZE
    may_close = broken
    decoded = []
    for f in frames:
        if len(f) < c.HEADER_SIZE or _HEADER.unpack_from(f)[0] != len(f):
            continue
        size, mtype, tag = _HEADER.unpack_from(f)
        if size > limit:
            may_close = True  # beyond the negotiated msize: the server may cut us off
        requests[tag] += 1
        types[tag].add(mtype)
        if requests[tag] > 1 and mtype != c.Tversion.TYPE:
            # A tag sent again, maybe while its first request was still in flight: the
            # server closes the connection then (no reply under that tag would be safe).
            may_close = True
        try:
            msg: c.Message | None = c.decode(f)
        except c.ProtocolError:
            msg = None
        decoded.append((tag, msg))
        if msg is not None and msg.TYPE == 100 and msg.msize >= 4096 and msg.version.startswith(c.VERSION_9P2000L):
            limit = min(limit, msg.msize)
    # Requests that a later Tflush or Tversion may legitimately abort (no reply).
    for i, (tag, msg) in enumerate(decoded):
        later = decoded[i + 1:]
        if any(m is not None and (m.TYPE == 100 or (m.TYPE == 108 and m.oldtag == tag)) for _, m in later):
            continue
        must_answer[tag] += 1
    got: collections.Counter[int] = collections.Counter()
    fb = c.FrameBuffer(1 << 30)
    for frame in fb.feed(replies):
        reply = c.decode(frame)  # a reply that does not decode is a server bug
        assert reply.TYPE % 2 == 1, f"server sent a T-message {reply!r}"
        got[reply.tag] += 1
        ok_types = {t + 1 for t in types.get(reply.tag, ())} | {c.Rlerror.TYPE}
        assert reply.tag in types, f"reply to a tag never sent: {reply!r}"
        assert reply.TYPE in ok_types, f"{reply!r} answers none of {sorted(types[reply.tag])}"
    assert len(fb) == 0, "the server's reply stream ends in a partial frame"
    for tag, n in got.items():
        if tag in requests:
            assert n <= requests[tag], f"tag {tag}: {n} replies to {requests[tag]} requests"
    if closed:
        assert may_close, "the server closed a connection whose framing was fine"
    else:
        assert not broken, "the server kept a connection with broken framing"
        for tag, n in must_answer.items():
            assert got[tag] >= n, f"tag {tag}: {got[tag]} replies, {n} requests needed one"


def one_input(data: bytes) -> None:
    """Play one input against the shared server; any contract breach raises."""
    env = _get_env()
    env.reset_export()
    if data[:1] and data[0] & 1:
        frames, broken = structured_input(data[1:]), False
    else:
        frames, broken = raw_input(data[1:])
    frames = [_sanitize(f, env, i) for i, f in enumerate(frames)]
    env.trap.records.clear()
    env.loop_errors.clear()
    replies, closed, sentinels = env.loop.run_until_complete(_exchange(env, frames, broken))
    assert not env.loop_errors, env.loop_errors
    for rec in env.trap.records:
        if rec.exc_info and rec.exc_info[1] is not None:
            exc = rec.exc_info[1]
            where = rec.getMessage().replace("ninep: ", "")
            key = f"{where}: {type(exc).__name__}: {exc}"
            if key not in CAUGHT:  # libFuzzer may _exit without atexit: say it now
                print(f"ninep_server: server caught (answered EIO): {key}", file=sys.stderr)
            CAUGHT[key] += 1
    if _STRICT:
        assert not env.trap.records, [env.trap.format(r) for r in env.trap.records]
    _check(frames, broken, replies, closed, sentinels)
    env.check_outside()


if __name__ == "__main__":
    fuzz_main(one_input, TARGET)
