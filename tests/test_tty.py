"""Consoles on real ptys: binary streams both ways, flow control, hang-up, window size."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigpoll import tty as stty


class Guest:
    """The far end of a pty: a thread that plays a guest on the slave side."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)

    def send(self, data: bytes, chunk: int = 65536) -> threading.Thread:
        def run() -> None:
            for i in range(0, len(data), chunk):
                view = memoryview(data)[i : i + chunk]
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]

        t = threading.Thread(target=run)
        t.start()
        return t

    def receive(self, count: int, *, delay: float = 0.0, chunk: int = 65536) -> tuple[threading.Thread, bytearray]:
        got = bytearray()

        def run() -> None:
            while len(got) < count:
                got.extend(os.read(self.fd, chunk))
                if delay:
                    time.sleep(delay)

        t = threading.Thread(target=run)
        t.start()
        return t, got

    def close(self) -> None:
        os.close(self.fd)


async def _both_ways(to_host: bytes, to_guest: bytes, read_chunk: int, guest_delay: float) -> None:
    master, path = stty.open_pty()
    guest = Guest(path)
    try:
        reader, writer = await stty.open_console(master)
        sender = guest.send(to_host)
        receiver, got_guest = guest.receive(len(to_guest), delay=guest_delay)
        writer.write(to_guest)
        got_host = bytearray()
        while len(got_host) < len(to_host):
            data = await reader.read(read_chunk)
            assert data, "console ended early"
            got_host.extend(data)
        await writer.drain()
        await asyncio.to_thread(sender.join)
        await asyncio.to_thread(receiver.join, 30)
        assert bytes(got_host) == to_host
        assert bytes(got_guest) == to_guest
        writer.close()
        await writer.wait_closed()
    finally:
        guest.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    to_host=st.binary(max_size=20000),
    to_guest=st.binary(max_size=20000),
    read_chunk=st.sampled_from([1, 7, 4096, 65536]),
    guest_delay=st.sampled_from([0.0, 0.001]),
)
def test_arbitrary_binary_streams_both_ways(run: Any, to_host: bytes, to_guest: bytes, read_chunk: int, guest_delay: float) -> None:
    run(_both_ways(to_host, to_guest, read_chunk, guest_delay))


def test_writes_bigger_than_the_pty_buffer_with_a_slow_reader(run: Any) -> None:
    big = os.urandom(4 * 1024 * 1024)
    run(_both_ways(os.urandom(1 << 20), big, 65536, 0.0005))


def test_write_flow_control_pauses_and_resumes(run: Any) -> None:
    async def main() -> None:
        master, path = stty.open_pty()
        guest = Guest(path)
        events: list[str] = []
        done = asyncio.get_running_loop().create_future()

        class P(stty.ConsoleProtocol):
            def pause_writing(self) -> None:
                events.append("pause")

            def resume_writing(self) -> None:
                events.append("resume")
                if not done.done():
                    done.set_result(None)

        transport, _ = await stty.connect_console(P, master)
        transport.set_write_buffer_limits(high=32768, low=4096)
        data = os.urandom(1 << 20)
        transport.write(data)
        assert events == ["pause"] and transport.get_write_buffer_size() > 32768
        receiver, got = guest.receive(len(data))
        await done
        await asyncio.to_thread(receiver.join, 30)
        assert bytes(got) == data and transport.get_write_buffer_size() == 0
        transport.close()
        guest.close()

    run(main())


def test_queued_output_is_capped_and_a_refused_write_loses_nothing(run: Any) -> None:
    """A writer that ignores pause_writing meets a clear error, not unbounded memory."""
    import sigpoll

    async def main() -> None:
        master, path = stty.open_pty()
        guest = Guest(path)
        transport, _ = await stty.connect_console(stty.ConsoleProtocol, master)
        assert transport.get_max_write_buffer() == 16 * 1024 * 1024
        with pytest.raises(ValueError, match="high-water"):
            transport.set_max_write_buffer(1024)
        transport.set_max_write_buffer(256 * 1024)
        accepted = bytearray()
        chunk = os.urandom(40_000)
        with pytest.raises(sigpoll.WriteBufferFullError, match="max_write_buffer of 262144"):
            for _ in range(100):  # the guest reads nothing, so the queue only grows
                transport.write(chunk)
                accepted += chunk
        queued = transport.get_write_buffer_size()
        assert 0 < queued <= 256 * 1024 and len(accepted) > queued
        with pytest.raises(sigpoll.WriteBufferFullError):
            transport.write(b"x" * (256 * 1024 + 1))  # refused whole, even with room for part
        assert transport.get_write_buffer_size() == queued
        receiver, got = guest.receive(len(accepted))
        await asyncio.to_thread(receiver.join, 30)
        assert bytes(got) == bytes(accepted)  # every accepted byte, once, in order
        transport.set_max_write_buffer(None)
        transport.write(b"after")
        transport.close()
        guest.close()

    run(main())


