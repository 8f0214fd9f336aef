"""The virtio console device: ports, the control-queue handshake, and port transports.

The device is transport-agnostic: it sees its virtqueues through a :class:`RingAccess`
(the vhost-user backend hands over only rings that are started *and* enabled) and asks it
to interrupt the guest.  Each port appears on the host as a :class:`PortTransport`, an
:class:`asyncio.Transport` with the same surface as :class:`sigpoll.tty.ConsoleTransport`
(write flow control, ``pause_reading``/``resume_reading``, ``connection_lost`` on hang-up,
``get_winsize``/``set_winsize``), so any console consumer -- or a 9p server wanting a byte
stream -- runs on either.

Queues (virtio spec, console device): port 0 uses 0 (receiveq, device to driver) and 1
(transmitq); with MULTIPORT, 2 and 3 are the control receiveq/transmitq and port N >= 1
uses 2N+2 and 2N+3.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import struct
from collections.abc import Callable
from typing import Any, Protocol

from .._transport import FlowControlledTransport
from ._virtqueue import Chain, Virtqueue

__all__ = [
    "F_EMERG_WRITE",
    "F_MULTIPORT",
    "F_SIZE",
    "VIRTIO_ID_CONSOLE",
    "ConsoleDevice",
    "ConsolePort",
    "ControlEvent",
    "PortTransport",
    "ResizeOrder",
    "RingAccess",
    "open_port",
]

log = logging.getLogger("sigpoll.virtio")

VIRTIO_ID_CONSOLE = 3
F_SIZE = 1 << 0
F_MULTIPORT = 1 << 1
F_EMERG_WRITE = 1 << 2

_CONTROL = struct.Struct("<IHH")
_CONFIG = struct.Struct("<HHII")
_SIZE = struct.Struct("<HH")
# Name bytes the guest keeps in a page-sized buffer; a longer name is a host mistake.
MAX_NAME = 255
# Guest output kept for a port nobody on the host has connected to yet; beyond this we stop
# taking buffers from the guest (it waits) rather than drop anything.
UNCONNECTED_BACKLOG = 64 * 1024
# Bytes handed to the protocol per data_received call: fewer calls, bounded latency.
_DELIVER_BATCH = 256 * 1024
# Control messages waiting for the guest to post buffers for them.  Every DEVICE_READY or
# PORT_READY from the guest makes some; a guest that keeps asking and never collects the
# answers would grow this without end, so past it the guest's own control messages wait
# in its ring until it collects.
MAX_CONTROL_BACKLOG = 64 * 1024
# Guest control messages taken per batch before the backlog is looked at again.
_CONTROL_BATCH = 16


class ControlEvent(enum.IntEnum):
    """Control-queue message types (virtio console, MULTIPORT)."""

    DEVICE_READY = 0
    DEVICE_ADD = 1
    DEVICE_REMOVE = 2
    PORT_READY = 3
    CONSOLE_PORT = 4
    RESIZE = 5
    PORT_OPEN = 6
    PORT_NAME = 7


class ResizeOrder(enum.Enum):
    """Field order of the two le16s after a RESIZE control message.

    The virtio spec's ``struct virtio_console_resize`` is ``cols, rows``.  Linux read it as
    ``rows, cols`` until 6.15 (fixed there and in stable kernels).  The guest kernel decides
    which one is right; tests/test_virtio_uml.py settles it for the kernel installed here.
    """

    COLS_ROWS = "cols,rows"
    ROWS_COLS = "rows,cols"

    def pack(self, rows: int, cols: int) -> bytes:
        if self is ResizeOrder.COLS_ROWS:
            return _SIZE.pack(cols, rows)
        return _SIZE.pack(rows, cols)


class RingAccess(Protocol):
    """What the device needs from its transport (the vhost-user backend)."""

    def ring(self, index: int) -> Virtqueue | None:
        """Queue ``index`` if it is started and enabled (usable now), else None."""

    def notify(self, index: int) -> None:
        """Interrupt the guest for queue ``index`` if the guest wants one."""

    def config_changed(self) -> None:
        """Tell the guest the config space changed (if the transport can)."""


class ConsolePort:
    """One port of the console device, as seen from the host."""

    def __init__(self, device: ConsoleDevice, port_id: int, name: str | None, console: bool) -> None:
        self.device = device
        self.id = port_id
        self.name = name
        self.is_console = console
        self.ready = False  # the guest driver has set this port up (PORT_READY)
        self.guest_open = False  # the guest has the port open (PORT_OPEN from the driver)
        self.winsize: tuple[int, int] | None = None  # (rows, cols) last set by the host
        self.transport: PortTransport | None = None
        self._to_guest: collections.deque[memoryview] = collections.deque()
        self.to_guest_len = 0
        self._backlog = bytearray()  # guest output waiting for a host connection
        self.eof_pending = False  # the guest closed; hang up once its ring is drained
        self._open_waiters: list[asyncio.Future[None]] = []

    @property
    def rx_queue(self) -> int:
        """Queue the device fills (host to guest)."""
        return 0 if self.id == 0 else 2 * self.id + 2

    @property
    def tx_queue(self) -> int:
        """Queue the guest fills (guest to host)."""
        return self.rx_queue + 1

    async def wait_guest_open(self) -> None:
        """Wait until the guest has this port open."""
        if self.guest_open:
            return
        fut = asyncio.get_running_loop().create_future()
        self._open_waiters.append(fut)
        await fut

    def connect(self, protocol_factory: Callable[[], asyncio.BaseProtocol]) -> tuple[PortTransport, asyncio.BaseProtocol]:
        """Attach a host-side transport to the port (one at a time).

        The guest is told the host side is open (PORT_OPEN); bytes written before the guest
        opens the port are kept until it does.
        """
        if self.transport is not None and not self.transport.is_closing():
            raise RuntimeError(f"port {self.id} already has a transport")
        loop = asyncio.get_running_loop()
        protocol = protocol_factory()
        transport = PortTransport(loop, self, protocol)
        self.transport = transport
        self.device._host_opened(self)
        return transport, protocol

    def resize(self, rows: int, cols: int) -> None:
        """Set the guest's console size for this port (console ports only)."""
        if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
            raise ValueError(f"window size out of range: {rows}x{cols}")
        self.winsize = (rows, cols)
        self.device._send_resize(self)

    # -- device side --

    def _set_guest_open(self, is_open: bool) -> None:
        was, self.guest_open = self.guest_open, is_open
        if is_open:
            self.eof_pending = False
            for fut in self._open_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._open_waiters.clear()
            self.device._flush_to_guest(self)
        elif was:
            # The guest throws away what it has not read of a closed port, and so do we.
            self._to_guest.clear()
            self.to_guest_len = 0
            if self.transport is not None:
                # What the guest wrote before closing may still be in the transmit ring
                # (the close travels on the control queue, a different ring): the host
                # sees EOF only after those bytes.
                self.eof_pending = True
                self.device._drain_from_guest(self)

    def _queue_to_guest(self, data: memoryview) -> None:
        self._to_guest.append(data)
        self.to_guest_len += len(data)

    def _reset(self) -> None:
        self.ready = False
        self.eof_pending = False
        self._to_guest.clear()
        self.to_guest_len = 0
        self._backlog.clear()
        self.guest_open = False
        if self.transport is not None:
            self.transport._hang_up()

    def __repr__(self) -> str:
        return (f"<ConsolePort {self.id} name={self.name!r} ready={self.ready} "
                f"guest_open={self.guest_open} host={'yes' if self.transport else 'no'}>")


