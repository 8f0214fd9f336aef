"""A vhost-user backend server: one frontend at a time, any number one after another.

The server owns a unix socket; a frontend (UML's virtio_uml, QEMU, the tests' Python
frontend) connects, describes guest memory and rings, and from then on the device moves
data through the rings while the server answers control messages.  Anything malformed
from the frontend ends that connection and resets the device; the server then waits for
the next frontend.

The enable rule (see docs/virtio.md): a ring's kick fd is watched only while the ring is
both started (has a kick fd) and enabled.  A kick that arrives earlier stays in the eventfd
-- never read, so never lost -- and fires as soon as the enable registers the fd; the enable
also scans the avail ring, for buffers the guest made available with no kick we could see.
Whether the frontend waits for our REPLY_ACK or sends the enable fire-and-forget, the
guest's first request is processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol

from .._unixsock import listen_unix, peer_allowed
from ._vhost_user import (
    MAX_CONFIG_SIZE,
    BackendRequest,
    ConfigPayload,
    Feature,
    Message,
    MessageFramer,
    ProtocolError,
    ProtocolFeature,
    Request,
    decode_config,
    decode_mem_table,
    decode_u64,
    decode_vring_addr,
    decode_vring_file,
    decode_vring_state,
    encode_config,
    encode_message,
    encode_u64,
    encode_vring_state,
)
from ._memory import GuestMemory, MemoryFault
from ._virtqueue import Virtqueue

__all__ = ["VhostUserBackend", "VirtioDevice"]

log = logging.getLogger("sigpoll.virtio")

# Most fds any request carries (SET_MEM_TABLE with 8 regions).
_MAX_FDS = 8
_KICK_BYTES = (1).to_bytes(8, "little")


class VirtioDevice(Protocol):
    """What the backend needs from a device (see :class:`~sigpoll.virtio.ConsoleDevice`)."""

    device_id: int
    device_features: int

    @property
    def num_queues(self) -> int: ...
    def attach(self, rings: Any) -> None: ...
    def set_features(self, acked: int) -> None: ...
    def config(self) -> bytes: ...
    def write_config(self, offset: int, data: bytes) -> None: ...
    def queue_ready(self, index: int) -> None: ...
    def queue_kicked(self, index: int) -> None: ...
    def reset(self) -> None: ...


def _watch_reader(loop: asyncio.AbstractEventLoop, fd: int, cb: Any) -> None:
    # On sigpoll's loop a kick eventfd is a device fd; elsewhere a plain reader.
    add = getattr(loop, "add_device_reader", None) or loop.add_reader
    add(fd, cb)


def _unwatch_reader(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    remove = getattr(loop, "remove_device_reader", None) or loop.remove_reader
    remove(fd)


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Outbox:
    """Bytes for a socket the loop must never block on: sent as fast as the peer reads.

    ``send`` tries the socket at once; what it does not take waits here and goes out when
    the socket is writable again.  ``on_drained`` runs when the queue empties; if it has
    not emptied ``timeout`` seconds after it first filled, ``on_stuck`` runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, *,
                 on_error: Callable[[str], None], on_drained: Callable[[], None] = lambda: None,
                 timeout: float | None = None) -> None:
        self._loop, self._sock = loop, sock
        self._on_error, self._on_drained, self._timeout = on_error, on_drained, timeout
        self._buf = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> int:
        return len(self._buf)

    def send(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._on_error(f"socket error: {exc}")
            return
        if sent < len(data):
            self._buf += data[sent:]
            self._loop.add_writer(self._sock.fileno(), self._flush)
            if self._timeout is not None:
                self._timer = self._loop.call_later(self._timeout, self._on_error,
                                                    f"it left replies unread for {self._timeout:g} s")

    def _flush(self) -> None:
        try:
            sent = self._sock.send(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._on_error(f"socket error: {exc}")
            return
        del self._buf[:sent]
        if not self._buf:
            self._stop()
            self._on_drained()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock.fileno() >= 0:
            self._loop.remove_writer(self._sock.fileno())

    def close(self) -> None:
        """Drop what is queued (before the socket closes)."""
        if self._buf:
            self._buf.clear()
            self._stop()


@dataclass
class _Ring:
    """vhost-user state around one virtqueue."""

    queue: Virtqueue
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False  # a kick fd (or "no fd") was given, not stopped since
    enabled: bool = False  # SET_VRING_ENABLE(1)
    watching: bool = False  # kick fd registered with the loop
    kicks: int = 0
    interrupts: int = 0


class _Connection:
    """One frontend's session: its memory, rings and negotiated features."""

    def __init__(self, backend: VhostUserBackend, sock: socket.socket) -> None:
        self.backend = backend
        self.loop = backend.loop
        self.device = backend.device
        self.sock = sock
        self.framer = MessageFramer()
        self.features = 0
        self.protocol_features = 0
        self.memory: GuestMemory | None = None
        self.backend_req: socket.socket | None = None
        self.rings = [_Ring(Virtqueue(i)) for i in range(self.device.num_queues)]
        self.closed = asyncio.get_running_loop().create_future()
        self.messages = 0
        sock.setblocking(False)
        # Replies never block the loop: a frontend that does not read them is not served
        # further requests until it does, and is dropped after backend.reply_timeout.
        self.replies = _Outbox(self.loop, sock, on_error=self.close, on_drained=self._resume_reading,
                               timeout=backend.reply_timeout)
        self.backend_req_out: _Outbox | None = None
        # Written by the C core's SIGBUS guard when the frontend takes its memory away.
        self._memory_gone_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.loop.add_reader(self._memory_gone_fd, self._on_memory_gone)
        self.device.attach(self)
        self._reading = True
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # -- RingAccess, for the device --

    def ring(self, index: int) -> Virtqueue | None:
        if not 0 <= index < len(self.rings):
            return None
        r = self.rings[index]
        return r.queue if r.watching and r.queue.active else None

    def notify(self, index: int) -> None:
        r = self.rings[index]
        if r.call_fd is None or not r.queue.should_notify():
            return
        try:
            os.write(r.call_fd, _KICK_BYTES)
            r.interrupts += 1
        except BlockingIOError:
            pass  # a full pipe (UML) or a saturated eventfd: an interrupt is already pending
        except OSError as exc:
            log.warning("cannot interrupt the guest on queue %d: %s", index, exc)

    def config_changed(self) -> None:
        if self.backend_req_out is None:
            return
        if self.backend_req_out.pending:
            return  # one unread change notice already says it: the frontend reads the whole config
        self.backend_req_out.send(encode_message(BackendRequest.CONFIG_CHANGE_MSG))

    def _backend_req_failed(self, reason: str) -> None:
        log.warning("cannot send a config change to the frontend: %s", reason)

    # -- reading messages --

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded: a chatty frontend must not starve the data path
            if self.closed.done() or not self._reading:
                return
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, self.framer.wanted(), _MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.close(f"socket error: {exc}")
                return
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    _close(fd)
                self.close("too many fds with one message")
                return
            if not data:
                for fd in fds:
                    _close(fd)
                self.close(None)
                return
            try:
                msg = self.framer.feed(data, fds)
                if msg is not None:
                    self.messages += 1
                    self._handle(msg)
            except (ProtocolError, MemoryFault) as exc:
                self.close(f"protocol error: {exc}")
                return
            except OSError as exc:
                self.close(f"error handling a message: {exc}")
                return
            except Exception:
                log.exception("backend failed handling a message")
                self.close("backend error")
                return

    def _reply(self, msg: Message, payload: bytes) -> None:
        self.replies.send(encode_message(msg.request, payload, reply=True))
        if self.replies.pending and self._reading and not self.closed.done():
            # The frontend is not reading: take no more requests (each would add a reply)
            # until it has read these.  Kicks and the data path carry on meanwhile.
            self._reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _resume_reading(self) -> None:
        if not self._reading and not self.closed.done():
            self._reading = True
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_memory_gone(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._memory_gone_fd)
        self.close("it took its memory away under the backend (a memory file shrank: SIGBUS caught)")

    def _handle(self, msg: Message) -> None:
        try:
            # Inside the try: the fds of a request we refuse are closed like any other's.
            try:
                req = Request(msg.request)
            except ValueError:
                raise ProtocolError(f"unknown request {msg.request}") from None
            handler = getattr(self, f"_do_{req.name.lower()}", None)
            if handler is None:
                raise ProtocolError(f"unsupported request {req.name}")
            log.debug("vhost-user %s flags=%#x size=%d fds=%d", req.name, msg.flags, len(msg.payload), len(msg.fds))
            reply = handler(msg)
        finally:
            for fd in msg.fds:  # whatever the handler did not take
                _close(fd)
            msg.fds = []
        if reply is not None:
            self._reply(msg, reply)
        elif msg.need_reply:
            self._reply(msg, encode_u64(0))

    def _take_fd(self, msg: Message, needed: bool = True) -> int | None:
        if not msg.fds:
            if needed:
                raise ProtocolError(f"{msg.name} without its fd")
            return None
        if len(msg.fds) > 1:
            raise ProtocolError(f"{msg.name} with {len(msg.fds)} fds")
        return msg.fds.pop()

    def _ring_of(self, index: int, what: str) -> _Ring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"{what} for ring {index}; the device has {len(self.rings)}")
        return self.rings[index]

    # -- the requests --

    def _offered_features(self) -> int:
        # Plain ints: ``~`` on an IntFlag is bounded to the flag's own bits.
        return int(self.device.device_features) | int(
            Feature.VERSION_1 | Feature.RING_EVENT_IDX | Feature.RING_INDIRECT_DESC | Feature.PROTOCOL_FEATURES)

    def _offered_protocol(self) -> int:
        f = ProtocolFeature.MQ | ProtocolFeature.CONFIG | ProtocolFeature.RESET_DEVICE | ProtocolFeature.BACKEND_REQ
        if self.backend.reply_ack:
            f |= ProtocolFeature.REPLY_ACK
        return int(f)

    def _do_get_features(self, msg: Message) -> bytes:
        return encode_u64(self._offered_features())

    def _do_set_features(self, msg: Message) -> None:
        acked = decode_u64(msg.payload, "features")
        if acked & ~self._offered_features():
            raise ProtocolError(f"frontend acked features we did not offer: {acked & ~self._offered_features():#x}")
        self.features = acked
        for r in self.rings:
            r.queue.event_idx = bool(acked & Feature.RING_EVENT_IDX)
        self.device.set_features(acked & ~int(Feature.PROTOCOL_FEATURES))
        for i in range(len(self.rings)):
            self._update(i)  # without PROTOCOL_FEATURES a started ring is enabled

    def _do_get_protocol_features(self, msg: Message) -> bytes:
        return encode_u64(self._offered_protocol())

    def _do_set_protocol_features(self, msg: Message) -> None:
        acked = decode_u64(msg.payload, "protocol features")
        if acked & ~int(self._offered_protocol()):
            raise ProtocolError(f"frontend acked protocol features we did not offer: {acked:#x}")
        self.protocol_features = acked

    def _do_set_owner(self, msg: Message) -> None:
        return None

    def _do_reset_owner(self, msg: Message) -> None:
        self._reset_device()

    def _do_reset_device(self, msg: Message) -> None:
        self._reset_device()

    def _do_get_queue_num(self, msg: Message) -> bytes:
        return encode_u64(len(self.rings))

    def _do_set_mem_table(self, msg: Message) -> None:
        regions = decode_mem_table(msg.payload, len(msg.fds))
        memory = GuestMemory.map_fds(regions, msg.fds, notify_fd=self._memory_gone_fd,
                                     require_sealed=self.backend.require_sealed_memory)
        for r in self.rings:
            r.queue.deactivate()
        if self.memory is not None:
            self.memory.close()
        self.memory = memory
        log.debug("guest memory: %s", [(hex(g), hex(u), s) for g, u, s in memory.regions])
        for i in range(len(self.rings)):
            self._update(i, reactivate=True)

    def _do_set_vring_num(self, msg: Message) -> None:
        index, num = decode_vring_state(msg.payload)
        self._ring_of(index, "SET_VRING_NUM").queue.set_num(num)

    def _do_set_vring_base(self, msg: Message) -> None:
        index, base = decode_vring_state(msg.payload)
        self._ring_of(index, "SET_VRING_BASE").queue.set_base(base)

    def _do_set_vring_addr(self, msg: Message) -> None:
        addr = decode_vring_addr(msg.payload)
        r = self._ring_of(addr.index, "SET_VRING_ADDR")
        r.queue.set_addr(addr)
        self._update(addr.index, reactivate=True)

    def _do_get_vring_base(self, msg: Message) -> bytes:
        index, _ = decode_vring_state(msg.payload)
        r = self._ring_of(index, "GET_VRING_BASE")
        # Stop the ring: no more kicks read, no more buffers touched, and the base we hand
        # back is where a restarted ring must continue.
        r.started = False
        self._update(index)
        _close(r.kick_fd)
        r.kick_fd = None
        base = r.queue.last_avail
        r.queue.deactivate()
        r.queue.broken = None
        return encode_vring_state(index, base)

    def _do_set_vring_kick(self, msg: Message) -> None:
        index, has_fd = decode_vring_file(msg.payload)
        r = self._ring_of(index, "SET_VRING_KICK")
        fd = self._take_fd(msg, has_fd)
        if r.watching:
            _unwatch_reader(self.loop, r.kick_fd)  # type: ignore[arg-type]
            r.watching = False
        _close(r.kick_fd)
        r.kick_fd = fd
        if fd is not None:
            os.set_blocking(fd, False)
        r.started = True
        self._update(index, reactivate=True)

    def _do_set_vring_call(self, msg: Message) -> None:
        index, has_fd = decode_vring_file(msg.payload)
        r = self._ring_of(index, "SET_VRING_CALL")
        fd = self._take_fd(msg, has_fd)
        _close(r.call_fd)
        if fd is not None:
            # UML's call fd is a pipe's write end: never block on a full pipe.
            os.set_blocking(fd, False)
        r.call_fd = fd

    def _do_set_vring_err(self, msg: Message) -> None:
        index, has_fd = decode_vring_file(msg.payload)
        r = self._ring_of(index, "SET_VRING_ERR")
        fd = self._take_fd(msg, has_fd)
        _close(r.err_fd)
        r.err_fd = fd

    def _do_set_vring_enable(self, msg: Message) -> None:
        index, enable = decode_vring_state(msg.payload)
        r = self._ring_of(index, "SET_VRING_ENABLE")
        if enable not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE with {enable}")
        r.enabled = bool(enable)
        self._update(index)

    def _do_set_backend_req_fd(self, msg: Message) -> None:
        fd = self._take_fd(msg)
        assert fd is not None
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            _close(fd)
            raise ProtocolError("backend request fd is not a socket")
        self._close_backend_req()
        self.backend_req = socket.socket(fileno=fd)
        self.backend_req.setblocking(False)  # the frontend may never read it
        self.backend_req_out = _Outbox(self.loop, self.backend_req, on_error=self._backend_req_failed)

    def _close_backend_req(self) -> None:
        if self.backend_req_out is not None:
            self.backend_req_out.close()
            self.backend_req_out = None
        if self.backend_req is not None:
            self.backend_req.close()
            self.backend_req = None

    def _do_get_config(self, msg: Message) -> bytes:
        cfg = decode_config(msg.payload)
        space = self.device.config().ljust(MAX_CONFIG_SIZE, b"\0")
        return encode_config(ConfigPayload(cfg.offset, cfg.size, cfg.flags, space[cfg.offset : cfg.offset + cfg.size]))

    def _do_set_config(self, msg: Message) -> None:
        cfg = decode_config(msg.payload)
        self.device.write_config(cfg.offset, cfg.data)

    # -- ring state --

    def _effective_enabled(self, r: _Ring) -> bool:
        # Without PROTOCOL_FEATURES a ring is enabled as soon as it is started.
        return r.enabled or not self.features & Feature.PROTOCOL_FEATURES

    def _update(self, index: int, reactivate: bool = False) -> None:
        """Bring ring ``index``'s kick watching in line with its started/enabled state."""
        r = self.rings[index]
        ready = r.started and self._effective_enabled(r) and self.memory is not None and r.queue.addr is not None
        if ready and (reactivate or not r.queue.active) and not r.queue.broken:
            r.queue.activate(self.memory)
        ready = ready and r.queue.active
        if ready and not r.watching:
            if r.kick_fd is not None:
                _watch_reader(self.loop, r.kick_fd, lambda i=index: self._on_kick(i))
            r.watching = True
            # Buffers may be waiting from before the enable -- with or without a kick we
            # could see: look at the avail ring now instead of waiting for the next kick.
            self.device.queue_ready(index)
        elif not ready and r.watching:
            if r.kick_fd is not None:
                # The kick fd is left unread: a kick arriving now stays pending in it.
                _unwatch_reader(self.loop, r.kick_fd)
            r.watching = False
        elif ready and reactivate:
            self.device.queue_ready(index)

    def _on_kick(self, index: int) -> None:
        r = self.rings[index]
        if not r.watching or r.kick_fd is None:
            return
        try:
            while os.read(r.kick_fd, 8):
                r.kicks += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            log.warning("kick fd of ring %d failed: %s", index, exc)
        try:
            self.device.queue_kicked(index)
        except Exception:
            # A device bug must not leave the loop with a half-served ring; drop the
            # session (the device is reset) and serve the next frontend.
            log.exception("device failed on a kick of ring %d", index)
            self.close("device error")

    def _reset_device(self) -> None:
        for i, r in enumerate(self.rings):
            if r.watching and r.kick_fd is not None:
                _unwatch_reader(self.loop, r.kick_fd)
            for fd in (r.kick_fd, r.call_fd, r.err_fd):
                _close(fd)
            q = r.queue
            q.reset()
            q.event_idx = False
            self.rings[i] = _Ring(q)
        self.features = 0
        self.device.reset()
        self.device.attach(self)

    def close(self, reason: str | None) -> None:
        """End the session: everything the frontend gave us is released, the device reset."""
        if self.closed.done():
            return
        if reason:
            log.warning("vhost-user frontend dropped: %s", reason)
        else:
            log.info("vhost-user frontend disconnected")
        self.loop.remove_reader(self.sock.fileno())
        self.replies.close()
        for fd in self.framer.pending_fds():
            _close(fd)
        self._reset_device()
        if self.memory is not None:
            self.memory.close()  # the guard forgets the ranges before the notify fd goes
            self.memory = None
        self.loop.remove_reader(self._memory_gone_fd)
        _close(self._memory_gone_fd)
        self._close_backend_req()
        self.sock.close()
        self.closed.set_result(reason)


class VhostUserBackend:
    """Serves one virtio device over a vhost-user unix socket.

    ``reply_ack=False`` stops offering REPLY_ACK, so frontends send everything
    fire-and-forget (the setting that exposes the enable race).  A frontend that leaves
    replies unread for ``reply_timeout`` seconds is dropped (it gets no further requests
    served meanwhile; the rings keep moving).  ``require_sealed_memory`` refuses memory
    that is not a memfd sealed against shrinking; without it (the default, since UML's
    memory is a plain file) memory that shrinks under the backend drops the frontend.
    """

    def __init__(self, device: VirtioDevice, *, reply_ack: bool = True, reply_timeout: float = 5.0,
                 require_sealed_memory: bool = False) -> None:
        self.device = device
        self.reply_ack = reply_ack
        self.reply_timeout = reply_timeout
        self.require_sealed_memory = require_sealed_memory
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.connection: _Connection | None = None
        self.sessions = 0  #: frontends served so far (finished or current)
        self.dropped: list[str] = []  #: why frontends were disconnected for misbehaving
        self._listener: socket.socket | None = None
        self._connected = asyncio.Event()
        self._stopping = False

    def listen(self, path: str) -> socket.socket:
        """Create the listening socket, mode 0600 (replacing a stale socket file at ``path``;
        any other file there is a :class:`FileExistsError`)."""
        self._listener = listen_unix(path)
        return self._listener

    async def serve(self, path: str | None = None) -> None:
        """Serve frontends one after another until cancelled (or :meth:`stop`)."""
        self.loop = asyncio.get_running_loop()
        if self._listener is None:
            if path is None:
                raise ValueError("serve() needs a path or a prior listen()")
            self.listen(path)
        assert self._listener is not None
        try:
            while not self._stopping:
                conn_sock, _ = await self.loop.sock_accept(self._listener)
                if not peer_allowed(conn_sock):
                    # A frontend hands us memory to map and write: only our own user (or
                    # root) may be one, even if the socket's directory lets others in.
                    log.warning("vhost-user: refused a frontend that is neither this user nor root")
                    conn_sock.close()
                    continue
                self.sessions += 1
                log.info("vhost-user frontend %d connected", self.sessions)
                self.connection = _Connection(self, conn_sock)
                self._connected.set()
                try:
                    reason = await asyncio.shield(self.connection.closed)
                except asyncio.CancelledError:
                    self.connection.close("backend shutting down")
                    raise
                if reason:
                    self.dropped.append(reason)
                self._connected.clear()
                self.connection = None
        finally:
            self._listener.close()
            self._listener = None

    async def wait_connected(self) -> _Connection:
        """Wait for a frontend (tests and tools)."""
        await self._connected.wait()
        assert self.connection is not None
        return self.connection

    def stop(self) -> None:
        self._stopping = True
        if self.connection is not None:
            self.connection.close("backend shutting down")
