"""Tflush conformance on the wire (flush(5), seeds 000 and 001), server and client side.

The server holds chosen requests with a test hook, so every interleaving below is
forced, not hoped for.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from sigpoll.ninep import Client, NinepServer
from sigpoll.ninep import _codec as c
from support.ninep import HoldHook, HoldingServer, RawClient, until


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "file").write_bytes(b"0123456789")
    (d / "dir").mkdir()
    return d


async def _start(export: Path, **kw: object) -> tuple[NinepServer, int, HoldHook]:
    hook = HoldHook()
    server = HoldingServer(export, hook, **kw)
    srv = await server.start_tcp("127.0.0.1", 0)
    return server, srv.sockets[0].getsockname()[1], hook


async def _walk_held_after(export: Path, newfid: int) -> tuple[
        NinepServer, Client, HoldHook, int, asyncio.Future[c.Message]]:
    """A client's Twalk to ``newfid``, done on the server and held before its reply."""
    server, port, hook = await _start(export)
    client = await Client.connect_tcp("127.0.0.1", port)
    tag = client._free_tags[-1]  # the tag the next request will get
    hook.hold(tag, "after")
    task = asyncio.ensure_future(client.rpc(c.Twalk(0, newfid, ["file"])))
    await hook.reached(tag, "after")
    return server, client, hook, tag, task


async def _raw(port: int) -> RawClient:
    raw = await RawClient.connect("127.0.0.1", port)
    await raw.handshake()
    return raw


def test_aborted_request_gets_no_reply_only_rflush(run, export: Path) -> None:
    async def body() -> None:
        server, port, hook = await _start(export)
        raw = await _raw(port)
        hook.hold(10, "before")
        raw.send(c.Twalk(0, 5, ["file"], tag=10))
        await hook.reached(10, "before")
        raw.send(c.Tflush(10, tag=11))
        r = await raw.recv()
        assert (r.TYPE, r.tag) == (109, 11)
        assert hook.cancelled == [10]
        # The next reply on the wire is for a later request: nothing for tag 10 at all.
        r = await raw.rpc(c.Tgetattr(0, c.GETATTR_BASIC, tag=12))
        assert (r.TYPE, r.tag) == (25, 12)
        await raw.expect_nothing()
        # And the walk never happened: newfid 5 does not exist.
        r = await raw.rpc(c.Tclunk(5, tag=13))
        assert (r.TYPE, r.ecode) == (7, errno.EBADF)
        await raw.close()
        await server.close()

    run(body())


def test_completed_request_replies_before_rflush(run, export: Path) -> None:
    async def body() -> None:
        server, port, hook = await _start(export)
        raw = await _raw(port)
        hook.hold(10, "after")
        raw.send(c.Twalk(0, 5, ["file"], tag=10))
        await hook.reached(10, "after")
        raw.send(c.Tflush(10, tag=11))
        await raw.expect_nothing()  # Rflush must wait for the reply
        hook.release(10, "after")
        r1, r2 = await raw.recv(), await raw.recv()
        assert (r1.TYPE, r1.tag) == (111, 10)
        assert (r2.TYPE, r2.tag) == (109, 11)
        # The walk took effect; the client must honour it, and the fid is there.
        r = await raw.rpc(c.Tclunk(5, tag=12))
        assert r.TYPE == 121
        await raw.close()
        await server.close()

    run(body())


@pytest.mark.parametrize("phase", ["before", "after"])
def test_several_flushes_of_one_tag(run, export: Path, phase: str) -> None:
    async def body() -> None:
        server, port, hook = await _start(export)
        raw = await _raw(port)
        hook.hold(10, phase)
        raw.send(c.Tgetattr(0, c.GETATTR_BASIC, tag=10))
        await hook.reached(10, phase)
        raw.send(c.Tflush(10, tag=11), c.Tflush(10, tag=12), c.Tflush(10, tag=13))
        if phase == "after":
            await raw.expect_nothing()
            hook.release(10, phase)
            r = await raw.recv()
            assert (r.TYPE, r.tag) == (25, 10)
        got = [await raw.recv() for _ in range(3)]
        assert [(m.TYPE, m.tag) for m in got] == [(109, 11), (109, 12), (109, 13)]
        await raw.expect_nothing()
        await raw.close()
        await server.close()

    run(body())