class ConsoleDevice:
    """A virtio console with port 0 as the console and optional named ports.

    ``names`` are the names of ports 1, 2, ...; with any names (or ``multiport=True``) the
    MULTIPORT feature is offered.  ``size`` offers F_SIZE with an initial (rows, cols);
    ``resize_order`` says how RESIZE messages lay out the size (see :class:`ResizeOrder`).
    """

    device_id = VIRTIO_ID_CONSOLE

    def __init__(
        self,
        names: list[str] = (),  # type: ignore[assignment]
        *,
        multiport: bool | None = None,
        size: tuple[int, int] | None = None,
        resize_order: ResizeOrder = ResizeOrder.COLS_ROWS,
        emerg_write: bool = True,
    ) -> None:
        for n in names:
            if not n or len(n.encode()) > MAX_NAME or "\0" in n or "/" in n:
                raise ValueError(f"bad port name {n!r}")
        self.offer_multiport = bool(names) if multiport is None else multiport
        if names and not self.offer_multiport:
            raise ValueError("named ports need MULTIPORT")
        self.ports = [ConsolePort(self, 0, None, True)]
        self.ports += [ConsolePort(self, i + 1, n, False) for i, n in enumerate(names)]
        self.resize_order = resize_order
        self.device_features = (
            (F_MULTIPORT if self.offer_multiport else 0)
            | (F_SIZE if size is not None else 0)
            | (F_EMERG_WRITE if emerg_write else 0)
        )
        if size is not None:
            self.ports[0].winsize = size
        self.acked = 0
        self.rings: RingAccess | None = None
        self._control_out: collections.deque[bytes] = collections.deque()
        self._control_out_bytes = 0
        self._control_held = False  # guest control messages left in its ring for want of room
        self.driver_ready = False
        self.emergency_bytes = 0  #: characters the guest wrote through emerg_wr
        self.emergency_dropped = 0  #: ... and those dropped for want of room on the host side

    # -- the transport's interface --

    @property
    def num_queues(self) -> int:
        return 2 * len(self.ports) + 2 if self.offer_multiport else 2

    @property
    def multiport(self) -> bool:
        return bool(self.acked & F_MULTIPORT)

    def attach(self, rings: RingAccess) -> None:
        self.rings = rings

    def set_features(self, acked: int) -> None:
        self.acked = acked

    def config(self) -> bytes:
        rows, cols = self.ports[0].winsize or (0, 0)
        return _CONFIG.pack(cols, rows, len(self.ports), 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only emerg_wr (offset 8) is writable: the guest writes one character to it.
        if offset == 8 and len(data) >= 1 and self.device_features & F_EMERG_WRITE:
            if not self._accepting(self.ports[0], 0):
                # It bypasses the rings, so it cannot be made to wait: with no room on the
                # host side (a full backlog, a paused reader) it is dropped, and counted.
                self.emergency_dropped += 1
                return
            self.emergency_bytes += 1
            self._from_guest(self.ports[0], bytes(data[:1]))

    def queue_ready(self, index: int) -> None:
        """A ring became usable: scan it (buffers may have been waiting since before)."""
        self.queue_kicked(index)
        if not self.multiport and index in (0, 1):
            # Without MULTIPORT port 0 is open as soon as its queues are.
            self.ports[0].ready = True
            self.ports[0]._set_guest_open(True)

    def queue_kicked(self, index: int) -> None:
        if index == 2 and self.multiport:
            self._flush_control()
        elif index == 3 and self.multiport:
            self._read_control()
        else:
            port = self._port_of_queue(index)
            if port is None:
                return
            if index == port.rx_queue:
                self._flush_to_guest(port)
            else:
                self._drain_from_guest(port)

    def reset(self) -> None:
        """The guest's device went away (reset, reboot, frontend gone)."""
        self.acked = 0
        self.driver_ready = False
        self._control_out.clear()
        self._control_out_bytes = 0
        self._control_held = False
        for port in self.ports:
            port._reset()

    # -- port plumbing --

    def _port_of_queue(self, index: int) -> ConsolePort | None:
        if index in (0, 1):
            return self.ports[0]
        if not self.multiport or index < 4:
            return None
        pid = (index - 2) // 2
        return self.ports[pid] if pid < len(self.ports) else None

    def _notify(self, index: int) -> None:
        if self.rings is not None:
            self.rings.notify(index)

    def _ring(self, index: int) -> Virtqueue | None:
        return self.rings.ring(index) if self.rings is not None else None

    def _flush_to_guest(self, port: ConsolePort) -> None:
        """Copy queued host bytes into the guest's receive buffers."""
        if not port.guest_open or not port._to_guest:
            return
        q = self._ring(port.rx_queue)
        if q is None:
            return
        pushed = False
        pending = port._to_guest
        while pending:
            chain = q.pop()
            if chain is None:
                if q.enable_kicks():
                    continue  # buffers arrived while we looked away
                break
            try:
                while pending:
                    head = pending[0]
                    wrote = chain.fill(head)
                    if wrote == len(head):
                        pending.popleft()
                    else:
                        pending[0] = head[wrote:]
                        break
            finally:
                chain.release()
            n = chain.written
            port.to_guest_len -= n
            if port.transport is not None:
                port.transport.bytes_written += n
            q.push(chain.head, n)
            pushed = True
        if pushed:
            self._notify(port.rx_queue)
        if port.transport is not None:
            port.transport._maybe_resume()
            if not pending:
                port.transport._drained()

    def _drain_from_guest(self, port: ConsolePort) -> None:
        """Take the guest's transmit buffers, as far as the host side lets us."""
        q = self._ring(port.tx_queue)
        exhausted = q is None
        pushed = False
        batch: list[bytes] = []
        size = 0
        while q is not None:
            if not self._accepting(port, size):
                break
            chain = q.pop()
            if chain is None:
                if q.enable_kicks():
                    continue
                exhausted = True
                break
            try:
                data = chain.read_all()
            finally:
                chain.release()
            q.push(chain.head, 0)
            pushed = True
            if data:
                batch.append(data)
                size += len(data)
            if size >= _DELIVER_BATCH:
                # Return the buffers before running host code, so the guest can refill.
                self._notify(port.tx_queue)
                pushed = False
                self._from_guest(port, b"".join(batch))
                batch, size = [], 0
        if pushed:
            self._notify(port.tx_queue)
        if batch:
            self._from_guest(port, b"".join(batch))
        if exhausted and port.eof_pending:
            port.eof_pending = False
            if port.transport is not None:
                port.transport._hang_up()

    def _accepting(self, port: ConsolePort, pending: int) -> bool:
        t = port.transport
        if t is not None and not t.is_closing():
            return t.is_reading()
        return len(port._backlog) + pending < UNCONNECTED_BACKLOG

    def _from_guest(self, port: ConsolePort, data: bytes) -> None:
        t = port.transport
        if t is not None and not t.is_closing():
            t._deliver(data)
        else:
            port._backlog += data

    def _host_opened(self, port: ConsolePort) -> None:
        if port._backlog and port.transport is not None:
            data = bytes(port._backlog)
            port._backlog.clear()
            port.transport._loop.call_soon(port.transport._deliver_later, data)
        if port.ready and self.multiport:
            self._send_control(port.id, ControlEvent.PORT_OPEN, 1)
        # Guest output may have been held back for want of a host reader.
        if port.transport is not None:
            port.transport._loop.call_soon(self._drain_from_guest, port)

    def _host_closed(self, port: ConsolePort) -> None:
        if port.ready and self.multiport:
            self._send_control(port.id, ControlEvent.PORT_OPEN, 0)

    def _send_resize(self, port: ConsolePort) -> None:
        if port.winsize is None or not port.is_console:
            return
        rows, cols = port.winsize
        if self.multiport:
            if port.ready:
                self._send_control(port.id, ControlEvent.RESIZE, 0, self.resize_order.pack(rows, cols))
        elif self.acked & F_SIZE and self.rings is not None:
            self.rings.config_changed()

    # -- control queue --

    def _send_control(self, port_id: int, event: ControlEvent, value: int, extra: bytes = b"") -> None:
        log.debug("control to the guest: port %d event %s value %d", port_id, event.name, value)
        msg = _CONTROL.pack(port_id, event, value) + extra
        self._control_out.append(msg)
        self._control_out_bytes += len(msg)
        self._flush_control()

    def _flush_control(self) -> None:
        q = self._ring(2)
        if q is None:
            return
        pushed = False
        while self._control_out:
            chain = q.pop()
            if chain is None:
                if q.enable_kicks():
                    continue
                break
            msg = self._control_out[0]
            try:
                if chain.writable_len < len(msg):
                    # Linux gives page-sized buffers; a smaller one cannot hold the
                    # message and truncating would corrupt it: return it empty.
                    log.warning("control buffer of %d bytes too small for %d", chain.writable_len, len(msg))
                    n = 0
                else:
                    n = chain.fill(msg)
                    self._control_out.popleft()
                    self._control_out_bytes -= len(msg)
            finally:
                chain.release()
            q.push(chain.head, n)
            pushed = True
        if pushed:
            self._notify(2)
        if self._control_held and self._control_out_bytes < MAX_CONTROL_BACKLOG:
            self._control_held = False
            self._read_control()  # what the guest sent meanwhile is still in its ring

    def _read_control(self) -> None:
        while (q := self._ring(3)) is not None:
            if self._control_out_bytes >= MAX_CONTROL_BACKLOG:
                self._control_held = True  # _flush_control resumes once the guest collects
                return
            msgs = self._take_control(q)
            for m in msgs:
                self._handle_control(m)
            if len(msgs) < _CONTROL_BATCH:
                return

    def _take_control(self, q: Virtqueue) -> list[bytes]:
        """Up to a batch of the guest's control messages, their buffers given back."""
        msgs: list[bytes] = []
        while len(msgs) < _CONTROL_BATCH:
            chain = q.pop()
            if chain is None:
                if q.enable_kicks():
                    continue
                break
            try:
                # A control message is 8 bytes; a longer buffer is not copied beyond them.
                msgs.append(chain.read_all(_CONTROL.size))
            finally:
                chain.release()
            q.push(chain.head, 0)
        if msgs:
            self._notify(3)
        return msgs

    def _handle_control(self, msg: bytes) -> None:
        if len(msg) < _CONTROL.size:
            log.warning("short control message from the guest (%d bytes)", len(msg))
            return
        port_id, event, value = _CONTROL.unpack_from(msg)
        log.debug("control from the guest: port %d event %d value %d", port_id, event, value)
        if event == ControlEvent.DEVICE_READY:
            if value != 1:
                log.warning("guest driver failed to set up the console device")
                return
            self.driver_ready = True
            for port in self.ports:
                self._send_control(port.id, ControlEvent.DEVICE_ADD, 0)
            return
        if port_id >= len(self.ports):
            log.warning("control event %d for unknown port %d", event, port_id)
            return
        port = self.ports[port_id]
        if event == ControlEvent.PORT_READY:
            if value != 1:
                log.warning("guest failed to set up port %d", port_id)
                return
            port.ready = True
            # Port kinds first, then the host's state, the way the driver expects it.
            if port.is_console:
                self._send_control(port.id, ControlEvent.CONSOLE_PORT, 1)
                self._send_resize(port)
            if port.name:
                self._send_control(port.id, ControlEvent.PORT_NAME, 1, port.name.encode())
            if port.transport is not None and not port.transport.is_closing():
                self._send_control(port.id, ControlEvent.PORT_OPEN, 1)
        elif event == ControlEvent.PORT_OPEN:
            port._set_guest_open(bool(value))
        else:
            log.warning("unexpected control event %d from the guest for port %d", event, port_id)


class PortTransport(FlowControlledTransport):
    """A host-side byte stream on one console port.

    ``write`` never blocks and never drops: bytes wait until the guest has the port open and
    has posted receive buffers.  Above the high-water mark ``pause_writing`` is called on
    the protocol, below the low-water mark ``resume_writing``.  ``pause_reading`` stops
    taking buffers from the guest (so the guest's writes wait).  When the guest closes the
    port or the device goes away, the protocol sees ``eof_received`` then
    ``connection_lost(None)``; connect a new transport for the next guest session.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, port: ConsolePort, protocol: asyncio.BaseProtocol,
                 extra: dict[str, Any] | None = None) -> None:
        extra = dict(extra or {})
        extra.setdefault("port_id", port.id)
        extra.setdefault("port_name", port.name)
        super().__init__(loop, protocol, extra)
        self._port = port
        self._reading = True
        self.bytes_read = 0  #: bytes delivered to the protocol so far
        self.bytes_written = 0  #: bytes handed to the guest so far
        self._closed_waiter: asyncio.Future[None] | None = None
        loop.call_soon(protocol.connection_made, self)

    # -- reading --

    def _deliver(self, data: bytes) -> None:
        if self._lost:
            return
        self.bytes_read += len(data)
        try:
            self._protocol.data_received(data)
        except Exception as exc:
            # A failing protocol ends its own transport, as asyncio's transports do; the
            # device, its other ports and the guest's session carry on.
            self._loop.call_exception_handler({
                "message": f"protocol of virtio port {self._port.id} failed in data_received",
                "exception": exc, "transport": self, "protocol": self._protocol,
            })
            self._force_close(exc)

    def _deliver_later(self, data: bytes) -> None:
        self._deliver(data)

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            # Buffers left in the ring while paused are still there; take them now.
            self._loop.call_soon(self._port.device._drain_from_guest, self._port)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # -- writing --

    def write(self, data: bytes | bytearray | memoryview) -> None:
        # Past the hard cap the write is refused whole (WriteBufferFullError), so a writer
        # that ignores pause_writing/drain gets a clear error instead of eating memory.
        if not self._accept_write(data):
            return
        # Our own copy: the caller may reuse its buffer.
        self._port._queue_to_guest(memoryview(bytes(data)))
        self._port.device._flush_to_guest(self._port)
        self._maybe_pause()

    def get_write_buffer_size(self) -> int:
        return 0 if self._lost else self._port.to_guest_len

    # -- closing (the state machine is FlowControlledTransport's; close() waits until the
    # guest has taken what was written, or the port hangs up) --

    def _write_pending(self) -> bool:
        return bool(self._port._to_guest)

    async def wait_closed(self) -> None:
        """Wait until the transport is closed (by either side: a guest close or reset ends it)."""
        if self._lost:
            return
        if self._closed_waiter is None:
            self._closed_waiter = self._loop.create_future()
        await asyncio.shield(self._closed_waiter)

    def _hang_up(self) -> None:
        if self._lost:
            return
        with contextlib.suppress(AttributeError):
            self._protocol.eof_received()
        self._force_close(None)

    def _detach(self) -> None:
        port = self._port
        if port.transport is self:
            port.transport = None
            port._to_guest.clear()
            port.to_guest_len = 0
            port.device._host_closed(port)

    def _release(self) -> None:
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)

    # -- window size --

    def get_winsize(self) -> tuple[int, int]:
        """The size last given to the guest as ``(rows, cols)`` (0, 0 if never set)."""
        return self._port.winsize or (0, 0)

    def set_winsize(self, rows: int, cols: int) -> None:
        self._port.resize(rows, cols)

    def __repr__(self) -> str:
        return f"<PortTransport port={self._port.id} {self._state()} buffered={self.get_write_buffer_size()}>"


async def open_port(port: ConsolePort, *, limit: int = 2**16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A port as asyncio streams (like :func:`sigpoll.tty.open_console`)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = port.connect(lambda: protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer
