"""The vhost-user backend against a Python frontend (memfd memory, eventfds).

The frontend runs in a thread and behaves like a VMM plus guest driver.  The centrepiece
is the seed's race: a guest enables a ring and kicks at once (OVMF's order), with and
without REPLY_ACK, thousands of times, and not one request may be lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from sigpoll._testing import until

from sigpoll.virtio import ConsoleDevice, ControlEvent, ResizeOrder, VhostUserBackend, open_port
from sigpoll.virtio._frontend import Frontend
from sigpoll.virtio._testing import Collect, serving
from sigpoll.virtio._vhost_user import (
    HEADER,
    MemoryRegion,
    Request,
    encode_mem_table,
    encode_message,
    encode_u64,
    encode_vring_state,
)

RACE_ROUNDS = int(os.environ.get("SIGPOLL_VIRTIO_RACE_ROUNDS", "2000"))


def _sock_path(tmp_path: Any) -> str:
    return str(tmp_path / "vu.sock")


def _start_console_frontend(path: str, reply_ack: bool) -> Frontend:
    fe = Frontend(path, reply_ack=reply_ack)
    fe.handshake()
    for i in (0, 1):
        fe.setup_ring(i, num=64)
    return fe


@pytest.mark.parametrize("reply_ack", [True, False], ids=["reply-ack", "fire-and-forget"])
@pytest.mark.parametrize("order", ["enable-then-kick", "kick-then-enable", "no-kick"])
def test_kick_around_enable_is_never_lost(run: Any, tmp_path: Any, reply_ack: bool, order: str) -> None:
    """Stop the transmit ring, restart it, make a buffer available and enable it -- with
    the kick right after the enable (OVMF), before it, or not at all -- many times over."""
    path = _sock_path(tmp_path)

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device, reply_ack=reply_ack), path) as backend:
            proto = Collect()
            device.ports[0].connect(lambda: proto)
            expected = bytearray()

            def frontend() -> None:
                fe = _start_console_frontend(path, reply_ack)
                assert fe.reply_ack == reply_ack
                for i in (0, 1):
                    fe.set_kick(i)
                    fe.enable(i)
                keep = fe._brk
                for n in range(RACE_ROUNDS):
                    fe.enable(1, False)
                    base = fe.stop(1)  # GET_VRING_BASE: ring stopped, kick fd dropped
                    fe.restart_ring(1, base)
                    fe.reset_allocator(keep)
                    payload = b"request %d;" % n
                    expected.extend(payload)
                    fe.add(1, out=payload)
                    fe.set_kick(1)
                    if order == "enable-then-kick":
                        fe.enable(1)
                        fe.kick(1)
                    elif order == "kick-then-enable":
                        fe.kick(1)  # the guest kicks while the ring is still disabled
                        fe.enable(1)
                    else:
                        fe.enable(1)  # the buffer was there; no kick at all
                    used = fe.wait_used(1, 1, timeout=5)
                    assert used[0][1] == 0
                fe.close()

            await asyncio.to_thread(frontend)
            await until(lambda: len(proto.data) >= len(expected))
            assert bytes(proto.data) == bytes(expected)
            assert not backend.dropped

    run(main(), timeout=120)


@pytest.mark.parametrize("reply_ack", [True, False], ids=["reply-ack", "fire-and-forget"])
def test_fresh_frontends_one_after_another(run: Any, tmp_path: Any, reply_ack: bool) -> None:
    """OVMF's whole sequence per boot: connect, negotiate, rings, enable, kick at once."""
    path = _sock_path(tmp_path)
    boots = 150

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device, reply_ack=reply_ack), path) as backend:
            got: list[bytes] = []

            for n in range(boots):
                proto = Collect()
                device.ports[0].connect(lambda: proto)

                def frontend(n: int = n) -> None:
                    fe = _start_console_frontend(path, reply_ack)
                    fe.set_kick(0)
                    fe.enable(0)
                    fe.add(1, out=b"boot %d" % n)
                    fe.set_kick(1)
                    fe.enable(1)
                    fe.kick(1)
                    fe.wait_used(1, 1)
                    fe.close()

                await asyncio.to_thread(frontend)
                await asyncio.wait_for(proto.lost, 10)  # frontend gone: the port hangs up
                got.append(bytes(proto.data))
            assert got == [b"boot %d" % n for n in range(boots)]
            assert backend.sessions == boots and not backend.dropped

    run(main(), timeout=120)