def test_flush_of_itself_and_of_unknown_tags(run, export: Path) -> None:
    async def body() -> None:
        server, port, _ = await _start(export)
        raw = await _raw(port)
        for msg in (c.Tflush(20, tag=20), c.Tflush(999, tag=21), c.Tflush(c.NOTAG, tag=22)):
            r = await raw.rpc(msg)
            assert (r.TYPE, r.tag) == (109, msg.tag)
        # A flush after the target already completed: plain Rflush.
        r = await raw.rpc(c.Tgetattr(0, c.GETATTR_BASIC, tag=23))
        assert r.TYPE == 25
        r = await raw.rpc(c.Tflush(23, tag=24))
        assert (r.TYPE, r.tag) == (109, 24)
        await raw.close()
        await server.close()

    run(body())


def test_flush_of_a_flush(run, export: Path) -> None:
    async def body() -> None:
        server, port, hook = await _start(export)
        raw = await _raw(port)
        hook.hold(10, "after")
        raw.send(c.Tgetattr(0, c.GETATTR_BASIC, tag=10))
        await hook.reached(10, "after")
        raw.send(c.Tflush(10, tag=11), c.Tflush(11, tag=12))
        await raw.expect_nothing()
        hook.release(10, "after")
        got = [await raw.recv() for _ in range(3)]
        assert [(m.TYPE, m.tag) for m in got] == [(25, 10), (109, 11), (109, 12)]
        await raw.close()
        await server.close()

    run(body())


def test_held_request_does_not_block_others(run, export: Path) -> None:
    async def body() -> None:
        server, port, hook = await _start(export, workers=2)
        raw = await _raw(port)
        hook.hold(10, "after")
        raw.send(c.Twalk(0, 5, ["dir"], tag=10))
        await hook.reached(10, "after")
        for tag in range(20, 40):  # more than the worker count
            r = await raw.rpc(c.Tgetattr(0, c.GETATTR_BASIC, tag=tag))
            assert (r.TYPE, r.tag) == (25, tag)
        hook.release(10, "after")
        r = await raw.recv()
        assert (r.TYPE, r.tag) == (111, 10)
        await raw.close()
        await server.close()

    run(body())


def test_queued_request_is_aborted_by_flush(run, export: Path) -> None:
    """With one worker busy, a second request waits in the queue; Tflush drops it."""

    async def body() -> None:
        gate = threading.Event()
        server, port, hook = await _start(export, workers=1)
        real_stat = server.export.stat

        def slow_stat(h):  # type: ignore[no-untyped-def]
            gate.wait(10)
            return real_stat(h)

        raw = await _raw(port)
        server.export.stat = slow_stat  # type: ignore[method-assign]
        raw.send(c.Tgetattr(0, c.GETATTR_BASIC, tag=10))
        await asyncio.sleep(0.1)
        raw.send(c.Tgetattr(0, c.GETATTR_BASIC, tag=11))
        await asyncio.sleep(0.1)
        raw.send(c.Tflush(11, tag=12))
        r = await raw.recv()
        assert (r.TYPE, r.tag) == (109, 12)
        gate.set()
        r = await raw.recv()
        assert (r.TYPE, r.tag) == (25, 10)
        await raw.expect_nothing()
        await raw.close()
        await server.close()

    run(body())


