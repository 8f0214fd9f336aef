"""The server against real peers (diod's clients, PyPI p9fs), our client against diod,
confinement, read-only exports, transports, hostile input and fd leaks."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from sigpoll.ninep import Client, NinepError, NinepServer
from sigpoll.ninep import _codec as c
from support.ninep import DiodProcess, HoldHook, HoldingServer, RawClient, find_diod_tool

BIG = os.urandom(300_000)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "hello.txt").write_bytes(b"hello\n")
    (d / "big").write_bytes(BIG)
    (d / "sub").mkdir()
    (d / "sub" / "deep").write_bytes(b"deep\n")
    return d


def _tool(name: str) -> str:
    path = find_diod_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install diod)")
    return path


async def _serve(export: Path, **kw: object) -> tuple[NinepServer, int]:
    server = NinepServer(export, **kw)  # type: ignore[arg-type]
    srv = await server.start_tcp("127.0.0.1", 0)
    return server, srv.sockets[0].getsockname()[1]


async def _run_tool(*argv: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out, err


# ----------------------------------------------------------------------------- peers


def test_diodls_and_diodcat_against_our_server(run, export: Path) -> None:
    diodls, diodcat = _tool("diodls"), _tool("diodcat")

    async def body() -> None:
        server, port = await _serve(export)
        addr = f"127.0.0.1:{port}"
        rc, out, err = await _run_tool(diodls, "-s", addr, "-a", str(export), "-l", "/")
        assert rc == 0, err
        names = [line.split()[-1] for line in out.decode().splitlines()]
        assert sorted(names) == [".", "..", "big", "hello.txt", "sub"]
        assert any(line.startswith("d") and line.endswith(" sub")
                   for line in out.decode().splitlines())
        rc, out, err = await _run_tool(diodls, "-s", addr, "-a", str(export), "-l", "/sub")
        assert rc == 0 and out.decode().split()[-1] == "deep", err
        rc, out, err = await _run_tool(diodcat, "-s", addr, "-a", str(export), "hello.txt")
        assert (rc, out) == (0, b"hello\n"), err
        rc, out, err = await _run_tool(diodcat, "-s", addr, "-a", str(export), "big")
        assert rc == 0 and out == BIG, err
        rc, out, err = await _run_tool(diodcat, "-s", addr, "-a", str(export), "nope")
        assert rc != 0
        await server.close()

    run(body())


def test_p9fs_client_against_our_server(run, export: Path) -> None:
    p9fs = pytest.importorskip("p9fs", reason="pip install p9fs")

    async def body() -> None:
        hook = HoldHook()
        server = HoldingServer(export, hook)
        port = (await server.start_tcp("127.0.0.1", 0)).sockets[0].getsockname()[1]  # type: ignore[attr-defined]

        def use() -> None:
            fs = p9fs.P9FileSystem(host="127.0.0.1", port=port, username="root",
                                   aname=str(export))
            names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls("/", detail=False))
            assert names == ["big", "hello.txt", "sub"]
            assert fs.cat("hello.txt") == b"hello\n"
            assert fs.cat("/sub/deep") == b"deep\n"  # "/" first walk element: stays put
            assert fs.info("big")["size"] == len(BIG)
            assert fs.cat("big") == BIG
            fs.pipe("newfile", b"written by p9fs")
            assert fs.isdir("sub") and not fs.exists("missing")

        await asyncio.to_thread(use)
        assert (export / "newfile").read_bytes() == b"written by p9fs"
        # p9fs really does send "/" as a walk element; we treat it as "stay here".
        assert any("/" in m.wnames for m in hook.seen if m.TYPE == 110)
        await server.close()

    run(body())


def test_our_client_against_diod(run, export: Path) -> None:
    _tool("diod")

    async def body() -> None:
        with DiodProcess(str(export)) as diod:
            cl = await Client.connect_tcp("127.0.0.1", diod.port, aname=str(export))
            assert cl.msize <= 65536
            assert sorted(await cl.listdir("")) == ["big", "hello.txt", "sub"]
            assert await cl.read_file("big") == BIG
            assert (await cl.stat("sub")).is_dir
            await cl.write_file("sub/new", b"x" * 200_000)
            assert (export / "sub" / "new").read_bytes() == b"x" * 200_000
            await cl.mkdir("made")
            await cl.unlink("made", directory=True)
            await cl.unlink("sub/new")
            with pytest.raises(NinepError) as info:
                await cl.stat("missing")
            assert info.value.errno == errno.ENOENT
            # Many requests in flight at once, answered out of order is fine.
            sizes = await asyncio.gather(*(cl.stat("big") for _ in range(50)))
            assert {s.size for s in sizes} == {len(BIG)}
            await cl.close()

    run(body())


def test_our_client_against_our_server_full_ops(run, export: Path) -> None:
    async def body() -> None:
        server, port = await _serve(export)
        cl = await Client.connect_tcp("127.0.0.1", port)
        f = await cl.open("sub/a", "w")
        await f.write(b"abc" * 100_000)
        await f.close()
        f = await cl.open("sub/a", "a")
        await f.write(b"END")
        await f.close()
        assert (export / "sub" / "a").read_bytes() == b"abc" * 100_000 + b"END"
        # symlink, readlink, link, renameat, setattr, statfs, fsync, lock, xattr
        d = await cl.walk("sub")
        r = await cl.rpc(c.Tsymlink(d, "ln", "../hello.txt", 0))
        assert r.qid.type == c.QTSYMLINK
        ln = await cl.walk("sub/ln")
        assert (await cl.rpc(c.Treadlink(ln))).target == "../hello.txt"
        with pytest.raises(NinepError) as info:
            await cl.rpc(c.Tlopen(ln, 0))  # a symlink is never followed
        assert info.value.errno == errno.ELOOP
        await cl.clunk(ln)
        a = await cl.walk("sub/a")
        await cl.rpc(c.Tlink(d, a, "hard"))
        assert os.stat(export / "sub" / "hard").st_ino == os.stat(export / "sub" / "a").st_ino
        await cl.rpc(c.Trenameat(d, "hard", d, "hard2"))
        assert (export / "sub" / "hard2").exists()
        await cl.rpc(c.Tsetattr(a, c.SETATTR_MODE | c.SETATTR_SIZE, 0o600, 0, 0, 5,
                                0, 0, 0, 0))
        st = os.stat(export / "sub" / "a")
        assert (st.st_mode & 0o777, st.st_size) == (0o600, 5)
        sfs = await cl.rpc(c.Tstatfs(a))
        assert sfs.bsize > 0
        await cl.rpc(c.Tlopen(a, 2))
        await cl.rpc(c.Tfsync(a, 0))
        assert (await cl.rpc(c.Tlock(a, c.LOCK_TYPE_WRLCK, 0, 0, 0, 1, "me"))).status == 0
        gl = await cl.rpc(c.Tgetlock(a, c.LOCK_TYPE_WRLCK, 0, 0, 1, "me"))
        assert gl.type == c.LOCK_TYPE_UNLCK  # our own OFD lock does not conflict
        await cl.rpc(c.Trename(a, d, "renamed"))
        assert (export / "sub" / "renamed").exists()
        await cl.clunk(a)
        # user xattr: create, read back, list
        x = await cl.walk("sub/renamed")
        await cl.rpc(c.Txattrcreate(x, "user.k", 3, 0))
        await cl.rpc(c.Twrite(x, 0, b"val"))
        await cl.clunk(x)
        x = await cl.walk("sub/renamed")
        nx = cl._alloc_fid()
        r = await cl.rpc(c.Txattrwalk(x, nx, "user.k"))
        assert r.size == 3
        assert (await cl.rpc(c.Tread(nx, 0, 100))).data == b"val"
        await cl.clunk(nx)
        await cl.clunk(x)
        await cl.rpc(c.Tmknod(d, "fifo", 0o10644, 0, 0, 0))
        assert os.path.exists(export / "sub" / "fifo")
        await cl.rpc(c.Tunlinkat(d, "fifo", 0))
        # Tremove clunks the fid even when it fails.
        victim = await cl.walk("sub/renamed")
        await cl.rpc(c.Tremove(victim))
        assert not (export / "sub" / "renamed").exists()
        with pytest.raises(NinepError):
            await cl.rpc(c.Tclunk(victim))
        await cl.clunk(d)
        await cl.close()
        await server.close()

    run(body())


# ----------------------------------------------------------------------------- confinement


@pytest.fixture
def jail(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    d = tmp_path / "export"
    d.mkdir()
    (d / "inner").mkdir()
    os.symlink("/", d / "abs")
    os.symlink("../outside", d / "rel")
    os.symlink("..", d / "inner" / "up")
    os.symlink(str(tmp_path / "outside" / "secret"), d / "secretlink")
    return d


def test_confinement(run, jail: Path) -> None:
    async def body() -> None:
        server, port = await _serve(jail)
        cl = await Client.connect_tcp("127.0.0.1", port)
        root_ino = os.stat(jail).st_ino
        # ".." at the root stays at the root, however many.
        fid = await cl.walk([".."] * 10)
        st = await cl.rpc(c.Tgetattr(fid, c.GETATTR_BASIC))
        assert st.qid.path == root_ino
        await cl.clunk(fid)
        fid = await cl.walk(["inner", "..", "..", ".."])
        assert (await cl.rpc(c.Tgetattr(fid, c.GETATTR_BASIC))).qid.path == root_ino
        await cl.clunk(fid)
        # Symlinks are leaves: never walked through, never opened.
        for path in (["abs", "etc"], ["rel", "secret"], ["inner", "up", "..", "outside"]):
            with pytest.raises(NinepError):
                await cl.walk(path)
        for name in ("secretlink", "abs"):
            fid = await cl.walk(name)
            with pytest.raises(NinepError) as info:
                await cl.rpc(c.Tlopen(fid, 0))
            assert info.value.errno == errno.ELOOP
            await cl.clunk(fid)
        # Creating through a symlink name does not follow it either.
        d = await cl.walk("")
        with pytest.raises(NinepError):
            await cl.rpc(c.Tlcreate(d, "secretlink", 0o1 | 0o100, 0o644, 0))
        for bad in ("a/b", "..", ".", "", "/etc/x"):
            with pytest.raises(NinepError) as info:
                await cl.rpc(c.Tmkdir(d, bad, 0o755, 0))
            assert info.value.errno == errno.EINVAL
        await cl.clunk(d)
        # Names with slashes in a walk do not resolve paths.
        with pytest.raises(NinepError):
            await cl.walk(["../outside"])
        # aname cannot climb out either.
        with pytest.raises(NinepError) as info:
            await Client.connect_tcp("127.0.0.1", port, aname="../../outside")
        assert info.value.errno == errno.ENOENT
        cl2 = await Client.connect_tcp("127.0.0.1", port, aname="../../inner")
        assert (await cl2.stat("")).qid.path == os.stat(jail / "inner").st_ino
        await cl2.close()
        assert (jail.parent / "outside" / "secret").read_bytes() == b"secret"
        await cl.close()
        await server.close()

    run(body())


def test_symlink_swapped_in_during_walks(run, jail: Path) -> None:
    """A thread keeps replacing a directory with a symlink to the outside; no walk may
    ever reach the outside file."""

    async def body() -> None:
        server, port = await _serve(jail)
        cl = await Client.connect_tcp("127.0.0.1", port)
        target = jail / "swap"
        stop = threading.Event()

        def flipper() -> None:
            outside = str(jail.parent / "outside")
            while not stop.is_set():
                try:
                    target.mkdir()
                    (target / "secret").write_bytes(b"inside")
                    (target / "secret").unlink()
                    target.rmdir()
                    os.symlink(outside, target)
                    target.unlink()
                except OSError:
                    pass

        th = threading.Thread(target=flipper)
        th.start()
        reached = 0
        try:
            for _ in range(300):
                try:
                    fid = await cl.walk(["swap", "secret"])
                except NinepError:
                    continue
                try:
                    await cl.rpc(c.Tlopen(fid, 0))
                    data = (await cl.rpc(c.Tread(fid, 0, 100))).data
                    assert data != b"secret"
                    reached += 1
                except NinepError:
                    pass
                finally:
                    await cl.clunk(fid)
        finally:
            stop.set()
            th.join()
        await cl.close()
        await server.close()

    run(body())


def test_read_only_export(run, export: Path) -> None:
    async def body() -> None:
        server, port = await _serve(export, read_only=True)
        cl = await Client.connect_tcp("127.0.0.1", port)
        assert await cl.read_file("hello.txt") == b"hello\n"
        d = await cl.walk("sub")
        f = await cl.walk("hello.txt")
        attempts = [
            c.Tlopen(f, 1), c.Tlopen(f, 2), c.Tlopen(f, 0o1000),
            c.Tlcreate(d, "x", 1, 0o644, 0), c.Tmkdir(d, "x", 0o755, 0),
            c.Tsymlink(d, "x", "y", 0), c.Tmknod(d, "x", 0o10644, 0, 0, 0),
            c.Tunlinkat(d, "deep", 0), c.Trenameat(d, "deep", d, "x"),
            c.Tsetattr(f, c.SETATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0),
            c.Tlink(d, f, "x"), c.Txattrcreate(f, "user.x", 1, 0),
        ]
        for msg in attempts:
            with pytest.raises(NinepError) as info:
                await cl.rpc(msg)
            assert info.value.errno == errno.EROFS, msg
        with pytest.raises(NinepError) as info:
            await cl.rpc(c.Tremove(f))
        assert info.value.errno == errno.EROFS
        assert (export / "hello.txt").read_bytes() == b"hello\n"
        assert (export / "sub" / "deep").exists()
        await cl.close()
        await server.close()

    run(body())


def test_squash_uid(run, export: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")

    async def body() -> None:
        server, port = await _serve(export, squash_uid=4321, squash_gid=4322)
        cl = await Client.connect_tcp("127.0.0.1", port, n_uname=0)
        await cl.write_file("sq", b"1")
        await cl.mkdir("sqd")
        for name in ("sq", "sqd"):
            st = os.stat(export / name)
            assert (st.st_uid, st.st_gid) == (4321, 4322)
        await cl.close()
        await server.close()

    run(body())


# ----------------------------------------------------------------------------- hostile input


def test_unknown_and_malformed_messages(run, export: Path) -> None:
    async def body() -> None:
        server, port = await _serve(export)
        raw = await RawClient.connect("127.0.0.1", port)
        # Before Tversion: refused, not crashed.
        r = await raw.rpc(c.Tclunk(0, tag=1))
        assert (r.TYPE, r.ecode) == (7, errno.EPROTO)
        await raw.handshake()
        raw.send_raw(struct.pack("<IBH", 7, 200, 9))  # unknown type
        r = await raw.recv()
        assert (r.TYPE, r.tag, r.ecode) == (7, 9, errno.EOPNOTSUPP)
        raw.send_raw(struct.pack("<IBHI", 11, 110, 10, 0))  # truncated Twalk
        r = await raw.recv()
        assert (r.TYPE, r.tag, r.ecode) == (7, 10, errno.EPROTO)
        raw.send(c.Rclunk(tag=11))  # an R-message sent to the server
        r = await raw.recv()
        assert (r.TYPE, r.tag) == (7, 11)
        for msg in (c.Tclunk(77, tag=12), c.Tread(77, 0, 10, tag=13), c.Twalk(0, 0xFFFFFFFF, [], tag=14)):
            r = await raw.rpc(msg)
            assert (r.TYPE, r.ecode) == (7, errno.EBADF), msg
        # Still alive:
        r = await raw.rpc(c.Tgetattr(0, c.GETATTR_BASIC, tag=15))
        assert r.TYPE == 25
        # Broken framing (size larger than msize) closes the connection.
        raw.send_raw(struct.pack("<IBH", 10_000_000, 118, 16))
        assert await raw.at_eof()
        await raw.close()
        raw = await RawClient.connect("127.0.0.1", port)
        raw.send_raw(struct.pack("<I", 3))
        assert await raw.at_eof()
        await raw.close()
        await asyncio.sleep(0.1)
        assert not server.connections
        await server.close()

    run(body())


def test_msize_negotiation(run, export: Path) -> None:
    async def body() -> None:
        server, port = await _serve(export, msize=65536)
        raw = await RawClient.connect("127.0.0.1", port)
        r = await raw.rpc(c.Tversion(1 << 20, "9P2000.L", tag=c.NOTAG))
        assert (r.msize, r.version) == (65536, "9P2000.L")
        r = await raw.rpc(c.Tversion(8192, "9P2000.L.extra", tag=c.NOTAG))
        assert (r.msize, r.version) == (8192, "9P2000.L")
        r = await raw.rpc(c.Tversion(8192, "9P2000", tag=c.NOTAG))
        assert r.version == "unknown"
        r = await raw.rpc(c.Tversion(8192, "9P2000.L", tag=c.NOTAG))
        await raw.rpc(c.Tattach(0, c.NOFID, "root", "", 0, tag=1))
        r = await raw.rpc(c.Tread(0, 0, 1 << 20, tag=2))  # no open: error, no crash
        assert r.TYPE == 7
        fid = 5
        await raw.rpc(c.Twalk(0, fid, ["big"], tag=3))
        await raw.rpc(c.Tlopen(fid, 0, tag=4))
        r = await raw.rpc(c.Tread(fid, 0, 1 << 20, tag=5))
        assert len(r.data) == 8192 - 11  # clipped to what fits in msize
        await raw.close()
        await server.close()

    run(body())


def test_no_fd_leaks_over_many_connections(run, export: Path) -> None:
    def nfds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def body() -> None:
        server, port = await _serve(export)
        # Warm up the thread pool and the loop's own descriptors.
        cl = await Client.connect_tcp("127.0.0.1", port)
        await cl.read_file("hello.txt")
        await cl.close()
        await asyncio.sleep(0.1)
        before = nfds()
        for i in range(60):
            cl = await Client.connect_tcp("127.0.0.1", port)
            f = await cl.open("big")
            await f.read(1000)
            await cl.walk("sub")
            d = await cl.walk("sub")
            await cl.rpc(c.Tlopen(d, 0))
            # Leave everything open: the server must release it on disconnect.
            if i % 2:
                cl._transport.abort()  # type: ignore[union-attr]
            else:
                cl._transport.close()  # type: ignore[union-attr]
            cl._lost(None)
        for _ in range(50):
            await asyncio.sleep(0.05)
            if not server.connections and nfds() <= before:
                break
        assert not server.connections
        assert nfds() <= before
        await server.close()

    run(body())


# ----------------------------------------------------------------------------- transports


def test_unix_socket_transport(run, export: Path, tmp_path: Path) -> None:
    async def body() -> None:
        server = NinepServer(export)
        path = str(tmp_path / "9p.sock")
        await server.start_unix(path)
        cl = await Client.connect_unix(path)
        assert await cl.read_file("sub/deep") == b"deep\n"
        await cl.close()
        await server.close()

    run(body())


def test_fd_pair_transports(run, export: Path) -> None:
    """trans=fd: one socketpair end, or two pipes (read fd, write fd)."""

    async def body() -> None:
        server = NinepServer(export)
        a, b = socket.socketpair()
        job = asyncio.ensure_future(server.serve_fds(a.fileno()))
        cl = await Client.connect_fds(b.fileno())
        assert await cl.read_file("big") == BIG
        await cl.close()
        a.close()
        b.close()
        await asyncio.wait_for(job, 5)

        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        job = asyncio.ensure_future(server.serve_fds(r1, w2))
        cl = await Client.connect_fds(r2, w1, msize=8192)
        assert await cl.read_file("big") == BIG
        await cl.write_file("via-pipe", b"p" * 50_000)
        assert (export / "via-pipe").read_bytes() == b"p" * 50_000
        await cl.close()
        for fd in (r1, w1, r2, w2):
            os.close(fd)
        await asyncio.wait_for(job, 5)
        await server.close()

    run(body())


# ----------------------------------------------------------------------------- fast path


def test_inline_rread_frame_matches_the_codec() -> None:
    from sigpoll.ninep import _handlers as h

    buf = h._rread_frame(10)
    buf[11:16] = b"hello"
    assert bytes(h._rread_seal(buf, 0x1234, 5)) == c.encode(c.Rread(b"hello", tag=0x1234))


def test_fifo_open_and_read_never_wait(run, export: Path) -> None:
    """A fifo is opened non-blocking, so nothing waits for its other end in a worker:
    the open answers at once, a read with nothing written answers EAGAIN, and a
    write-only open with no reader answers ENXIO (tests/test_ninep_export_security.py
    has the many-clients version of this)."""

    async def body() -> None:
        os.mkfifo(export / "fifo")
        server, port = await _serve(export)
        cl = await Client.connect_tcp("127.0.0.1", port)
        f = await asyncio.wait_for(cl.open("fifo"), 10)
        wfd = os.open(export / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        try:
            with pytest.raises(NinepError) as info:
                await f.pread(100, 0)
            assert info.value.errno == errno.EAGAIN
            os.write(wfd, b"through the fifo")
            assert await asyncio.wait_for(f.pread(100, 0), 10) == b"through the fifo"
        finally:
            os.close(wfd)
        await f.close()
        os.mkfifo(export / "fifo2")
        with pytest.raises(NinepError) as info:
            await asyncio.wait_for(cl.open("fifo2", "w"), 10)
        assert info.value.errno == errno.ENXIO
        await cl.close()
        await server.close()

    run(body())


def test_slow_inline_call_is_sent_to_the_pool(run, export: Path) -> None:
    """An inline call that sleeps past the budget sends its kind to the pool."""
    import time

    from sigpoll.ninep import _server as s

    async def body() -> None:
        server, port = await _serve(export)
        cl = await Client.connect_tcp("127.0.0.1", port)
        fid = await cl.walk("hello.txt")
        real_stat = server.export.stat
        on_loop = threading.get_ident()
        threads: list[bool] = []

        def slow(h):  # type: ignore[no-untyped-def]
            threads.append(threading.get_ident() == on_loop)
            time.sleep(s.INLINE_BUDGET * 4)
            return real_stat(h)

        server.export.stat = slow  # type: ignore[method-assign]
        await cl.rpc(c.Tgetattr(fid, c.GETATTR_BASIC))
        assert c.Tgetattr in server._demoted
        await cl.rpc(c.Tgetattr(fid, c.GETATTR_BASIC))
        assert threads == [True, False]  # first inline, then in a worker
        server.export.stat = real_stat  # type: ignore[method-assign]
        await cl.clunk(fid)
        await cl.close()
        await server.close()

    run(body())


def test_uncached_reads_go_to_a_worker(run, export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data that is not in the page cache is read by a worker (RWF_NOWAIT said so)."""
    from sigpoll.ninep import _handlers as s

    path = export / "cold"
    data = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    calls: list[int] = []
    real = s.pread_into

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(s, "pread_into", counting)

    async def body() -> None:
        server, port = await _serve(export)
        cl = await Client.connect_tcp("127.0.0.1", port, msize=65536)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert await cl.read_file("cold") == data
        await cl.close()
        await server.close()

    run(body())
    try:
        fd = os.open(path, os.O_RDONLY)
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        os.close(fd)
    except OSError:
        return  # no RWF_NOWAIT here: reads are inline and timed instead
    assert calls, "every read was served inline although the file was not cached"