def test_host_writes_of_any_size_arrive_whole(run: Any, tmp_path: Any) -> None:
    """Host writes that do not line up with the guest's buffers, both ways round."""
    path = _sock_path(tmp_path)
    sizes = [1, 7, 4095, 4096, 4097, 100, 65536 + 3, 13, 200000]
    total = sum(sizes)

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path):
            proto = Collect()
            transport, _ = device.ports[0].connect(lambda: proto)
            transport.set_write_buffer_limits(high=32768)
            data = os.urandom(total)
            received = bytearray()

            def frontend() -> None:
                fe = _start_console_frontend(path, True)
                for i in (0, 1):
                    fe.set_kick(i)
                    fe.enable(i)
                keep = fe._brk
                for _ in range(32):
                    fe.add(0, in_len=1000)  # deliberately not a page
                fe.kick(0)
                while len(received) < total:
                    used = fe.wait_used(0, 1)
                    for _, length, chunk in used:
                        assert length == len(chunk) <= 1000
                        received.extend(chunk)
                    if len(fe.rings[0].free) == 64:
                        fe.reset_allocator(keep)
                    for _ in used:
                        fe.add(0, in_len=1000)
                    fe.kick(0)
                fe.close()

            thread = asyncio.ensure_future(asyncio.to_thread(frontend))
            await device.ports[0].wait_guest_open()
            pos = 0
            for s in sizes:
                transport.write(data[pos : pos + s])
                pos += s
            await thread
            assert bytes(received) == data
            assert transport.bytes_written == total
            assert proto.paused >= 1 and proto.resumed >= 1  # flow control both ways round

    run(main(), timeout=60)


def _raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _nonsense(path: str, kind: str) -> None:
    s = _raw_connect(path)
    try:
        if kind == "bad-version":
            s.sendall(struct.pack("<III", Request.GET_FEATURES, 0x2, 0))
        elif kind == "huge-size":
            s.sendall(struct.pack("<III", Request.SET_FEATURES, 0x1, 1 << 30))
        elif kind == "unknown-request":
            s.sendall(encode_message(999))
        elif kind == "short-payload":
            s.sendall(encode_message(Request.SET_VRING_NUM, b"\0\0"))
        elif kind == "ring-out-of-range":
            s.sendall(encode_message(Request.SET_VRING_NUM, encode_vring_state(200, 64)))
        elif kind == "mem-table-without-fd":
            s.sendall(encode_message(Request.SET_MEM_TABLE, encode_mem_table([MemoryRegion(0, 4096, 0, 0)])))
        elif kind == "mem-table-past-fd-end":
            fd = os.memfd_create("small")
            os.ftruncate(fd, 4096)
            socket.send_fds(s, [encode_message(Request.SET_MEM_TABLE,
                                               encode_mem_table([MemoryRegion(0, 1 << 20, 0, 0)]))], [fd])
            os.close(fd)
        elif kind == "unoffered-feature":
            s.sendall(encode_message(Request.SET_FEATURES, encode_u64(1 << 63)))
        elif kind == "garbage":
            s.sendall(b"\xff" * 76)  # version bits 3
        elif kind == "half-header":
            s.sendall(b"\x01\x00\x00")
            return  # and hang up mid-message
        # the backend must drop us (EOF) rather than wait or reply
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"backend kept a frontend that sent {kind}") from None
    finally:
        s.close()


NONSENSE = ["bad-version", "huge-size", "unknown-request", "short-payload", "ring-out-of-range",
            "mem-table-without-fd", "mem-table-past-fd-end", "unoffered-feature", "garbage"]


def test_nonsense_drops_the_frontend_and_the_next_one_is_served(run: Any, tmp_path: Any, caplog: Any) -> None:
    path = _sock_path(tmp_path)
    caplog.set_level(logging.WARNING, "sigpoll.virtio")

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path) as backend:
            for n, kind in enumerate(NONSENSE + ["half-header"]):
                await asyncio.to_thread(_nonsense, path, kind)
                # that session's end resets the device, which hangs up attached transports
                await until(lambda n=n: backend.sessions == 2 * n + 1 and backend.connection is None)
                proto = Collect()
                device.ports[0].connect(lambda: proto)

                def good() -> None:
                    fe = _start_console_frontend(path, True)
                    for i in (0, 1):
                        fe.set_kick(i)
                        fe.enable(i)
                    fe.add(1, out=b"still serving")
                    fe.kick(1)
                    fe.wait_used(1, 1)
                    fe.close()

                await asyncio.to_thread(good)
                await asyncio.wait_for(proto.lost, 10)
                assert bytes(proto.data) == b"still serving", kind
            assert len(backend.dropped) == len(NONSENSE)  # the half header is just a hang-up

    run(main(), timeout=60)