def test_read_backpressure_stops_reading(run: Any) -> None:
    async def main() -> None:
        master, path = stty.open_pty()
        guest = Guest(path)
        os.set_blocking(guest.fd, False)
        received = bytearray()

        class P(stty.ConsoleProtocol):
            def data_received(self, data: bytes) -> None:
                received.extend(data)

        transport, _ = await stty.connect_console(P, master)
        await asyncio.sleep(0.05)
        transport.pause_reading()
        assert not transport.is_reading()
        sent = 0
        try:  # with nobody reading, the guest's writes must end in EAGAIN
            while sent < 50 * 1024 * 1024:
                sent += os.write(guest.fd, b"z" * 4096)
        except BlockingIOError:
            pass
        assert sent < 50 * 1024 * 1024
        await asyncio.sleep(0.1)
        assert len(received) == 0
        transport.resume_reading()
        while len(received) < sent:
            await asyncio.sleep(0.01)
        assert bytes(received) == b"z" * sent
        transport.close()
        guest.close()

    run(main())


def test_hangup_is_a_clean_connection_lost_and_reopen_is_picked_up(run: Any) -> None:
    async def main() -> None:
        with stty.Pty() as pty:
            lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            data = bytearray()

            class P(stty.ConsoleProtocol):
                def data_received(self, d: bytes) -> None:
                    data.extend(d)

                def connection_lost(self, exc: Exception | None) -> None:
                    lost.set_result(exc)

            guest = Guest(pty.slave_path)
            await pty.wait_for_slave(timeout=5)
            await pty.connect(P)
            os.write(guest.fd, b"boot 1\n")
            guest.close()  # the guest powers off
            assert await asyncio.wait_for(lost, 5) is None
            assert bytes(data) == b"boot 1\n"
            assert not pty.slave_open()
            # The guest reboots and opens its console again.
            guest = Guest(pty.slave_path)
            await pty.wait_for_slave(timeout=5)
            reader, writer = await stty.open_console(pty.master, close_fds=False)
            os.write(guest.fd, b"boot 2\n")
            assert await reader.readexactly(7) == b"boot 2\n"
            guest.close()
            assert await reader.read() == b""
            writer.close()

    run(main())


def test_window_size_and_resize_events(run: Any) -> None:
    async def main() -> None:
        master, path = stty.open_pty(rows=24, cols=80)
        guest = Guest(path)
        try:
            assert stty.get_winsize(guest.fd) == (24, 80)
            transport, _ = await stty.connect_console(stty.ConsoleProtocol, master, close_fds=False)
            transport.set_winsize(50, 132)
            assert stty.get_winsize(guest.fd) == (50, 132) == transport.get_winsize()
            with pytest.raises(ValueError):
                stty.set_winsize(master, -1, 10)
            seen: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
            stop = stty.watch_resize(asyncio.get_running_loop(), master, lambda r, c: seen.done() or seen.set_result((r, c)))
            os.kill(os.getpid(), signal.SIGWINCH)
            assert await asyncio.wait_for(seen, 5) == (50, 132)
            stop()
            transport.close()
        finally:
            guest.close()
            os.close(master)

    run(main())


def test_tee_copies_console_output_to_a_log(run: Any, tmp_path: Any) -> None:
    async def main() -> None:
        master, path = stty.open_pty()
        guest = Guest(path)
        with open(tmp_path / "console.log", "wb") as log:
            reader, writer = await stty.open_console(master, tee=log)
            payload = os.urandom(100_000)
            sender = guest.send(payload)
            assert await reader.readexactly(len(payload)) == payload
            await asyncio.to_thread(sender.join)
            writer.close()
            await writer.wait_closed()
        assert (tmp_path / "console.log").read_bytes() == payload
        guest.close()

    run(main())


def test_many_consoles_on_one_loop(run: Any) -> None:
    async def one(i: int) -> None:
        payload = hashlib.sha256(str(i).encode()).digest() * 2000
        await _both_ways(payload, payload[::-1], 4096, 0.0)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(16)))

    run(main())


def test_raw_mode_is_restored_after_an_exception() -> None:
    import termios

    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with pytest.raises(KeyboardInterrupt):
            with stty.raw_mode(slave):
                assert termios.tcgetattr(slave) != before
                raise KeyboardInterrupt
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_open_console_argument_errors(run: Any) -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            await stty.open_console()
        with pytest.raises(ValueError):
            await stty.open_console(0, path="/dev/null")

    run(main())