def test_hot_layouts_come_from_the_codec() -> None:
    """The structs the server lays its hottest replies out with are the codec's own:
    a frame packed with prefix_struct decodes to the message, and encodes back the same."""
    import random

    rng = random.Random(5)
    u32, u64 = (lambda: rng.getrandbits(32)), (lambda: rng.getrandbits(64))
    for _ in range(200):
        tag = rng.getrandbits(16)
        qid = c.Qid(rng.getrandbits(8), u32(), u64())
        values = [u64(), qid, u32(), u32(), u32(), *(u64() for _ in range(15))]
        st = c.prefix_struct(c.Rgetattr)
        flat = [values[0], *qid, *values[2:]]
        frame = st.pack(st.size, c.Rgetattr.TYPE, tag, *flat)
        assert c.decode(frame) == c.Rgetattr(*values, tag=tag)
        assert c.encode(c.Rgetattr(*values, tag=tag)) == frame
        data = rng.randbytes(rng.randrange(0, 300))
        head = c.prefix_struct(c.Rread)
        assert head.pack(head.size + len(data), c.Rread.TYPE, tag, len(data)) + data == \
            c.encode(c.Rread(data, tag=tag))
    # Twrite decoded with views shares the frame's bytes instead of copying them.
    wire = c.encode(c.Twrite(1, 2, b"abc", tag=1))
    m = c.decode(wire, views=True)
    assert isinstance(m, c.Twrite) and isinstance(m.data, memoryview) and m.data == b"abc"
    assert c.decode(wire) == c.Twrite(1, 2, b"abc", tag=1)