def test_hostile_ring_breaks_the_queue_not_the_backend(run: Any, tmp_path: Any, caplog: Any) -> None:
    path = _sock_path(tmp_path)
    caplog.set_level(logging.WARNING, "sigpoll.virtio")

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path) as backend:
            def hostile() -> None:
                fe = _start_console_frontend(path, True)
                for i in (0, 1):
                    fe.set_kick(i)
                    fe.enable(i)
                r = fe.rings[1]
                # descriptor 0 -> 0: a loop; then an address far outside guest memory
                struct.pack_into("<QIHH", fe.mem, r.desc, fe.gpa(0x2000), 16, 1, 0)
                struct.pack_into("<H", fe.mem, r.avail + 4, 0)
                struct.pack_into("<H", fe.mem, r.avail + 2, 1)
                fe.kick(1)
                struct.pack_into("<QIHH", fe.mem, fe.rings[0].desc, 1 << 50, 4096, 2, 0)
                struct.pack_into("<H", fe.mem, fe.rings[0].avail + 2, 1)
                fe.kick(0)
                # the control channel still answers
                fe.send(Request.GET_FEATURES, reply=True)
                # kicks and messages travel on different fds: give the kicks time to land
                time.sleep(0.3)
                fe.close()

            proto = Collect()
            transport, _ = device.ports[0].connect(lambda: proto)
            transport.write(b"for the guest")  # makes the backend read ring 0
            await asyncio.to_thread(hostile)
            await asyncio.wait_for(proto.lost, 10)
            assert any("loops" in r.getMessage() for r in caplog.records)
            assert any("outside every memory region" in r.getMessage() for r in caplog.records)
            assert backend.sessions == 1

    run(main(), timeout=30)


# -- MULTIPORT: a small driver for the control queue --


class MultiportDriver:
    """Just enough of Linux's virtio_console driver to run the control handshake."""

    def __init__(self, fe: Frontend, nports: int) -> None:
        self.fe = fe
        self.nports = nports
        self.events: list[tuple[int, int, int, bytes]] = []

    def start(self) -> None:
        fe = self.fe
        for i in range(2 * self.nports + 2):
            fe.setup_ring(i, num=32)
        for _ in range(16):
            fe.add(2, in_len=4096)
        for i in range(2 * self.nports + 2):
            fe.set_kick(i)
            fe.enable(i)
        self.send(0, ControlEvent.DEVICE_READY, 1)

    def send(self, port: int, event: int, value: int) -> None:
        self.fe.add(3, out=struct.pack("<IHH", port, event, value))
        self.fe.kick(3)
        self.fe.wait_used(3, 1)

    def poll(self, want: Callable[[list[tuple[int, int, int, bytes]]], bool], timeout: float = 5) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not want(self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"control events so far: {self.events}")
            self.fe.wait_call(2, 0.1)
            for _, length, data in self.fe.used(2):
                port, event, value = struct.unpack_from("<IHH", data)
                self.events.append((port, event, value, data[8:length]))
                self.fe.add(2, in_len=4096)
                self.fe.kick(2)
                self.react(port, event, value)

    def react(self, port: int, event: int, value: int) -> None:
        if event == ControlEvent.DEVICE_ADD:
            rx = 0 if port == 0 else 2 * port + 2
            for _ in range(8):
                self.fe.add(rx, in_len=4096)
            self.fe.kick(rx)
            self.send(port, ControlEvent.PORT_READY, 1)
        elif event == ControlEvent.CONSOLE_PORT:
            self.send(port, ControlEvent.PORT_OPEN, 1)