def test_eintr_on_the_host_is_retried(run, export: Path) -> None:
    async def body() -> None:
        server, port, _ = await _start(export)
        real_stat = server.export.stat
        calls = []

        def flaky(h):  # type: ignore[no-untyped-def]
            calls.append(1)
            if len(calls) < 3:
                raise InterruptedError(errno.EINTR, "interrupted")
            return real_stat(h)

        raw = await _raw(port)
        server.export.stat = flaky  # type: ignore[method-assign]
        r = await raw.rpc(c.Tgetattr(0, c.GETATTR_BASIC, tag=10))
        assert r.TYPE == 25 and len(calls) == 3
        await raw.close()
        await server.close()

    run(body())


async def _frames_until_eof(raw: RawClient, quiet: float = 3.0) -> tuple[list[c.Message], bool]:
    """Every reply until the server closes the connection (True) or falls silent."""
    got: list[c.Message] = []
    while True:
        try:
            got.append(await raw.recv(quiet))
        except asyncio.IncompleteReadError:
            return got, True
        except asyncio.TimeoutError:
            return got, False


@pytest.mark.parametrize("second", ["request", "flush", "bad"])
def test_a_reused_pending_tag_is_never_answered_but_closes(run, export: Path, second: str) -> None:
    """A request that reuses a tag still in flight: any reply under that tag would be taken
    as the first request's answer (the seed's rule), so the server says nothing under it
    and closes the connection (docs/ninep.md, "Flush rules")."""

    async def body() -> None:
        server = NinepServer(export, inline=False)
        port = (await server.start_tcp("127.0.0.1", 0)).sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        raw = await _raw(port)
        # Both in one write: the Tmkdir is still pending when the second arrives.
        dup = {"request": c.encode(c.Tgetattr(0, c.GETATTR_BASIC, tag=10)),
               "flush": c.encode(c.Tflush(99, tag=10)),
               "bad": c.encode(c.Tclunk(0, tag=10))[:-1]}[second]
        dup = len(dup).to_bytes(4, "little") + dup[4:]
        raw.send_raw(c.encode(c.Tmkdir(0, "d", 0o755, 0, tag=10)) + dup)
        got, closed = await _frames_until_eof(raw)
        assert [m for m in got if m.tag == 10] == [] and closed, (got, closed)
        await raw.close()
        await server.close()

    run(body())


def test_after_tversion_old_requests_answer_nothing(run, export: Path) -> None:
    """A request still running when Tversion starts a new session: neither its reply nor
    the Rflush of a Tflush waiting on it goes out, since the new session may have reused
    their tags already."""

    async def body() -> None:
        gate = threading.Event()
        entered = threading.Event()
        server = NinepServer(export, inline=False)
        port = (await server.start_tcp("127.0.0.1", 0)).sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        real_stat = server.export.stat

        def slow_stat(h):  # type: ignore[no-untyped-def]
            entered.set()
            gate.wait(10)
            return real_stat(h)

        raw = await _raw(port)
        server.export.stat = slow_stat  # type: ignore[method-assign]
        raw.send(c.Tgetattr(0, c.GETATTR_BASIC, tag=10))
        await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
        raw.send(c.Tflush(10, tag=11))
        await raw.expect_nothing()
        rv = await raw.rpc(c.Tversion(65536, c.VERSION_9P2000L, tag=c.NOTAG))
        assert rv.TYPE == c.Rversion.TYPE
        server.export.stat = real_stat  # type: ignore[method-assign]
        # The new session uses tags 10 and 11 at once; the old request then finishes.
        raw.send(c.Tattach(0, c.NOFID, "root", "", 0, tag=10))
        r = await raw.recv()
        assert (type(r).__name__, r.tag) == ("Rattach", 10)
        gate.set()
        r = await raw.rpc(c.Tclunk(0, tag=11))
        assert (type(r).__name__, r.tag) == ("Rclunk", 11)
        await raw.expect_nothing(0.5)
        await raw.close()
        await server.close()

    run(body())


# ----------------------------------------------------------------------------- client


