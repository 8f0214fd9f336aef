"""A minimal vhost-user *frontend* and virtio *driver* in Python, for tests and benches.

It plays the guest's side the way a VMM and guest driver do: guest memory is a memfd
shared with the backend, kicks and calls are eventfds, and the driver side of each split
ring (descriptor allocation, avail ring, reading the used ring) lives here.  Guest and user
addresses deliberately differ (``user_base`` vs ``guest_base``), so a backend that
translates one with the other's table is caught.

Blocking and single-threaded: run it in a thread next to the backend's event loop.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ._vhost_user import (
    Feature,
    MemoryRegion,
    ProtocolFeature,
    Request,
    VringAddr,
    HEADER,
    decode_header,
    encode_mem_table,
    encode_message,
    encode_u64,
    encode_vring_addr,
    encode_vring_state,
)
from ._virtqueue import _le16, u16_view

__all__ = ["ConsoleDriver", "DriverRing", "Frontend"]

_DESC = struct.Struct("<QIHH")
_CONTROL = struct.Struct("<IHH")


@dataclass
class DriverRing:
    """The driver's side of one split ring in the frontend's memory."""

    index: int
    num: int
    desc: int  # offsets into the memory buffer
    avail: int
    used: int
    kick: int = -1
    call: int = -1
    avail_idx: int = 0
    last_used: int = 0
    free: list[int] = field(default_factory=list)
    buffers: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # head -> [(off, len)]
    ndesc: dict[int, int] = field(default_factory=dict)  # head -> ring descriptors it holds


class Frontend:
    """Connect to a backend and drive its rings like a guest would."""

    def __init__(self, path: str, *, mem_size: int = 4 << 20, reply_ack: bool = True,
                 guest_base: int = 0x40000000, user_base: int = 0x7F0000000000,
                 features: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.mem_size = mem_size
        self.memfd = os.memfd_create("guest-mem", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self.mem = mmap.mmap(self.memfd, mem_size)
        # Indexes and event fields the backend may read at any moment are stored whole
        # through this view; struct.pack_into zeroes its target before writing.
        self._mem16 = u16_view(self.mem)
        self.guest_base, self.user_base = guest_base, user_base
        self.want_reply_ack = reply_ack
        self.reply_ack = False
        self.features = 0
        self.want_features = features
        self._brk = 0x1000
        self.rings: dict[int, DriverRing] = {}

    # -- memory --

    def alloc(self, size: int, align: int = 16) -> int:
        off = (self._brk + align - 1) & ~(align - 1)
        if off + size > self.mem_size:
            raise MemoryError("frontend memory exhausted")
        self._brk = off + size
        return off

    def gpa(self, off: int) -> int:
        return self.guest_base + off

    def uva(self, off: int) -> int:
        return self.user_base + off

    # -- messages --

    def send(self, request: int, payload: bytes = b"", fds: list[int] = (),  # type: ignore[assignment]
             *, reply: bool = False, wait_ack: bool | None = None) -> bytes | None:
        """Send a request; return the reply payload if one is expected."""
        ack = self.reply_ack if wait_ack is None else wait_ack
        need = ack and not reply
        data = encode_message(request, payload, need_reply=need)
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        if reply or need:
            return self._recv_reply(request, ack=not reply)
        return None

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("backend closed the connection")
            buf += chunk
        return buf

    def _recv_reply(self, request: int, ack: bool = False) -> bytes:
        req, flags, size = decode_header(self._recv_exact(HEADER.size))
        if req != request or not flags & 0x4:
            raise ConnectionError(f"unexpected reply {req} flags {flags:#x} to {request}")
        payload = self._recv_exact(size)
        if ack and (size != 8 or struct.unpack("<Q", payload)[0]):
            raise ConnectionError(f"backend reports failure for request {request}")
        return payload

    def handshake(self) -> None:
        """SET_OWNER, feature and protocol-feature negotiation, memory table (UML's order)."""
        self.send(Request.SET_OWNER)
        offered = struct.unpack("<Q", self.send(Request.GET_FEATURES, reply=True))[0]  # type: ignore[arg-type]
        proto = 0
        if offered & Feature.PROTOCOL_FEATURES:
            proto = struct.unpack("<Q", self.send(Request.GET_PROTOCOL_FEATURES, reply=True))[0]  # type: ignore[arg-type]
            keep = ProtocolFeature.CONFIG | ProtocolFeature.MQ
            if self.want_reply_ack:
                keep |= ProtocolFeature.REPLY_ACK
            proto &= keep
            self.send(Request.SET_PROTOCOL_FEATURES, encode_u64(proto))
            self.reply_ack = bool(proto & ProtocolFeature.REPLY_ACK)
        want = offered if self.want_features is None else self.want_features & offered
        self.features = want | (offered & Feature.PROTOCOL_FEATURES)
        self.send(Request.SET_FEATURES, encode_u64(self.features))
        region = MemoryRegion(self.guest_base, self.mem_size, self.user_base, 0)
        self.send(Request.SET_MEM_TABLE, encode_mem_table([region]), [self.memfd])

    # -- rings --

    def setup_ring(self, index: int, num: int = 64, base: int = 0) -> DriverRing:
        """Lay out ring ``index`` and send CALL, NUM, BASE, ADDR (not KICK/ENABLE yet)."""
        desc = self.alloc(16 * num, 16)
        avail = self.alloc(6 + 2 * num, 2)
        used = self.alloc(6 + 8 * num, 4)
        r = DriverRing(index, num, desc, avail, used, free=list(range(num)))
        r.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        r.avail_idx = r.last_used = base
        self.rings[index] = r
        self.send(Request.SET_VRING_CALL, encode_u64(index), [r.call])
        self.send(Request.SET_VRING_NUM, encode_vring_state(index, num))
        self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        self.send(Request.SET_VRING_ADDR, encode_vring_addr(
            VringAddr(index, 0, self.uva(desc), self.uva(used), self.uva(avail), 0)))
        return r

    def restart_ring(self, index: int, base: int) -> None:
        """Re-describe a stopped ring in place (NUM, BASE, ADDR), continuing from ``base``."""
        r = self.rings[index]
        r.avail_idx = r.last_used = base
        self.send(Request.SET_VRING_NUM, encode_vring_state(index, r.num))
        self.send(Request.SET_VRING_BASE, encode_vring_state(index, base))
        self.send(Request.SET_VRING_ADDR, encode_vring_addr(
            VringAddr(index, 0, self.uva(r.desc), self.uva(r.used), self.uva(r.avail), 0)))

    def set_kick(self, index: int) -> int:
        r = self.rings[index]
        if r.kick >= 0:
            os.close(r.kick)
        r.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.send(Request.SET_VRING_KICK, encode_u64(index), [r.kick])
        return r.kick

    def enable(self, index: int, on: bool = True) -> None:
        self.send(Request.SET_VRING_ENABLE, encode_vring_state(index, int(on)))

    def stop(self, index: int) -> int:
        """GET_VRING_BASE: the backend stops the ring and tells where it stopped."""
        payload = self.send(Request.GET_VRING_BASE, encode_vring_state(index, 0), reply=True)
        assert payload is not None
        num: int = struct.unpack("<II", payload)[1]
        return num

    def kick(self, index: int) -> None:
        os.eventfd_write(self.rings[index].kick, 1)

    def add(self, index: int, out: bytes = b"", in_len: int = 0) -> int:
        """Make a chain available: ``out`` for the device to read, ``in_len`` to write."""
        parts: list[tuple[int, int, int]] = []
        if out:
            off = self.alloc(len(out), 8)
            self.mem[off : off + len(out)] = out
            parts.append((off, len(out), 0))
        if in_len:
            parts.append((self.alloc(in_len, 8), in_len, 2))
        return self.add_chain(index, parts)

    def add_chain(self, index: int, parts: list[tuple[int, int, int]], *, indirect: bool = False) -> int:
        """Make ``parts`` (``(offset, length, flags)`` in this memory; flags 2 = writable)
        available as one chain: ring descriptors, or one indirect table (the table is
        allocated here, and parts may repeat or overlap as a hostile driver's would)."""
        r = self.rings[index]
        entries = [(self.gpa(off), length, flags) for off, length, flags in parts]
        if indirect:
            table = self.alloc(16 * len(parts), 16)
            for i, (addr, length, flags) in enumerate(entries):
                more = i + 1 < len(entries)
                _DESC.pack_into(self.mem, table + 16 * i, addr, length, flags | (1 if more else 0), i + 1 if more else 0)
            entries = [(self.gpa(table), 16 * len(parts), 4)]
        if len(entries) > len(r.free):
            raise RuntimeError("ring full")
        ids = [r.free.pop() for _ in entries]
        for i, (addr, length, flags) in enumerate(entries):
            more = i + 1 < len(entries)
            _DESC.pack_into(self.mem, r.desc + 16 * ids[i], addr, length, flags | (1 if more else 0), ids[i + 1] if more else 0)
        head = ids[0]
        r.buffers[head] = [(off, length) for off, length, _ in parts]
        r.ndesc[head] = len(ids)
        self._mem16[(r.avail + 4) // 2 + r.avail_idx % r.num] = _le16(head)
        r.avail_idx = (r.avail_idx + 1) & 0xFFFF
        self._mem16[(r.avail + 2) // 2] = _le16(r.avail_idx)  # publish after the ring entry
        return head

    def used(self, index: int) -> list[tuple[int, int, bytes]]:
        """Collect used chains: ``(head, len, bytes written into the writable part)``."""
        r = self.rings[index]
        out = []
        idx = _le16(self._mem16[(r.used + 2) // 2])
        while r.last_used != idx:
            head, length = struct.unpack_from("<II", self.mem, r.used + 4 + 8 * (r.last_used % r.num))
            r.last_used = (r.last_used + 1) & 0xFFFF
            parts = r.buffers.pop(head)
            data = b""
            if parts and length:
                off, plen = parts[-1]
                data = bytes(self.mem[off : off + min(length, plen)])
            # give the descriptors back
            n = r.ndesc.pop(head)
            i = head
            for _ in range(n):
                r.free.append(i)
                i = _DESC.unpack_from(self.mem, r.desc + 16 * i)[3]
            out.append((head, length, data))
        if self.features & Feature.RING_EVENT_IDX:
            # Like Linux: ask for an interrupt when the next entry is used.  (A fence is
            # not needed for correctness here: wait_used() polls with a timeout.)
            self._mem16[(r.avail + 4) // 2 + r.num] = _le16(r.last_used)
        return out

    def wait_call(self, index: int, timeout: float = 5.0) -> bool:
        r = self.rings[index]
        ready, _, _ = select.select([r.call], [], [], timeout)
        if ready:
            try:
                os.eventfd_read(r.call)
            except BlockingIOError:
                pass
            return True
        return False

    def wait_used(self, index: int, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int, bytes]]:
        """Wait until ``count`` chains come back on ring ``index``."""
        got: list[tuple[int, int, bytes]] = []
        import time

        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.used(index)
            if len(got) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ring {index}: {len(got)}/{count} chains back")
            self.wait_call(index, min(left, 0.5))
        return got

    def reset_allocator(self, keep: int) -> None:
        self._brk = keep

    def close(self) -> None:
        for r in self.rings.values():
            for fd in (r.kick, r.call):
                if fd >= 0:
                    os.close(fd)
        self.rings.clear()
        self.sock.close()
        self._mem16.release()
        self.mem.close()
        os.close(self.memfd)


class ConsoleDriver:
    """Just enough of Linux's virtio_console driver (MULTIPORT) to move data on ports.

    Port ``p``'s receive ring is 0 for port 0 and ``2p + 2`` otherwise, its transmit ring
    the next one; rings 2 and 3 carry control messages.  Control events from the device
    are collected in :attr:`events` as ``(port, event, value, extra bytes)``.
    """

    DEVICE_READY, DEVICE_ADD, PORT_READY, CONSOLE_PORT, PORT_OPEN, PORT_NAME = 0, 1, 3, 4, 6, 7

    def __init__(self, fe: Frontend, nports: int, *, buf_size: int = 4096, rx_buffers: int = 8) -> None:
        self.fe = fe
        self.nports = nports
        self.buf_size = buf_size
        self.rx_buffers = rx_buffers
        self.events: list[tuple[int, int, int, bytes]] = []

    @staticmethod
    def rx(port: int) -> int:
        return 0 if port == 0 else 2 * port + 2

    def start(self) -> None:
        """Set up every ring, post control buffers and send DEVICE_READY."""
        fe = self.fe
        nrings = 2 * self.nports + 2
        for i in range(nrings):
            fe.setup_ring(i, num=32)
        for _ in range(16):
            fe.add(2, in_len=4096)
        for i in range(nrings):
            fe.set_kick(i)
            fe.enable(i)
        self.send_control(0, self.DEVICE_READY, 1)

    def send_control(self, port: int, event: int, value: int) -> None:
        self.fe.add(3, out=_CONTROL.pack(port, event, value))
        self.fe.kick(3)
        self.fe.wait_used(3, 1)

    def poll(self, want: Callable[[list[tuple[int, int, int, bytes]]], bool], timeout: float = 5.0) -> None:
        """Handle control events (the way Linux does) until ``want(self.events)``."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            for _, length, data in self.fe.used(2):
                port, event, value = _CONTROL.unpack_from(data)
                self.events.append((port, event, value, data[_CONTROL.size:length]))
                self.fe.add(2, in_len=4096)
                self.fe.kick(2)
                self._react(port, event, value)
            if want(self.events):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"control events so far: {self.events}")
            self.fe.wait_call(2, 0.05)

    def _react(self, port: int, event: int, value: int) -> None:
        if event == self.DEVICE_ADD:
            for _ in range(self.rx_buffers):
                self.fe.add(self.rx(port), in_len=self.buf_size)
            self.fe.kick(self.rx(port))
            self.send_control(port, self.PORT_READY, 1)
        elif event == self.CONSOLE_PORT:
            self.send_control(port, self.PORT_OPEN, 1)

    def names(self) -> dict[int, str]:
        """Port names announced so far."""
        return {p: d.decode() for p, e, _, d in self.events if e == self.PORT_NAME}

    def host_open(self, port: int) -> bool:
        """Whether the host side of ``port`` is open, by the last PORT_OPEN for it."""
        state = False
        for p, e, v, _ in self.events:
            if p == port and e == self.PORT_OPEN:
                state = bool(v)
        return state

    def open(self, port: int, is_open: bool = True) -> None:
        """Open (or close) ``port`` from the guest's side."""
        self.send_control(port, self.PORT_OPEN, int(is_open))

    def write(self, port: int, data: bytes, timeout: float = 5.0) -> None:
        """Send ``data`` on ``port``'s transmit ring and wait until the device took it all."""
        tx = self.rx(port) + 1
        for at in range(0, len(data), self.buf_size):
            self.fe.add(tx, out=data[at:at + self.buf_size])
            self.fe.kick(tx)
            self.fe.wait_used(tx, 1, timeout)

    def read(self, port: int, nbytes: int, timeout: float = 5.0) -> bytes:
        """Collect ``nbytes`` from ``port``'s receive ring (reposting buffers as they fill)."""
        import time

        rx = self.rx(port)
        got = bytearray()
        deadline = time.monotonic() + timeout
        while len(got) < nbytes:
            used = self.fe.used(rx)
            for _, length, data in used:
                got += data[:length]
                self.fe.add(rx, in_len=self.buf_size)
            if used:
                self.fe.kick(rx)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port}: {len(got)} of {nbytes} bytes")
            self.fe.wait_call(rx, 0.05)
        return bytes(got)
