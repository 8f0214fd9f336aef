"""Limits (issue 8, 9P part): each cap is hit by a real client, answers clearly, and
leaves nothing behind (fids and descriptors back to where they were)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
from pathlib import Path

import pytest

from sigpoll.ninep import Client, Limits, NinepError, NinepServer
from sigpoll.ninep import _codec as c
from support.ninep import HoldHook, RawClient, serve_tcp, until

BIG = os.urandom(1 << 20)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "f").write_bytes(b"limits\n")
    (d / "big").write_bytes(BIG)
    return d


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))






def test_limits_reject_bad_values() -> None:
    for name in ("max_fids", "max_inflight", "max_connections", "max_queued_output",
                 "max_connections_per_peer", "max_connection_memory", "max_server_memory",
                 "max_fds", "max_connection_fds", "max_threads_per_peer", "max_peer_fds"):
        for bad in (0, -1, 1.5, True, "3"):
            with pytest.raises(ValueError, match=name):
                Limits(**{name: bad})  # type: ignore[arg-type]
    for bad in (0, -1, True, "3"):
        with pytest.raises(ValueError, match="version_timeout"):
            Limits(version_timeout=bad)  # type: ignore[arg-type]
    assert Limits(max_queued_output=1234).max_connection_memory == 1234
    with pytest.raises(ValueError, match="workers"):
        NinepServer("/", workers=0)
    with pytest.raises(ValueError, match="msize"):
        NinepServer("/", msize=100)


def test_max_fids_emfile_and_clunk_frees(run, export: Path) -> None:
    async def body() -> None:
        before = _nfds()
        server, port = await serve_tcp(export, limits=Limits(max_fids=4))
        cl = await Client.connect_tcp("127.0.0.1", port)  # the root fid is one of the 4
        fids = [await cl.walk("f") for _ in range(3)]
        conn = next(iter(server.connections))
        assert len(conn.session.fids) == 4
        attempts = [
            lambda: cl.walk("f"),
            lambda: cl.rpc(c.Tattach(99, c.NOFID, "root", "", 0)),
            lambda: cl.rpc(c.Txattrwalk(0, 98, "user.x")),
        ]
        for attempt in attempts:
            with pytest.raises(NinepError) as err:
                await attempt()
            assert err.value.errno == errno.EMFILE
        assert len(conn.session.fids) == 4  # nothing half-made
        await cl.rpc(c.Twalk(fids[0], fids[0], []))  # no new fid: fine at the cap
        await cl.clunk(fids.pop())
        fids.append(await cl.walk("f"))  # the clunk made room
        for fid in fids:
            await cl.clunk(fid)
        # An open file counts like any fid; the open one keeps working meanwhile.
        f = await cl.open("f")
        g = await cl.open("f")
        h = await cl.open("f")
        with pytest.raises(NinepError) as err:
            await cl.open("big")
        assert err.value.errno == errno.EMFILE
        assert await f.read() == b"limits\n"
        for x in (f, g, h):
            await x.close()
        assert await cl.read_file("big") == BIG
        await cl.close()
        await server.close()
        assert _nfds() <= before

    run(body())


def test_max_inflight_stops_reading(run, export: Path) -> None:
    """Past max_inflight the server reads no more requests (backpressure), and takes
    them up again, in order, as the held ones finish."""

    async def body() -> None:
        hook = HoldHook()
        server, port = await serve_tcp(export, hook=hook, limits=Limits(max_inflight=2))
        raw = await RawClient.connect("127.0.0.1", port)
        await raw.handshake()
        for tag in (10, 11):
            hook.hold(tag, "before")
        raw.send(c.Tgetattr(0, c.GETATTR_BASIC, tag=10), c.Tgetattr(0, c.GETATTR_BASIC, tag=11),
                 c.Tgetattr(0, c.GETATTR_BASIC, tag=12), c.Tgetattr(0, c.GETATTR_BASIC, tag=13))
        await hook.reached(10)
        await hook.reached(11)
        conn = next(iter(server.connections))
        await until(lambda: conn._read_paused)
        seen = [m.tag for m in hook.seen]
        assert 12 not in seen and 13 not in seen  # read, but not taken up
        await raw.expect_nothing()
        hook.release(10)
        assert (await raw.recv()).tag == 10
        got = {(await raw.recv()).tag for _ in range(2)}
        assert got == {12, 13}
        hook.release(11)
        assert (await raw.recv()).tag == 11
        await until(lambda: not conn._read_paused)
        assert (await raw.rpc(c.Tgetattr(0, c.GETATTR_BASIC, tag=14))).TYPE == 25
        # A Tflush read while over the limit waits its turn, in order, and still aborts
        # its target (held, so not started): no reply for 20, only the Rflush.
        hook.hold(20, "before")
        hook.hold(21, "before")
        raw.send(c.Tgetattr(0, c.GETATTR_BASIC, tag=20), c.Tgetattr(0, c.GETATTR_BASIC, tag=21),
                 c.Tflush(20, tag=22))
        await hook.reached(20)
        await hook.reached(21)
        await until(lambda: bool(conn._backlog))
        hook.release(21)
        assert [(r.tag, r.TYPE) for r in (await raw.recv(), await raw.recv())] == [
            (21, 25), (22, 109)]
        await raw.expect_nothing()
        assert hook.cancelled == [20]
        await raw.close()
        await server.close()

    run(body())


def test_max_connections_refuses_with_log(run, export: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        before = _nfds()
        server, port = await serve_tcp(export, limits=Limits(max_connections=2))
        a = await Client.connect_tcp("127.0.0.1", port)
        b = await Client.connect_tcp("127.0.0.1", port)
        with caplog.at_level(logging.WARNING, logger="sigpoll.ninep"):
            with pytest.raises(ConnectionError, match="closed"):
                await Client.connect_tcp("127.0.0.1", port)
        assert any("refusing connection" in r.getMessage() and "max_connections" in r.getMessage()
                   for r in caplog.records)
        assert len(server.connections) == 2
        assert await a.read_file("f") == b"limits\n"  # the others carry on
        await a.close()
        await until(lambda: len(server.connections) == 1)
        c3 = await Client.connect_tcp("127.0.0.1", port)  # room again
        assert await c3.read_file("f") == b"limits\n"
        await b.close()
        await c3.close()
        await server.close()
        assert _nfds() <= before

    run(body())


def test_msize_cap_and_oversize_frame(run, export: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        server, port = await serve_tcp(export, msize=8192)
        cl = await Client.connect_tcp("127.0.0.1", port, msize=1 << 20)
        assert cl.msize == 8192
        assert await cl.read_file("big") == BIG  # split into reads that fit
        await cl.close()
        raw = await RawClient.connect("127.0.0.1", port)
        await raw.handshake(msize=1 << 20)
        # A frame over the negotiated msize: the stream cannot be trusted, so it ends.
        with caplog.at_level(logging.WARNING, logger="sigpoll.ninep"):
            raw.send(c.Twrite(0, 0, b"x" * 9000, tag=5))
            assert await raw.at_eof()
        assert any("outside" in r.getMessage() for r in caplog.records)
        await raw.close()
        await until(lambda: not server.connections)
        await server.close()

    run(body())


def test_queued_output_bound_when_client_does_not_read(run, export: Path) -> None:
    """A client that sends reads and never reads the replies: the server stops taking
    requests once its queue passes max_queued_output; nothing is lost once it reads."""

    async def body() -> None:
        limit = 128 * 1024
        server, port = await serve_tcp(export, limits=Limits(max_queued_output=limit,
                                                           max_inflight=2))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        raw = RawClient(reader, writer)
        await raw.handshake()
        await raw.rpc(c.Twalk(0, 1, ["big"], tag=2))
        await raw.rpc(c.Tlopen(1, 0, tag=3))
        transport = writer.transport
        transport.pause_reading()  # type: ignore[attr-defined]  # the client stops reading
        chunk = 65536 - 24
        n = 300  # ~19 MiB of replies asked for
        for i in range(n):
            off = (i * chunk) % len(BIG)
            raw.send(c.Tread(1, off, chunk, tag=100 + i))
        conn = next(iter(server.connections))
        await until(lambda: conn._write_paused)
        await asyncio.sleep(0.2)
        queued = conn._writer.get_write_buffer_size()  # type: ignore[union-attr]
        # At most the limit, plus the reply that crossed it and those still under way
        # in the pool (reads of uncached data), at most max_inflight of them.
        assert queued <= limit + 3 * 65536, queued
        assert conn._read_paused
        transport.resume_reading()  # type: ignore[attr-defined]
        for i in range(n):
            r = await raw.recv(timeout=30)
            off = (i * chunk) % len(BIG)
            assert r.tag == 100 + i and r.data == BIG[off:off + chunk]
        await raw.close()
        await until(lambda: not server.connections)
        await server.close()

    run(body())


def test_client_caps_outstanding_tags(run, export: Path) -> None:
    """Past max_tags callers wait for a tag (coroutines and threads alike); none fail."""

    async def body() -> None:
        hook = HoldHook()
        server, port = await serve_tcp(export, hook=hook)
        cl = await Client.connect_tcp("127.0.0.1", port, max_tags=2)
        first = [cl._free_tags[-1], cl._free_tags[-2]]
        for tag in first:
            hook.hold(tag, "before")
        tasks = [asyncio.ensure_future(cl.stat("f")) for _ in range(6)]
        for tag in first:
            await hook.reached(tag)
        await asyncio.sleep(0.05)
        assert len(cl._slots) == 2 and cl._used == 2  # the other four wait for a tag
        # One waiter gives up while waiting: it must not take or leak a place.
        tasks[-1].cancel()
        for tag in first:
            hook.release(tag)
        stats = await asyncio.gather(*tasks[:-1])
        assert all(s.size == 7 for s in stats)
        assert tasks[-1].cancelled()
        assert cl._used == 0 and not cl._slots and not cl._tag_waiters
        # Threads past the cap wait too.
        loop = asyncio.get_running_loop()
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                fid = 500 + i
                cl.rpc_blocking(c.Twalk(0, fid, ["f"]), 10)
                cl.rpc_blocking(c.Tclunk(fid), 10)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        def join_all() -> None:
            for t in threads:
                t.join(30)

        await loop.run_in_executor(None, join_all)
        assert not errors, errors
        assert cl._used == 0
        await cl.close()
        await server.close()

    run(body())


def test_client_rejects_oversize_replies(run) -> None:
    """A server that answers with more than msize, or an Rread with more than asked."""

    async def body() -> None:
        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            fb = c.FrameBuffer(1 << 20)
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for frame in fb.feed(data):
                    m = c.decode(frame)
                    if m.TYPE == 100:
                        writer.write(c.encode(c.Rversion(8192, "9P2000.L", tag=m.tag)))
                    elif m.TYPE == 104:
                        writer.write(c.encode(c.Rattach(c.Qid(0x80, 0, 1), tag=m.tag)))
                    elif m.TYPE == 116 and m.count == 10:
                        writer.write(c.encode(c.Rread(b"y" * 20, tag=m.tag)))
                    elif m.TYPE == 116:
                        writer.write(c.encode(c.Rread(b"z" * 9000, tag=m.tag)))
            writer.close()

        srv = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        cl = await Client.connect_tcp("127.0.0.1", port, msize=65536)
        assert cl.msize == 8192
        with pytest.raises(c.ProtocolError, match="more than the 10 asked for"):
            await cl.rpc(c.Tread(0, 0, 10))
        with pytest.raises(ConnectionError, match="msize 8192"):
            await cl.rpc(c.Tread(0, 0, 8000))
        with pytest.raises(ConnectionError):
            await cl.rpc(c.Tread(0, 0, 10))  # the connection is gone for good
        await cl.close()
        srv.close()
        await srv.wait_closed()

    run(body())


def test_client_on_pipes_ends_cleanly_on_an_unusable_frame(run, caplog: pytest.LogCaptureFixture) -> None:
    """Over two pipes (trans=fd), a frame bigger than msize ends the connection with a
    ConnectionError for the caller, and no error in a callback: a read pipe transport has
    no abort() (it was called, and raised AttributeError in the loop's callback)."""

    async def body() -> None:
        to_client_r, to_client_w = os.pipe()
        to_server_r, to_server_w = os.pipe()
        try:
            os.write(to_client_w, (0x40404040).to_bytes(4, "little") + b"\x65\xff\xff")
            with pytest.raises(ConnectionError, match="unusable frame"):
                await Client.connect_fds(to_client_r, to_server_w, msize=8192)
            await asyncio.sleep(0.05)  # any callback error would be logged by now
        finally:
            for fd in (to_client_r, to_client_w, to_server_r, to_server_w):
                os.close(fd)

    run(body())
    assert "Exception in callback" not in caplog.text, caplog.text


def test_require_privileged_port_refuses_unprivileged_source_ports(run, export: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """With require_privileged_port, a TCP peer whose source port is 1024 or above is
    closed at once with one log line; one bound below 1024 (root only) is served."""
    if os.geteuid() != 0:
        pytest.skip("binding a source port below 1024 needs root")

    async def body() -> None:
        server = NinepServer(export, require_privileged_port=True)
        port = (await server.start_tcp("127.0.0.1", 0)).sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        with caplog.at_level(logging.WARNING, logger="sigpoll.ninep"):
            raw = await RawClient.connect("127.0.0.1", port)  # an ephemeral port
            assert await raw.at_eof()
            await raw.close()
        assert any("not privileged" in r.getMessage() for r in caplog.records)
        for low in range(600, 1000):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", low))
                break
            except OSError:
                s.close()
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=s)
        raw = RawClient(reader, writer)
        await raw.handshake()
        r = await raw.rpc(c.Tgetattr(0, c.GETATTR_BASIC, tag=2))
        assert r.TYPE == c.Rgetattr.TYPE
        await raw.close()
        await server.close()

    run(body())
