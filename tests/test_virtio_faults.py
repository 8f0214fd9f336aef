"""Faults around the virtio console: a frontend dying mid-message, a call fd that is a full
pipe (UML's), the guest going away mid-transfer, and the cap on queued host output."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time
from typing import Any

import pytest

from support import until

from sigpoll import WriteBufferFullError
from sigpoll.virtio import ConsoleDevice, VhostUserBackend, open_port
from support.vhost_frontend import Frontend
from support.virtio import Collect, serving
from sigpoll.virtio._vhost_user import Request, encode_message, encode_u64


def _frontend(path: str) -> Frontend:
    fe = Frontend(path, mem_size=8 << 20)
    fe.handshake()
    for i in (0, 1):
        fe.setup_ring(i, num=64)
        fe.set_kick(i)
        fe.enable(i)
    return fe


def test_frontend_dying_mid_message_leaves_the_backend_serving(run: Any, tmp_path: Any) -> None:
    path = str(tmp_path / "vu.sock")

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path) as backend:
            def die_mid_header_then_mid_payload() -> None:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.sendall(encode_message(Request.SET_OWNER)[:5])  # half a header
                s.close()
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                r, w = os.pipe()
                whole = encode_message(Request.SET_VRING_CALL, encode_u64(0))
                socket.send_fds(s, [whole[:14]], [w])  # header and part of the payload, with an fd
                os.close(w)
                os.close(r)
                s.close()

            def live() -> None:
                fe = _frontend(path)  # the next frontend gets a clean device
                fe.add(1, out=b"still here")
                fe.kick(1)
                fe.wait_used(1, 1)
                fe.close()

            await asyncio.to_thread(die_mid_header_then_mid_payload)
            await until(lambda: backend.sessions == 2 and backend.connection is None, timeout=20.0)
            # The device went away with each frontend, ending host transports; attach anew.
            proto = Collect()
            device.ports[0].connect(lambda: proto)
            await asyncio.to_thread(live)
            await until(lambda: bytes(proto.data) == b"still here" or proto.lost.done(), timeout=20.0)
            assert bytes(proto.data) == b"still here"
            assert backend.sessions == 3

    run(main(), timeout=60)


def test_a_full_call_pipe_neither_blocks_nor_loses_data(run: Any, tmp_path: Any) -> None:
    """UML's call fd is a pipe's write end; when the guest is slow to read it, it fills."""
    path = str(tmp_path / "vu.sock")

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path):
            proto = Collect()
            device.ports[0].connect(lambda: proto)
            expected = b"".join(b"chunk %05d;" % i for i in range(2000))

            def guest() -> int:
                fe = _frontend(path)
                r, w = os.pipe()
                fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
                with pytest.raises(BlockingIOError):
                    while True:
                        os.write(w, b"\0" * 4096)  # full before the first interrupt
                fe.send(Request.SET_VRING_CALL, encode_u64(1), [w])
                os.close(w)
                sent = 0
                in_flight = 0
                deadline = time.monotonic() + 60
                while sent < 2000 or in_flight:
                    while sent < 2000 and in_flight < 32:
                        fe.add(1, out=b"chunk %05d;" % sent)
                        sent += 1
                        in_flight += 1
                    fe.kick(1)
                    back = fe.used(1)
                    in_flight -= len(back)
                    if not back:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{sent} sent, {in_flight} not returned")
                        time.sleep(0.001)
                fe.close()
                os.close(r)
                return sent

            assert await asyncio.to_thread(guest) == 2000
            await until(lambda: len(proto.data) >= len(expected), timeout=20.0)
            assert bytes(proto.data) == expected

    run(main(), timeout=90)


def test_guest_going_away_mid_transfer_ends_the_session_cleanly(run: Any, tmp_path: Any) -> None:
    """A reboot in the middle of host output: the writer sees the port end, nothing stale
    reaches the next guest, and a fresh transport works with it."""
    path = str(tmp_path / "vu.sock")

    async def main() -> None:
        device = ConsoleDevice()
        async with serving(VhostUserBackend(device), path) as backend:
            reader, writer = await open_port(device.ports[0])
            writer.write(b"x" * (4 << 20))  # far more than the guest will take

            def first_guest() -> int:
                fe = _frontend(path)
                for _ in range(8):
                    fe.add(0, in_len=4096)
                fe.kick(0)
                got = fe.wait_used(0, 8)
                fe.close()  # gone, mid-transfer
                return sum(length for _, length, _ in got)

            assert await asyncio.to_thread(first_guest) == 8 * 4096
            await asyncio.wait_for(reader.read(), 20)  # EOF: the port ended with the guest
            assert writer.transport.is_closing()
            assert device.ports[0].to_guest_len == 0  # the rest was dropped with the session
            reader, writer = await open_port(device.ports[0])
            writer.write(b"fresh")

            def second_guest() -> bytes:
                fe = _frontend(path)
                fe.add(0, in_len=4096)
                fe.kick(0)
                (_, length, data), = fe.wait_used(0, 1)
                fe.close()
                return data[:length]

            assert await asyncio.to_thread(second_guest) == b"fresh"
            assert backend.sessions == 2 and not backend.dropped
            writer.close()

    run(main(), timeout=60)


def test_queued_output_is_capped_with_a_clear_error(run: Any) -> None:
    async def main() -> None:
        device = ConsoleDevice(["data"])
        reader, writer = await open_port(device.ports[1])
        transport = writer.transport
        transport.set_max_write_buffer(1 << 20)  # type: ignore[attr-defined]
        writer.write(b"a" * (1 << 20))  # no guest: it all waits, up to the cap
        with pytest.raises(WriteBufferFullError, match="max_write_buffer"):
            writer.write(b"b")
        assert transport.get_write_buffer_size() == 1 << 20  # the refused write queued nothing
        with pytest.raises(ValueError):
            transport.set_max_write_buffer(10)  # type: ignore[attr-defined]
        writer.close()

    run(main())