def test_multiport_handshake_names_open_resize_and_eof_order(run: Any, tmp_path: Any) -> None:
    path = _sock_path(tmp_path)

    async def main() -> None:
        device = ConsoleDevice(["alpha", "beta"], size=(25, 80), resize_order=ResizeOrder.COLS_ROWS)
        async with serving(VhostUserBackend(device), path):
            beta = Collect()
            device.ports[2].connect(lambda: beta)  # host side of "beta" open before the guest
            state: dict[str, Any] = {}
            resized = asyncio.Event()
            loop = asyncio.get_running_loop()

            def guest() -> None:
                fe = Frontend(path)
                fe.handshake()
                cfg = fe.send(Request.GET_CONFIG, struct.pack("<III", 0, 12, 0) + bytes(12), reply=True)
                assert cfg is not None
                state["config"] = struct.unpack_from("<HHII", cfg, 12)
                drv = MultiportDriver(fe, 3)
                drv.start()
                names = lambda ev: {p: d for p, e, v, d in ev if e == ControlEvent.PORT_NAME}  # noqa: E731
                drv.poll(lambda ev: len(names(ev)) == 2 and any(e == ControlEvent.PORT_OPEN for _, e, _, _ in ev))
                state["names"] = names(drv.events)
                state["events"] = list(drv.events)
                loop.call_soon_threadsafe(lambda: device.ports[0].resize(50, 132))
                drv.poll(lambda ev: any(e == ControlEvent.RESIZE and v == 0 and d[:4] for _, e, v, d in ev[len(state["events"]):])
                         and ev[-1][1] == ControlEvent.RESIZE)
                state["resize"] = [d for _, e, _, d in drv.events if e == ControlEvent.RESIZE]
                loop.call_soon_threadsafe(resized.set)
                # port 2 ("beta"): the guest opens it, writes, and closes straight away
                drv.send(2, ControlEvent.PORT_OPEN, 1)
                for k in range(20):
                    fe.add(7, out=b"%04d" % k * 1000)
                fe.kick(7)
                drv.send(2, ControlEvent.PORT_OPEN, 0)
                fe.wait_used(7, 20)
                fe.close()

            await asyncio.to_thread(guest)
            await asyncio.wait_for(beta.lost, 10)
            assert state["config"] == (80, 25, 3, 0)  # cols, rows, max_nr_ports, emerg_wr
            assert state["names"] == {1: b"alpha", 2: b"beta"}
            kinds = [(p, e) for p, e, _, _ in state["events"]]
            assert kinds[:3] == [(0, ControlEvent.DEVICE_ADD), (1, ControlEvent.DEVICE_ADD), (2, ControlEvent.DEVICE_ADD)]
            assert (0, ControlEvent.CONSOLE_PORT) in kinds and (2, ControlEvent.PORT_OPEN) in kinds
            assert (1, ControlEvent.PORT_OPEN) not in kinds  # nobody on the host has "alpha" open
            # the initial size, then the resize, both as (cols, rows) per the spec
            assert state["resize"] == [struct.pack("<HH", 80, 25), struct.pack("<HH", 132, 50)]
            # everything written before the close, then EOF
            assert bytes(beta.data) == b"".join(b"%04d" % k * 1000 for k in range(20))
            assert beta.eof

    run(main(), timeout=60)


def test_paused_reader_leaves_buffers_in_the_ring(run: Any, tmp_path: Any) -> None:
    path = _sock_path(tmp_path)

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path):
            proto = Collect()
            transport, _ = device.ports[0].connect(lambda: proto)
            transport.pause_reading()
            fe = await asyncio.to_thread(_start_console_frontend, path, True)
            for i in (0, 1):
                await asyncio.to_thread(fe.set_kick, i)
                await asyncio.to_thread(fe.enable, i)
            for k in range(10):
                fe.add(1, out=b"x%d" % k)
            fe.kick(1)
            await asyncio.sleep(0.2)
            assert fe.used(1) == [] and not proto.data  # not taken while paused
            transport.resume_reading()
            used = await asyncio.to_thread(fe.wait_used, 1, 10)
            assert len(used) == 10
            await until(lambda: len(proto.data) == sum(len(b"x%d" % k) for k in range(10)))
            await asyncio.to_thread(fe.close)

    run(main(), timeout=30)


def test_open_port_streams_and_emergency_write(run: Any, tmp_path: Any) -> None:
    path = _sock_path(tmp_path)

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path):
            reader, writer = await open_port(device.ports[0])

            def guest() -> bytes:
                fe = _start_console_frontend(path, True)
                for i in (0, 1):
                    fe.set_kick(i)
                    fe.enable(i)
                fe.add(0, in_len=64)
                fe.kick(0)
                fe.add(1, out=b"ping\n")
                fe.kick(1)
                # emergency write: one character into config offset 8
                fe.send(Request.SET_CONFIG, struct.pack("<III", 8, 4, 0) + b"!\0\0\0")
                got = fe.wait_used(0, 1)[0][2]
                fe.close()
                return got

            task = asyncio.ensure_future(asyncio.to_thread(guest))
            # The emergency character bypasses the rings, so it may come before or after.
            got = await reader.readexactly(6)
            assert sorted(got) == sorted(b"ping\n!") and got.replace(b"!", b"") == b"ping\n"
            writer.write(b"pong\n")
            await writer.drain()
            assert await task == b"pong\n"
            assert device.emergency_bytes == 1

    run(main(), timeout=30)


def test_emergency_writes_with_no_room_are_dropped_and_counted() -> None:
    """The emergency character bypasses the rings, so a guest writing it in a loop cannot
    be made to wait: with no host reader the backlog bound holds and the rest is counted."""
    from sigpoll.virtio._console import UNCONNECTED_BACKLOG

    device = ConsoleDevice()
    for _ in range(UNCONNECTED_BACKLOG + 1000):
        device.write_config(8, b"!\0\0\0")
    assert device.emergency_bytes == UNCONNECTED_BACKLOG
    assert device.emergency_dropped == 1000


def test_header_constant() -> None:
    assert HEADER.size == 12
