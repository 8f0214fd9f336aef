"""sigpoll's asyncio loop and attach(): the parts CPython's own tests cannot know about."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import sys
import threading
import time
import tty
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import sigpoll
from sigpoll._attach import AttachedPoller, attach
from sigpoll._loop import EventLoopPolicy, Loop, install, new_event_loop, run

__all__: list[str] = []

pytestmark = pytest.mark.timeout(30)

PUBLIC_NAMES = ("AttachedPoller", "EventLoopPolicy", "Loop", "attach", "install", "new_event_loop", "run")


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = new_event_loop()
    yield lp
    if not lp.is_closed():
        lp.run_until_complete(lp.shutdown_asyncgens())
        lp.close()


def fl(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def poller_fds(lp: Loop) -> set[int]:
    return set(lp._selector._fd_to_key)  # type: ignore[union-attr]


# -- public surface --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_names_exported(name: str) -> None:
    # The lead re-exports these from sigpoll/__init__.py.
    assert hasattr(sigpoll, name), f"sigpoll.{name} is not exported"


def test_new_event_loop_is_an_asyncio_loop(loop: Loop) -> None:
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert isinstance(loop, asyncio.SelectorEventLoop)
    assert loop.run_until_complete(asyncio.sleep(0, "ok")) == "ok"


def test_run_returns_result_and_closes_loop() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        seen.append(asyncio.get_running_loop())
        await asyncio.sleep(0.001)
        return 42

    assert run(main()) == 42
    assert isinstance(seen[0], Loop)
    assert seen[0].is_closed()


def test_run_debug() -> None:
    async def main() -> bool:
        return asyncio.get_running_loop().get_debug()

    assert run(main(), debug=True) is True
    assert run(main(), debug=False) is False


def test_runner_with_loop_factory() -> None:
    async def main() -> type:
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        assert runner.run(main()) is Loop


def _policy_warning() -> Any:
    """What creating the policy or calling install() must warn (uvloop's rule: 3.12+)."""
    if sys.version_info >= (3, 12):
        return pytest.warns(DeprecationWarning, match="loop_factory=sigpoll.new_event_loop")
    return warnings.catch_warnings(record=False)


def test_policy_and_install() -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # on 3.11: no warning at all
            with _policy_warning() as caught:
                install()
        if sys.version_info >= (3, 12):
            assert len(caught) == 1  # one warning, not the policy's as well
        policy = asyncio.get_event_loop_policy()
        assert isinstance(policy, EventLoopPolicy)
        lp = asyncio.new_event_loop()
        try:
            assert isinstance(lp, Loop)
        finally:
            lp.close()

        async def main() -> type:
            return type(asyncio.get_running_loop())

        assert asyncio.run(main()) is Loop
    finally:
        asyncio.set_event_loop_policy(None)
    with _policy_warning():
        EventLoopPolicy()


def test_the_library_never_uses_a_policy() -> None:
    # Policies go away in 3.16: the loop factory, run() and attach() must not need them.
    import subprocess

    code = (
        "import asyncio, warnings, sigpoll\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "real = asyncio.events.get_event_loop_policy\n"
        "def no(*a, **k): raise AssertionError('a policy was used')\n"
        "asyncio.events.get_event_loop_policy = asyncio.get_event_loop_policy = no\n"
        "asyncio.events.set_event_loop_policy = asyncio.set_event_loop_policy = no\n"
        "async def main():\n"
        "    with sigpoll.attach() as ap:\n"
        "        sigpoll.device_watcher()\n"
        "    await asyncio.sleep(0)\n"
        "    return 7\n"
        "assert sigpoll.run(main()) == 7\n"
        "with asyncio.Runner(loop_factory=sigpoll.new_event_loop) as r:\n"
        "    assert r.run(main()) == 7\n"
        "lp = sigpoll.new_event_loop(); lp.run_until_complete(main()); lp.close()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# -- every fd goes through the poller, ordinary ones without signals -------------------------------


def test_sockets_are_in_the_poller_without_o_async(loop: Loop) -> None:
    async def main() -> None:
        received = asyncio.Event()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)  # type: ignore[attr-defined]
                received.set()

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        await received.wait()
        client_fd = writer.get_extra_info("socket").fileno()
        listen_fd = server.sockets[0].fileno()
        fds = poller_fds(loop)
        assert client_fd in fds and listen_fd in fds
        assert len(loop._poller) == len(fds)
        for fd in (client_fd, listen_fd):
            assert not fl(fd) & os.O_ASYNC
            assert not loop.is_device(fd)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_large_reads_are_chunked_like_asyncio(loop: Loop) -> None:
    # The shared receive buffer must hand each data_received its own bytes object.
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def main() -> None:
        chunks: list[bytes] = []
        done = loop.create_future()

        class Sink(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                assert type(data) is bytes and len(data) <= 256 * 1024
                chunks.append(data)

            def eof_received(self) -> None:
                done.set_result(None)

        a, b = socket.socketpair()
        b.setblocking(False)
        await loop.connect_accepted_socket(Sink, a)
        await loop.sock_sendall(b, payload)
        b.shutdown(socket.SHUT_WR)
        await done
        assert b"".join(chunks) == payload
        b.close()

    loop.run_until_complete(main())


def test_datagrams_and_pipes(loop: Loop) -> None:
    async def main() -> None:
        got = loop.create_future()

        class Dgram(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                got.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Dgram, local_addr=("127.0.0.1", 0))
        addr = transport.get_extra_info("sockname")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x" * 60000, addr)
        assert await got == b"x" * 60000
        transport.close()

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdout.write('y' * 300000)",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert out == b"y" * 300000 and proc.returncode == 0

    loop.run_until_complete(main())


# -- the iteration step ------------------------------------------------------------------------


def test_callback_exception_goes_to_handler(loop: Loop) -> None:
    contexts: list[dict[str, object]] = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def boom() -> None:
        raise ValueError("boom")

    loop.call_soon(boom)
    loop.call_later(0.001, boom)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert len(contexts) == 2
    for ctx in contexts:
        assert isinstance(ctx["exception"], ValueError)
        assert str(ctx["message"]).startswith("Exception in callback")
        assert isinstance(ctx["handle"], asyncio.Handle)


def test_call_order_and_timers(loop: Loop) -> None:
    order: list[str] = []
    loop.call_later(0.02, order.append, "late")
    loop.call_later(0.01, order.append, "early")
    h = loop.call_later(0.015, order.append, "cancelled")
    loop.call_soon(order.append, "soon")
    h.cancel()
    start = loop.time()
    loop.run_until_complete(asyncio.sleep(0.03))
    assert order == ["soon", "early", "late"]
    assert loop.time() - start >= 0.03


def test_call_soon_threadsafe_wakes_a_sleeping_loop(loop: Loop) -> None:
    fut = loop.create_future()

    def from_thread() -> None:
        time.sleep(0.05)
        loop.call_soon_threadsafe(fut.set_result, threading.get_ident())

    t = threading.Thread(target=from_thread)
    start = time.monotonic()
    t.start()
    # Nothing else is scheduled, so the loop sleeps in poller.wait(None) until the wake.
    assert loop.run_until_complete(fut) == t.ident
    assert time.monotonic() - start < 5
    t.join()


def test_debug_mode_reports_slow_callbacks(loop: Loop, caplog: pytest.LogCaptureFixture) -> None:
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01
    loop.call_soon(time.sleep, 0.03)
    with caplog.at_level("WARNING", logger="asyncio"):
        loop.run_until_complete(asyncio.sleep(0.05))
    assert any("took" in r.getMessage() for r in caplog.records)


def test_loop_in_another_thread() -> None:
    lp = new_event_loop()
    result: list[object] = []

    def body() -> None:
        result.append(lp.run_until_complete(asyncio.sleep(0.01, "done")))

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    lp.close()
    assert result == ["done"]


# -- signals -------------------------------------------------------------------------------------


def test_signal_handlers_coexist_with_poller_signal(loop: Loop, pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    with pytest.raises(RuntimeError, match="poller"):
        loop.add_signal_handler(loop.poller_signal, lambda: None)
    with pytest.raises(RuntimeError, match="SIGIO"):
        loop.add_signal_handler(signal.SIGIO, lambda: None)

    got_usr1 = loop.create_future()
    loop.add_signal_handler(signal.SIGUSR1, got_usr1.set_result, "usr1")
    data = bytearray()
    enough = loop.create_future()

    def on_device() -> None:
        data.extend(os.read(master, 4096))
        if len(data) >= 3 and not enough.done():
            enough.set_result(None)

    loop.add_device_reader(master, on_device)

    async def main() -> None:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.write(slave, b"abc")
        assert await asyncio.wait_for(got_usr1, 5) == "usr1"
        await asyncio.wait_for(enough, 5)

    loop.run_until_complete(main())
    assert bytes(data) == b"abc"
    assert loop.poller_counters().signals >= 1
    assert loop.remove_signal_handler(signal.SIGUSR1)
    loop.remove_device_reader(master)


# -- device API ----------------------------------------------------------------------------------


def test_device_reader_sets_and_restores_o_async(loop: Loop, pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    before = fl(master)
    chunks: list[bytes] = []
    got = loop.create_future()

    def on_read() -> None:
        chunks.append(os.read(master, 4096))
        if not got.done():
            got.set_result(None)

    loop.add_device_reader(master, on_read)
    assert fl(master) & os.O_ASYNC and fl(master) & os.O_NONBLOCK
    assert loop.is_device(master)
    assert master in loop._poller
    os.write(slave, b"hello")
    loop.run_until_complete(asyncio.wait_for(got, 5))
    assert b"".join(chunks) == b"hello"
    counters = loop.poller_counters()
    assert isinstance(counters, sigpoll.Counters)
    assert counters.signals >= 1 and counters.wakeups >= 1
    assert loop.remove_device_reader(master) is True
    assert loop.remove_device_reader(master) is False
    assert fl(master) == before
    assert master not in loop._poller


def test_device_writer(loop: Loop, pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    written = loop.create_future()

    def on_writable() -> None:
        os.write(master, b"out")
        loop.remove_device_writer(master)
        written.set_result(None)

    loop.add_device_writer(master, on_writable)
    loop.run_until_complete(asyncio.wait_for(written, 5))
    assert os.read(slave, 100) == b"out"
    assert not loop.is_device(master)
    assert not fl(master) & os.O_ASYNC


def test_device_side_added_to_plain_reader_keeps_it(loop: Loop, pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    reads = loop.create_future()
    loop.add_reader(master, lambda: reads.done() or reads.set_result(os.read(master, 100)))
    assert not fl(master) & os.O_ASYNC
    loop.add_device_writer(master, lambda: loop.remove_device_writer(master))
    assert fl(master) & os.O_ASYNC
    os.write(slave, b"r")
    assert loop.run_until_complete(asyncio.wait_for(reads, 5)) == b"r"
    # The device writer removed itself: the fd is a plain reader again, without signals.
    assert not loop.is_device(master)
    assert not fl(master) & os.O_ASYNC
    assert loop.remove_reader(master)


def test_device_refused_for_regular_file(loop: Loop, tmp_path: pytest.TempPathFactory) -> None:
    path = os.path.join(str(tmp_path), "f")
    with open(path, "wb") as f:
        with pytest.raises(OSError):
            loop.add_device_reader(f.fileno(), lambda: None)
        assert f.fileno() not in poller_fds(loop)


def test_device_refused_on_fd_with_transport(loop: Loop) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        with pytest.raises(RuntimeError, match="transport"):
            loop.add_device_reader(a.fileno(), lambda: None)
        transport.close()
        b.close()

    loop.run_until_complete(main())


def test_device_api_on_closed_loop() -> None:
    lp = new_event_loop()
    lp.close()
    with pytest.raises(RuntimeError):
        lp.add_device_reader(0, lambda: None)
    with pytest.raises(RuntimeError):
        lp.poller_counters()


def test_thread_mask_warning_deferred_to_first_device(pty_pair: tuple[int, int]) -> None:
    master, _ = pty_pair
    stop = threading.Event()
    # A thread that unblocks everything, started before the loop exists.
    ready = threading.Event()

    def unblocked() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        ready.set()
        stop.wait(10)

    t = threading.Thread(target=unblocked)
    t.start()
    ready.wait(5)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lp = new_event_loop()
            assert not [w for w in caught if issubclass(w.category, sigpoll.SignalMaskWarning)]
            lp.add_device_reader(master, lambda: None)
            assert [w for w in caught if issubclass(w.category, sigpoll.SignalMaskWarning)]
            lp.remove_device_reader(master)
            lp.close()
    finally:
        stop.set()
        t.join()


# -- attach ----------------------------------------------------------------------------------------


def test_attach_device_reader_and_writer(host_loop: asyncio.AbstractEventLoop,
                                         pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    before = fl(master)
    lp = host_loop
    # A signal of its own, so an attached poller on sigpoll's loop does not share hints.
    sig = sigpoll.DEFAULT_SIGNAL + 1

    async def main() -> None:
        with attach(signal=sig) as ap:
            assert isinstance(ap, AttachedPoller)
            assert ap.loop is lp and ap.poller_signal == sig
            got = lp.create_future()
            wrote = lp.create_future()

            def on_read(tag: str) -> None:
                data = os.read(master, 100)
                if not got.done():
                    got.set_result((tag, data))

            def on_write() -> None:
                os.write(master, b"to-slave")
                ap.remove_device_writer(master)
                wrote.set_result(None)

            ap.add_device_reader(master, on_read, "tag")
            ap.add_device_writer(master, on_write)
            assert fl(master) & os.O_ASYNC
            await asyncio.wait_for(wrote, 5)
            os.write(slave, b"from-slave")
            assert await asyncio.wait_for(got, 5) == ("tag", b"from-slave")
            assert os.read(slave, 100) == b"to-slave"
            counters = ap.poller_counters()
            assert counters.signals >= 1 and counters.wakeups >= 1
            assert ap.remove_device_reader(master) is True
            assert ap.remove_device_reader(master) is False
            assert fl(master) == before
        assert ap.closed

    try:
        lp.run_until_complete(main())
    finally:
        lp.close()


def test_attach_callback_errors_reach_host_handler(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    lp = asyncio.SelectorEventLoop()
    contexts: list[dict[str, object]] = []
    lp.set_exception_handler(lambda _lp, ctx: contexts.append(ctx))

    async def main() -> None:
        ap = attach(lp)
        good = lp.create_future()

        def bad() -> None:
            os.read(master, 100)
            raise ValueError("device callback")

        ap.add_device_reader(master, bad)
        os.write(slave, b"x")
        for _ in range(200):
            if contexts:
                break
            await asyncio.sleep(0.01)
        ap.remove_device_reader(master)
        good.set_result(None)
        ap.close()
        ap.close()  # idempotent

    try:
        lp.run_until_complete(main())
    finally:
        lp.close()
    assert contexts and isinstance(contexts[0]["exception"], ValueError)


def test_attach_close_after_host_closed() -> None:
    lp = asyncio.SelectorEventLoop()
    ap = attach(lp)
    assert ap.fileno() in lp._selector.get_map()  # type: ignore[attr-defined]
    lp.close()
    ap.close()
    assert ap.closed


def test_device_reader_on_an_fd_without_fasync_uses_epoll_alone() -> None:
    """An eventfd cannot carry O_ASYNC signals; as a device it is still watched (epoll)."""
    import os

    loop = sigpoll.new_event_loop()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fired = loop.create_future()
        loop.add_device_reader(efd, lambda: fired.done() or fired.set_result(os.eventfd_read(efd)))
        assert not loop._selector.is_device(efd)  # type: ignore[attr-defined]
        loop.call_soon(os.eventfd_write, efd, 3)
        assert loop.run_until_complete(asyncio.wait_for(fired, 5)) == 3
        assert loop.remove_device_reader(efd)
    finally:
        os.close(efd)
        loop.close()


def test_attached_device_reader_on_an_fd_without_fasync() -> None:
    import os

    loop = asyncio.new_event_loop()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        attached = attach(loop, signal=signal.SIGRTMIN + 9)
        fired = loop.create_future()
        attached.add_device_reader(efd, lambda: fired.done() or fired.set_result(os.eventfd_read(efd)))
        loop.call_soon(os.eventfd_write, efd, 2)
        assert loop.run_until_complete(asyncio.wait_for(fired, 5)) == 2
        attached.close()
    finally:
        os.close(efd)
        loop.close()


# -- defects found on 3.12+ and by reading the loop (each bound to both loops) -----------------


@pytest.fixture
def any_loop(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Iterator[asyncio.AbstractEventLoop]:
    lp = loop_factory()
    yield lp
    if not lp.is_closed():
        lp.close()


def _stock_asyncio_before_312(request: pytest.FixtureRequest) -> bool:
    return bool(request.node.callspec.params.get("loop_factory") == "asyncio"
                and sys.version_info < (3, 12))


def test_a_second_transport_on_a_socket_in_use_is_refused(
    any_loop: asyncio.AbstractEventLoop, request: pytest.FixtureRequest
) -> None:
    # CPython 3.12 checks this in _make_socket_transport/_make_datagram_transport
    # (GH-88968); sigpoll's loop makes its own transports and must check it on every version.
    if _stock_asyncio_before_312(request):
        request.applymarker(pytest.mark.xfail(
            strict=True, reason="stock asyncio before 3.12 lets a second transport replace the first"))
    lp = any_loop

    async def main() -> None:
        a, b = socket.socketpair()
        first, _ = await lp.connect_accepted_socket(asyncio.Protocol, a)
        with pytest.raises(RuntimeError, match="is used by transport"):
            await lp.connect_accepted_socket(asyncio.Protocol, a)
        assert not first.is_closing()
        first.close()
        b.close()
        d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        d.bind(("127.0.0.1", 0))
        dfirst, _ = await lp.create_datagram_endpoint(asyncio.DatagramProtocol, sock=d)
        with pytest.raises(RuntimeError, match="is used by transport"):
            await lp.create_datagram_endpoint(asyncio.DatagramProtocol, sock=d)
        dfirst.close()
        await asyncio.sleep(0)

    lp.run_until_complete(main())


def test_debug_source_traceback_ends_at_the_callers_line(any_loop: asyncio.AbstractEventLoop) -> None:
    # repr(handle), slow-callback warnings and "created at" reports point at the last frame
    # of Handle._source_traceback: it must be the line that scheduled the callback.
    lp = any_loop
    lp.set_debug(True)
    contexts: list[dict[str, Any]] = []
    lp.set_exception_handler(lambda _lp, ctx: contexts.append(ctx))

    def fail() -> None:
        raise ZeroDivisionError

    here = sys._getframe().f_code.co_name
    handles = [
        lp.call_soon(fail),
        lp.call_later(0.001, fail),
        lp.call_at(lp.time() + 0.001, fail),
    ]
    for h in handles:
        frame = h._source_traceback[-1]  # type: ignore[attr-defined]
        assert (frame.filename, frame.name) == (__file__, here), h._source_traceback  # type: ignore[attr-defined]
    lp.run_until_complete(asyncio.sleep(0.05))
    assert len(contexts) == 3
    for ctx in contexts:
        assert ctx["source_traceback"][-1].name == here
    lp.set_debug(False)
    assert not hasattr(lp.call_soon(fail), "_source_traceback") or not lp.call_soon(
        fail)._source_traceback  # type: ignore[attr-defined]


def test_busy_polling_run_forever_on_a_closed_loop_is_a_runtime_error() -> None:
    lp = new_event_loop(busy_poll_us=50)
    lp.close()
    with pytest.raises(RuntimeError, match="closed"):
        lp.run_forever()
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="closed"):
        lp.run_until_complete(coro)
    coro.close()


def test_a_refused_nested_run_forever_keeps_the_outer_runs_wakeup_fd() -> None:
    # While a busy-polling loop runs in the main thread, signals must leave a wake-up byte
    # (see Loop._claim_wakeup_fd); a nested run_forever() that asyncio refuses must not
    # take that away from the run still going on.
    lp = new_event_loop(busy_poll_us=50)
    seen: list[object] = []

    def nested() -> None:
        try:
            lp.run_forever()
        except RuntimeError as exc:
            seen.append(exc)
        # The refusal leaves the run going on alone (CPython 3.13.0's own run_forever
        # unsets the running loop here: gh-130145).
        assert asyncio.get_running_loop() is lp
        old = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(old)
        seen.append(old)

    try:
        lp.call_soon(nested)
        lp.run_until_complete(asyncio.sleep(0.01))
        assert isinstance(seen[0], RuntimeError) and "already running" in str(seen[0])
        assert seen[1] == lp._csock.fileno()  # type: ignore[attr-defined]
    finally:
        lp.close()
    old = signal.set_wakeup_fd(-1)
    assert old == -1  # released once the outer run ended