def test_framebuffer_matches_a_plain_reference_framer() -> None:
    """Cut at random places, the zero-copy FrameBuffer yields the frames a plain framer
    (size, then that many bytes) yields, and refuses a bad size."""
    import random

    rng = random.Random(7)
    msgs = [c.Twrite(i, i, rng.randbytes(rng.randrange(0, 5000)), tag=i) for i in range(40)]
    stream = b"".join(c.encode(m) for m in msgs)
    want = [c.encode(m) for m in msgs]
    for _ in range(30):
        ours = c.FrameBuffer(8192)
        got: list[bytes] = []
        pos = 0
        while pos < len(stream):
            step = rng.choice([1, 2, 3, 5, 100, 4096, 9000, 70000])
            got.extend(bytes(f) for f in ours.feed(stream[pos:pos + step]))
            pos += step
        assert got == want and len(ours) == 0
    bad = c.encode(c.Tclunk(1, tag=1)) + (9000).to_bytes(4, "little") + b"x" * 20
    for chunks in ([bad], [bad[:13], bad[13:]]):
        ours = c.FrameBuffer(8192)
        with pytest.raises(c.FramingError) as err:
            for ch in chunks:
                ours.feed(ch)
        assert "outside [7, 8192]" in str(err.value)
        with pytest.raises(c.FramingError):
            ours.feed(b"more")
