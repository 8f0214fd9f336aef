"""The device seam: one DeviceWatcher protocol, found per loop, taken by every backend.

A backend (console, virtio kick fd) asks ``sigpoll.device_watcher()`` once and watches its fds
there: sigpoll's loop itself, the poller ``sigpoll.attach()`` nested in stock asyncio or
uvloop, or the plain add_reader fallback.  The proof that fds really reach the attached
poller is its counters, and O_ASYNC on the fd while it is watched.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

import sigpoll
from sigpoll import AttachedPoller, DeviceWatcher, Loop, attach, device_watcher
from sigpoll._signals import pick_signal, signals_in_use
from sigpoll.tty import connect_console
from support import until

__all__: list[str] = []

pytestmark = pytest.mark.timeout(60)


def _async_on(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ASYNC)


# -- which watcher a loop has ---------------------------------------------------------------


def test_each_loop_has_one_watcher(host_loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        if isinstance(host_loop, Loop):
            assert device_watcher() is host_loop
            with attach():  # a poller attached to sigpoll's loop does not replace it
                assert device_watcher() is host_loop
            return
        plain = device_watcher()
        assert not isinstance(plain, (Loop, AttachedPoller))
        assert "add_reader" in repr(plain)
        with attach() as first:
            with attach() as second:
                assert device_watcher() is first and device_watcher(host_loop) is first
            assert second.closed
        assert not isinstance(device_watcher(), AttachedPoller)
        ap = attach()
        assert device_watcher() is ap
        ap.close()

    host_loop.run_until_complete(main())
    with pytest.raises(RuntimeError):
        device_watcher()  # no running loop


def test_the_fallback_watches_through_add_reader(foreign_loop: asyncio.AbstractEventLoop,
                                                 pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    lp = foreign_loop

    async def main() -> None:
        devices: DeviceWatcher = device_watcher()
        got = lp.create_future()
        devices.add_device_reader(master, lambda: got.done() or got.set_result(os.read(master, 10)))
        assert not _async_on(master)  # no hints: the loop's own epoll alone
        os.write(slave, b"hi")
        assert await asyncio.wait_for(got, 5) == b"hi"
        assert devices.remove_device_reader(master) is True
        assert devices.remove_device_reader(master) is False
        assert devices.remove_device_writer(master) is False

    lp.run_until_complete(main())


# -- backends take it -----------------------------------------------------------------------


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.more = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.more.set()


def test_a_console_on_an_attached_loop_uses_the_attached_poller(
    foreign_loop: asyncio.AbstractEventLoop, pty_pair: tuple[int, int]
) -> None:
    master, slave = pty_pair
    lp = foreign_loop

    async def main() -> None:
        with attach() as ap:
            proto = _Collect()
            transport, _ = await connect_console(lambda: proto, master, close_fds=False)
            await asyncio.sleep(0)  # reading starts on the next iteration
            assert _async_on(master)
            os.write(slave, b"from the guest")
            while len(proto.data) < 14:
                await asyncio.wait_for(proto.more.wait(), 5)
                proto.more.clear()
            assert bytes(proto.data) == b"from the guest"
            transport.write(b"x" * 200_000)  # more than a pty takes at once: the writer arms
            got = 0
            while got < 200_000:
                got += len(await lp.run_in_executor(None, os.read, slave, 65536))
            counters = ap.poller_counters()
            assert counters.signals >= 1 and counters.wakeups >= 1, counters
            transport.close()
            await asyncio.sleep(0.01)
            assert not _async_on(master)

    lp.run_until_complete(main())


def test_a_console_takes_an_explicit_watcher(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    lp = asyncio.SelectorEventLoop()

    async def main() -> None:
        calls: list[str] = []
        inner = device_watcher()  # the add_reader fallback

        class Spy:
            def add_device_reader(self, fd: Any, cb: Callable[..., object], *args: Any) -> None:
                calls.append("add_reader")
                inner.add_device_reader(fd, cb, *args)

            def add_device_writer(self, fd: Any, cb: Callable[..., object], *args: Any) -> None:
                calls.append("add_writer")
                inner.add_device_writer(fd, cb, *args)

            def remove_device_reader(self, fd: Any) -> bool:
                calls.append("remove_reader")
                return inner.remove_device_reader(fd)

            def remove_device_writer(self, fd: Any) -> bool:
                calls.append("remove_writer")
                return inner.remove_device_writer(fd)

        proto = _Collect()
        transport, _ = await connect_console(lambda: proto, master, close_fds=False,
                                             devices=Spy())
        os.write(slave, b"a")
        await asyncio.wait_for(proto.more.wait(), 5)
        transport.close()
        await asyncio.sleep(0.01)
        assert calls[0] == "add_reader" and "remove_reader" in calls

    try:
        lp.run_until_complete(main())
    finally:
        lp.close()


def test_virtio_kick_fds_go_to_the_attached_poller(
    foreign_loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    from sigpoll.virtio import ConsoleDevice, VhostUserBackend
    from support.vhost_frontend import Frontend
    from support.virtio import Collect, serving

    lp = foreign_loop
    path = str(tmp_path / "vu.sock")

    async def main() -> None:
        with attach() as ap:
            device = ConsoleDevice()
            async with serving(VhostUserBackend(device), path):
                proto = Collect()
                device.ports[0].connect(lambda: proto)
                registered: list[int] = []

                def guest() -> None:
                    fe = Frontend(path, reply_ack=True)
                    fe.handshake()
                    for i in (0, 1):
                        fe.setup_ring(i, num=64)
                        fe.set_kick(i)
                        fe.enable(i)
                    fe.add(1, out=b"ping")
                    fe.kick(1)
                    fe.wait_used(1, 1)
                    registered.append(len(ap.poller))
                    fe.close()

                await lp.run_in_executor(None, guest)
                while len(proto.data) < 4:
                    await asyncio.sleep(0.01)
                assert bytes(proto.data) == b"ping"
                assert registered[0] >= 2  # both kick eventfds
                assert ap.poller_counters().wakeups >= 1

    lp.run_until_complete(asyncio.wait_for(main(), 30))


# -- attach never shares the signal of a poller read on the same thread -------------------------


def test_attach_on_a_sigpoll_loop_picks_a_signal_of_its_own(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    lp = sigpoll.new_event_loop()

    async def main() -> None:
        with attach() as ap:
            assert ap.poller_signal != lp.poller_signal
            assert {ap.poller_signal, lp.poller_signal} <= signals_in_use()
            got = lp.create_future()
            ap.add_device_reader(master, lambda: got.done() or got.set_result(os.read(master, 10)))
            os.write(slave, b"hint")
            assert await asyncio.wait_for(got, 5) == b"hint"
            # The hint reached the attached poller, not the loop's signalfd.
            assert ap.poller_counters().signals >= 1
            ap.remove_device_reader(master)
            with attach() as third:
                assert third.poller_signal not in (ap.poller_signal, lp.poller_signal)

    try:
        lp.run_until_complete(main())
    finally:
        lp.close()


def test_attach_refuses_a_signal_already_read_on_the_loops_thread() -> None:
    lp = sigpoll.new_event_loop()
    other = asyncio.SelectorEventLoop()
    try:
        with pytest.raises(ValueError, match=f"signal {lp.poller_signal} already carries"):
            attach(lp, signal=lp.poller_signal)
        free = pick_signal()
        with attach(other, signal=free):
            with pytest.raises(ValueError, match="omit signal="):
                AttachedPoller(other, signal=free)
            # Another loop (another thread's, say) may use it: hints go to one thread.
            with attach(lp, signal=free) as ap:
                assert ap.poller_signal == free
    finally:
        other.close()
        lp.close()


def test_signals_in_use_are_released_on_close_and_collection() -> None:
    free = pick_signal()
    assert free not in signals_in_use()
    p = sigpoll.Poller(signal=free)
    assert free in signals_in_use() and pick_signal() != free
    p.close()
    assert free not in signals_in_use()
    p = sigpoll.Poller(signal=free)
    del p
    gc.collect()
    assert free not in signals_in_use()
    # A signal with a handler is never picked.
    old = signal.signal(free, lambda *_: None)
    try:
        assert pick_signal() != free
    finally:
        signal.signal(free, old)


def test_a_backend_given_a_watcher_keeps_every_kick_fd_on_it(
    foreign_loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    # devices= wins over the default (the first attached poller), and the session adds
    # and removes each kick fd on that one watcher.
    from sigpoll.virtio import ConsoleDevice, VhostUserBackend
    from support.vhost_frontend import Frontend
    from support.virtio import serving

    lp = foreign_loop
    path = str(tmp_path / "vu.sock")

    async def main() -> None:
        with attach() as first, attach() as chosen:
            async with serving(VhostUserBackend(ConsoleDevice(), devices=chosen), path) as backend:
                seen: list[tuple[int, int]] = []

                def guest() -> None:
                    fe = Frontend(path, reply_ack=True)
                    fe.handshake()
                    for i in (0, 1):
                        fe.setup_ring(i, num=64)
                        fe.set_kick(i)
                        fe.enable(i)
                    seen.append((len(first.poller), len(chosen.poller)))
                    fe.close()

                await lp.run_in_executor(None, guest)
                assert seen == [(0, 2)]  # both kick eventfds, on the chosen watcher only
                while backend.connection is not None:
                    await asyncio.sleep(0.01)
                assert len(chosen.poller) == 0  # and taken off it again when the frontend left

    lp.run_until_complete(asyncio.wait_for(main(), 30))


def test_9p_over_a_tty_uses_the_attached_poller_on_both_sides(
    foreign_loop: asyncio.AbstractEventLoop, tmp_path: Any
) -> None:
    # trans=fd over a tty (how a guest's serial line reaches the server): the tty is a device
    # fd, so on another loop the server's side and the client's go to the poller attach()
    # nested there, not to add_reader or pipe transports.  (A client on uvloop with pipe
    # transports lost replies: uvloop's write pipe reads its fd too, to notice the peer
    # closing, and took part of them from the shared pty master.)
    from sigpoll.ninep import Client, NinepServer

    (tmp_path / "f").write_bytes(b"x" * 100_000)
    master, slave = os.openpty()
    master_w = os.dup(master)  # the client's side as a read fd and a write fd
    lp = foreign_loop

    async def main() -> None:
        with attach() as ap:
            server = NinepServer(tmp_path)
            job = asyncio.ensure_future(server.serve_fds(slave))
            await until(lambda: bool(server.connections))
            client = await Client.connect_fds(master, master_w, msize=8192)
            assert len(ap.poller) >= 2  # the server's tty fd and the client's master
            assert await client.read_file("f") == b"x" * 100_000
            assert ap.poller_counters().wakeups >= 1
            await client.close()
            await server.close()
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)

    try:
        lp.run_until_complete(asyncio.wait_for(main(), 30))
    finally:
        for fd in (master, master_w, slave):
            os.close(fd)