def test_client_cancel_sends_flush_and_raises(run, export: Path) -> None:
    async def body() -> None:
        server, port, hook = await _start(export)
        client = await Client.connect_tcp("127.0.0.1", port)
        tag = client._free_tags[-1]  # the tag the next request will get
        hook.hold(tag, "before")
        task = asyncio.ensure_future(client.walk("file"))
        await hook.reached(tag, "before")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert hook.cancelled == [tag]
        assert tag not in client._slots  # released after the Rflush
        assert sorted(await client.listdir("")) == sorted(os.listdir(export))
        await client.close()
        await server.close()

    run(body())


def test_client_keeps_tag_until_rflush_and_honours_late_reply(run, export: Path) -> None:
    async def body() -> None:
        server, client, hook, tag, task = await _walk_held_after(export, 77)
        task.cancel()
        await asyncio.sleep(0.05)  # the Tflush is out; its Rflush waits for the reply
        assert not task.done()
        assert tag in client._slots
        # Other requests go ahead meanwhile and never get the reserved tag.
        for _ in range(5):
            st = await client.stat("dir")
            assert st.is_dir
        assert tag in client._slots
        task.cancel()  # a second cancel while waiting for Rflush is ignored
        hook.release(tag, "after")
        reply = await task  # the walk happened: its reply is returned, not CancelledError
        assert reply.TYPE == 111 and len(reply.wqids) == 1
        assert tag not in client._slots
        await client.rpc(c.Tclunk(77))  # and newfid 77 really exists
        await client.close()
        await server.close()

    run(body())


def test_client_cancel_after_the_reply_arrived_returns_it(run, export: Path) -> None:
    """The reply is in, the task has not run yet, and then it is cancelled: the server did
    the work, so the reply is returned (no Tflush: there is nothing left to flush)."""
    async def body() -> None:
        server, client, hook, tag, task = await _walk_held_after(export, 78)
        slot = client._slots[tag]
        assert slot.future is not None
        # Runs right after the reply is published, before the task's own wake-up.
        slot.future.add_done_callback(lambda _: task.cancel())
        hook.release(tag, "after")
        reply = await task
        assert reply.TYPE == 111 and len(reply.wqids) == 1
        assert hook.cancelled == [] and not client._slots
        await client.rpc(c.Tclunk(78))  # newfid 78 exists: the walk took effect
        await client.close()
        await server.close()

    run(body())


def test_client_cancel_against_diod(run, export: Path) -> None:
    """diod is stopped (SIGSTOP) while a request and then its Tflush are sent; once it
    runs again, whichever outcome flush(5) allows must come out right: no reply and
    CancelledError, or the reply (returned to the cancelled caller) then Rflush."""
    import signal

    from support.ninep import DiodProcess, find_diod_tool

    if find_diod_tool("diod") is None:
        pytest.skip("diod is not installed (apt-get install diod)")

    async def body() -> None:
        outcomes = set()
        with DiodProcess(str(export)) as diod:
            client = await Client.connect_tcp("127.0.0.1", diod.port, aname=str(export),
                                              msize=65536)
            for i in range(6):
                os.kill(diod.proc.pid, signal.SIGSTOP)
                # Only the stop window is inside try: any further request waits until
                # diod runs again (a request sent to a stopped diod would never return).
                try:
                    task = asyncio.ensure_future(client.rpc(c.Twalk(0, 50 + i, ["file"])))
                    # The Twalk is out (or, if the stop took hold late, already answered:
                    # then there is nothing left to flush this round).
                    await until(lambda: len(client._slots) == 1 or task.done())
                    flushed = False
                    if not task.done():
                        task.cancel()
                        # Waiting on a loaded machine, not sleeping a fixed time: the
                        # Tflush goes out on the next loop iteration, whenever that comes
                        # -- unless the reply slipped in before the cancellation took
                        # hold, when there is nothing to flush and the reply is returned.
                        await until(lambda: len(client._slots) == 2 or task.done())
                        flushed = not task.done()  # if so, the tag is held for the Rflush
                finally:
                    os.kill(diod.proc.pid, signal.SIGCONT)
                try:
                    reply = await asyncio.wait_for(task, 10)
                    assert reply.TYPE == 111
                    outcomes.add("replied" if flushed else "replied, nothing to flush")
                    await asyncio.wait_for(client.rpc(c.Tclunk(50 + i)), 15)  # the walk took effect
                except asyncio.CancelledError:
                    assert flushed
                    outcomes.add("aborted")
                assert not client._slots  # both tags released after the Rflush
            st = await asyncio.wait_for(client.stat("file"), 15)
            assert st.size == 10
            await asyncio.wait_for(client.close(), 15)
        assert outcomes

    run(body())


