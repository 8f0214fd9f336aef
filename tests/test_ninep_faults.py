"""Fault injection (issue 8, 9P part): broken peers, a full disk, permission errors and
signal storms.  Each time the client gets the right answer, the server keeps serving,
and no fid or descriptor is left behind."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sigpoll.ninep import Client, NinepError, NinepServer
from sigpoll.ninep import _codec as c
from support.ninep import HoldHook, RawClient, serve_tcp, until

BIG = os.urandom(1 << 20)
NOBODY = 65534


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "f").write_bytes(b"faults\n")
    (d / "big").write_bytes(BIG)
    return d


def _nfds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))






async def _still_serves(port: int) -> None:
    cl = await Client.connect_tcp("127.0.0.1", port)
    assert await cl.read_file("f") == b"faults\n"
    await cl.close()


# ----------------------------------------------------------------------------- broken peers


def test_peer_dies_mid_message(run, export: Path) -> None:
    """Half a Twrite frame, then the peer is gone: its open fids are released."""

    async def body() -> None:
        server, port = await serve_tcp(export)
        await _still_serves(port)  # warm up the pool threads
        before = _nfds()
        for cut in (3, 7, 30, 5000):
            raw = await RawClient.connect("127.0.0.1", port)
            await raw.handshake()
            await raw.rpc(c.Twalk(0, 1, ["big"], tag=2))
            await raw.rpc(c.Tlopen(1, 2, tag=3))
            frame = c.encode(c.Twrite(1, 0, b"w" * 10000, tag=4))
            raw.send_raw(frame[:cut])
            await raw.writer.drain()
            await raw.close()
        await until(lambda: not server.connections)
        assert _nfds() <= before
        assert (export / "big").read_bytes() == BIG  # no half-written frame was applied
        await _still_serves(port)
        await server.close()

    run(body())


def test_frames_trickled_byte_by_byte(run, export: Path) -> None:
    async def body() -> None:
        server, port = await serve_tcp(export)
        raw = await RawClient.connect("127.0.0.1", port)
        sock = raw.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msgs = (
            c.Tversion(65536, c.VERSION_9P2000L, tag=c.NOTAG),
            c.Tattach(0, c.NOFID, "root", "", 0, tag=1),
            c.Twalk(0, 1, ["big"], tag=2),
            c.Tlopen(1, 0, tag=3),
            c.Tread(1, 1000, 5000, tag=4),
            c.Tclunk(1, tag=5),
        )
        replies = []
        # One message at a time (each depends on the one before: 9P does not order
        # requests that are in flight together), each one byte at a time.
        for msg in msgs:
            data = c.encode(msg)
            for i in range(len(data)):
                raw.send_raw(data[i:i + 1])
                await raw.writer.drain()
                await asyncio.sleep(0)
            replies.append(await raw.recv())
        assert [r.TYPE for r in replies] == [101, 105, 111, 13, 117, 121]
        assert replies[4].data == BIG[1000:6000]
        conn = next(iter(server.connections))
        assert list(conn.session.fids) == [0]
        await raw.close()
        await server.close()

    run(body())


def test_peer_disconnects_with_requests_in_the_pool(run, export: Path) -> None:
    """A request running in a worker, one queued behind it and one held: the peer goes
    away.  The running one finishes, the others are dropped, every fid is closed."""

    async def body() -> None:
        gate = threading.Event()
        hook = HoldHook()
        server, port = await serve_tcp(export, hook=hook, workers=1)
        await _still_serves(port)
        before = _nfds()
        real_stat = server.export.stat
        started = threading.Event()

        def slow_stat(h):  # type: ignore[no-untyped-def]
            started.set()
            gate.wait(10)
            return real_stat(h)

        raw = await RawClient.connect("127.0.0.1", port)
        await raw.handshake()
        await raw.rpc(c.Twalk(0, 1, ["big"], tag=2))
        await raw.rpc(c.Tlopen(1, 0, tag=3))
        hook.hold(12, "before")
        server.export.stat = slow_stat  # type: ignore[method-assign]
        raw.send(c.Tgetattr(1, c.GETATTR_BASIC, tag=10), c.Tgetattr(1, c.GETATTR_BASIC, tag=11),
                 c.Tread(1, 0, 100, tag=12))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        await hook.reached(12)
        conn = next(iter(server.connections))
        await raw.close()
        await until(lambda: conn.lost)
        assert not conn.closed.done()  # tag 10 is still in the file system
        assert 12 in hook.cancelled
        gate.set()
        await asyncio.wait_for(conn.closed, 10)
        server.export.stat = real_stat  # type: ignore[method-assign]
        assert not conn.session.fids and not server.connections
        assert _nfds() <= before
        await _still_serves(port)
        await server.close()

    run(body())


# ----------------------------------------------------------------------------- host errors


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs with 32 inodes, so that writes and mkdirs run out of space."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=32,mode=0755",
                        "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        (mnt / "f").write_bytes(b"faults\n")
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_reaches_the_client(run, tiny_fs: Path) -> None:
    async def body() -> None:
        server, port = await serve_tcp(tiny_fs)
        await _still_serves(port)
        before = _nfds()
        cl = await Client.connect_tcp("127.0.0.1", port, msize=16384)
        conn = next(iter(server.connections))
        for attempt in range(2):
            f = await cl.open(f"fill{attempt}", "w")
            with pytest.raises(NinepError) as err:
                await f.write(os.urandom(256 * 1024))
            assert err.value.errno == errno.ENOSPC
            await f.close()
            await cl.unlink(f"fill{attempt}")
        with pytest.raises(NinepError) as err:  # out of inodes is ENOSPC as well
            for i in range(100):
                await cl.mkdir(f"d{i}")
        assert err.value.errno == errno.ENOSPC
        conn_fids = len(conn.session.fids)
        for j in range(i):
            await cl.unlink(f"d{j}", directory=True)
        assert len(conn.session.fids) == conn_fids
        assert await cl.read_file("f") == b"faults\n"  # and it keeps serving
        assert list(conn.session.fids) == [0]
        await cl.close()
        await until(lambda: not server.connections)
        assert _nfds() <= before
        await server.close()

    run(body())


def _fork_server_as_nobody(export: Path) -> tuple[int, int]:
    """A server process that has dropped root (so permissions are checked for real);
    returns its pid and port.  Forked before any loop runs in this process."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

            async def serve() -> None:
                server = NinepServer(export)
                await server.start_socket(lsock)
                await asyncio.Future()

            loop = asyncio.new_event_loop()
            loop.run_until_complete(serve())
        finally:
            os._exit(status)
    lsock.close()
    return pid, port


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged server can reach (pytest's own tmp is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="ninep-perm-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_eacces_as_an_unprivileged_server(run, open_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start a server that drops to another user")
    export = open_dir / "perm"
    export.mkdir(mode=0o755)
    (export / "f").write_bytes(b"faults\n")
    (export / "secret").write_bytes(b"root only\n")
    os.chmod(export / "secret", 0o600)
    (export / "mine").mkdir()
    os.chown(export / "mine", NOBODY, NOBODY)
    pid, port = _fork_server_as_nobody(export)

    async def body() -> None:
        cl = await Client.connect_tcp("127.0.0.1", port)
        assert await cl.read_file("f") == b"faults\n"  # warm up
        before = _nfds(pid)
        for attempt in (lambda: cl.read_file("secret"),
                        lambda: cl.write_file("new", b"x"),
                        lambda: cl.mkdir("newdir"),
                        lambda: cl.open("f", "r+")):
            with pytest.raises(NinepError) as err:
                await attempt()
            assert err.value.errno == errno.EACCES
        await cl.write_file("mine/ok", b"allowed\n")  # where nobody may write, it works
        assert await cl.read_file("mine/ok") == b"allowed\n"
        await cl.close()
        await asyncio.sleep(0.1)
        cl = await Client.connect_tcp("127.0.0.1", port)
        assert await cl.read_file("f") == b"faults\n"
        assert _nfds(pid) <= before
        await cl.close()

    try:
        run(body())
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ----------------------------------------------------------------------------- signals


def test_signal_storm_during_big_transfers(run, export: Path) -> None:
    """SIGUSR1 in bursts, with a Python handler, while 16 MiB go each way (inline and
    through the pool): every interrupted host call is retried, the checksums match,
    nothing leaks."""
    payload = os.urandom(16 << 20)
    got = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal got
        got += 1

    async def body() -> None:
        server, port = await serve_tcp(export, workers=4)
        await _still_serves(port)
        before = _nfds()
        stop = threading.Event()

        def storm() -> None:
            pid = os.getpid()
            while not stop.is_set():
                for _ in range(50):  # a burst, then a breath so the others get the GIL
                    os.kill(pid, signal.SIGUSR1)
                time.sleep(0.0002)

        old = signal.signal(signal.SIGUSR1, handler)
        th = threading.Thread(target=storm)
        th.start()
        try:
            for inline in (True, False):
                server.inline = inline
                cl = await Client.connect_tcp("127.0.0.1", port, msize=65536)
                f = await cl.open("up", "w")
                chunk = cl.msize - 24

                async def put(off: int) -> None:
                    assert await f.pwrite(payload[off:off + chunk], off) == len(
                        payload[off:off + chunk])

                await asyncio.gather(*(put(o) for o in range(0, len(payload), chunk)))
                await f.close()
                back = await cl.read_file("up")
                assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
                assert (export / "up").read_bytes() == payload
                await cl.unlink("up")
                await cl.close()
        finally:
            stop.set()
            th.join(10)
            signal.signal(signal.SIGUSR1, old)
        assert got > 0
        await until(lambda: not server.connections)
        assert _nfds() <= before
        await server.close()

    run(body())


@pytest.mark.parametrize("abort", ["flush", "version", "hang-up"])
def test_a_request_aborted_in_the_same_read_is_finished(run, export: Path, abort: str) -> None:
    """A Tflush, a Tversion or a hang-up that arrives in the same read as its target cancels
    the target before its task has run a step; the flush is still answered, the target gets
    no reply, and the connection still closes (found by fuzz/ninep_server.py)."""

    async def main() -> None:
        server = NinepServer(str(export))
        a, b = socket.socketpair()
        conn = server.protocol("same-read")
        await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, b)
        frames = c.encode(c.Tversion(8192, "9P2000.L", tag=c.NOTAG)) + c.encode(
            c.Tattach(0, c.NOFID, "root", "", 0, tag=1)
        )
        if abort == "flush":
            frames += c.encode(c.Tflush(1, tag=2))
        elif abort == "version":
            frames += c.encode(c.Tversion(8192, "9P2000.L", tag=c.NOTAG))
        a.sendall(frames)
        if abort != "hang-up":
            a.setblocking(False)
            replies: list[c.Message] = []
            buf = c.FrameBuffer(1 << 20)

            def got_all() -> bool:
                try:
                    replies.extend(c.decode(f) for f in buf.feed(a.recv(65536)))
                except BlockingIOError:
                    pass
                return len(replies) >= 2

            await until(got_all)
            assert [type(r).__name__ for r in replies] == (
                ["Rversion", "Rflush"] if abort == "flush" else ["Rversion", "Rversion"]
            )
        a.close()
        await asyncio.wait_for(asyncio.shield(conn.closed), 10)
        assert not conn.session.pending and not conn.session.fids

    run(main())