def test_threaded_reply_handoff_stress(export: Path) -> None:
    """Many threads share one client; each must always get its own, complete reply."""
    nthreads, per_thread = 8, 150
    for i in range(nthreads):
        (export / f"t{i}").write_bytes(bytes([65 + i]) * (100 + i))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    def loop_main() -> None:
        asyncio.set_event_loop(loop)

        async def setup() -> None:
            server = NinepServer(export, workers=4)
            srv = await server.start_tcp("127.0.0.1", 0)
            state["server"] = server
            state["client"] = await Client.connect_tcp("127.0.0.1", srv.sockets[0].getsockname()[1])

        loop.run_until_complete(setup())
        ready.set()
        loop.run_forever()

    th = threading.Thread(target=loop_main)
    th.start()
    assert ready.wait(10)
    client: Client = state["client"]  # type: ignore[assignment]
    errors: list[str] = []

    def worker(i: int) -> None:
        fid = 1000 + i
        try:
            client.rpc_blocking(c.Twalk(0, fid, [f"t{i}"]), 10)
            client.rpc_blocking(c.Tlopen(fid, 0), 10)
            want = bytes([65 + i]) * (100 + i)
            for _ in range(per_thread):
                r = client.rpc_blocking(c.Tread(fid, 0, 4096), 10)
                if r.data != want:
                    errors.append(f"thread {i} got {r.data[:10]!r}")
            client.rpc_blocking(c.Tclunk(fid), 10)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors[:5]
    finally:
        async def teardown() -> None:
            await client.close()
            await state["server"].close()  # type: ignore[attr-defined]

        asyncio.run_coroutine_threadsafe(teardown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)
        loop.close()


def test_slot_publishes_payload_before_status() -> None:
    """Direct stress of the handoff object: a waiter that sees the status set must see
    the payload, across threads."""
    from sigpoll.ninep._client import _Slot

    rounds = 3000
    slots = [_Slot(i % 100, c.Tclunk(i)) for i in range(rounds)]
    bad: list[int] = []

    def reader() -> None:
        for i, s in enumerate(slots):
            while not s.event.is_set():
                pass
            r = s.result()
            if r is None or r.tag != i % 100:
                bad.append(i)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    for i, s in enumerate(slots):
        s.publish(c.Rclunk(tag=i % 100))
    for t in readers:
        t.join(30)
    assert not bad


@pytest.mark.parametrize("bad", ["17 walk names", "a 70,000-byte name"])
def test_client_gives_back_the_tag_of_a_message_it_cannot_encode(run, export: Path, bad: str) -> None:
    """An unencodable message raises, and its tag and its max_tags place come back: with
    max_tags=1, the next request still goes out (before, it waited forever)."""

    async def body() -> None:
        server = NinepServer(export)
        port = (await server.start_tcp("127.0.0.1", 0)).sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        cl = await Client.connect_tcp("127.0.0.1", port, max_tags=1)
        msg = (c.Twalk(0, 1, ["x"] * 17) if bad.startswith("17")
               else c.Tmkdir(0, "n" * 70_000, 0o755, 0))
        for _ in range(3):
            with pytest.raises(c.ProtocolError):
                await asyncio.wait_for(cl.rpc(msg), 5)  # the wait: a leaked place hangs
        assert not cl._slots and cl._used == 0
        st = await asyncio.wait_for(cl.stat("file"), 5)
        assert st.size == 10
        await cl.close()
        await server.close()

    run(body())
