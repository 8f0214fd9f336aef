"""Consoles on ttys and ptys: a transport that never loses or stalls output.

A console is a pair of file descriptors (one fd for both directions is fine): a pty master
whose slave a guest opens, a host tty, or the user's own terminal.  :class:`ConsoleTransport`
moves bytes both ways as a real :class:`asyncio.Transport`, with write flow control
(high/low water marks, ``pause_writing``/``resume_writing``) and read backpressure
(``pause_reading``/``resume_reading``).  The fds are watched through a
:class:`sigpoll.DeviceWatcher` (``devices=``, default :func:`sigpoll.device_watcher` of the
loop): sigpoll's loop itself, or the poller :func:`sigpoll.attach` put into stock asyncio or
uvloop, both race-free (O_ASYNC hints plus epoll); on a loop with neither, the loop's
``add_reader``/``add_writer``.

A pty master reports EIO once the last slave fd closes (the guest shut down or rebooted).
That is a clean end for the transport (``connection_lost(None)``); :class:`Pty` can wait for
the slave to be opened again and connect a new transport.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import os
import signal
import struct
import termios
import tty
from collections.abc import Callable, Iterator
from typing import Any

from ._devices import DeviceWatcher, device_watcher
from ._transport import FlowControlledTransport

__all__ = [
    "ConsoleProtocol",
    "ConsoleTransport",
    "Pty",
    "TeeProtocol",
    "connect_console",
    "get_winsize",
    "open_console",
    "open_pty",
    "raw_mode",
    "set_winsize",
    "watch_resize",
]

_READ_SIZE = 65536
# A pty accepts a few KiB per write at best; bigger writes only cost copies of the tail.
_WRITE_LIMIT = 1 << 20


# -- terminal settings ----------------------------------------------------------------------


def get_winsize(fd: int) -> tuple[int, int]:
    """The window size of the tty behind ``fd`` as ``(rows, cols)``."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the tty behind ``fd``; the foreground process gets SIGWINCH."""
    if not (0 <= rows <= 0xFFFF and 0 <= cols <= 0xFFFF):
        raise ValueError(f"window size out of range: {rows}x{cols}")
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# fd -> (termios settings, file status flags) to put back, also from a signal handler.
_saved_modes: dict[int, tuple[list[Any], int]] = {}


def _restore(fd: int, mode: list[Any], flags: int) -> None:
    with contextlib.suppress(OSError, termios.error):
        termios.tcsetattr(fd, termios.TCSAFLUSH, mode)
    # The console transport makes the fd non-blocking; on a terminal that file description
    # is shared with the shell, which must not get it back non-blocking.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _restore_all_modes() -> None:
    for fd, (mode, flags) in list(_saved_modes.items()):
        _restore(fd, mode, flags)
    _saved_modes.clear()


_previous_handlers: dict[int, Any] = {}


def _restore_and_reraise(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP while a terminal is raw: put it back, then die of the signal as usual."""
    _restore_all_modes()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the tty behind ``fd`` in raw mode for the ``with`` block; always restore it.

    The previous settings (and the fd's blocking mode) come back on normal exit, on
    exceptions (KeyboardInterrupt included) and on SIGTERM/SIGHUP, so the user's terminal
    is never left raw.  SIGKILL cannot be caught: ``stty sane`` then.  Not a tty: nothing
    to do.
    """
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    first = not _saved_modes
    _saved_modes[fd] = (saved, flags)
    if first and _is_main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            _previous_handlers[signum] = signal.signal(signum, _restore_and_reraise)
    try:
        tty.setraw(fd)
        yield
    finally:
        _restore(fd, saved, flags)
        _saved_modes.pop(fd, None)
        if not _saved_modes and _is_main_thread():
            for number, previous in list(_previous_handlers.items()):
                signal.signal(number, previous)
            _previous_handlers.clear()


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def watch_resize(
    loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[int, int], object]
) -> Callable[[], None]:
    """Call ``callback(rows, cols)`` whenever the host terminal behind ``fd`` is resized.

    SIGWINCH is turned into resize events through the loop's signal handling (so it is
    safe with respect to the loop).  Returns a function that stops watching.
    """

    def on_winch() -> None:
        with contextlib.suppress(OSError):
            callback(*get_winsize(fd))

    loop.add_signal_handler(signal.SIGWINCH, on_winch)

    def stop() -> None:
        loop.remove_signal_handler(signal.SIGWINCH)

    return stop


# -- ptys -----------------------------------------------------------------------------------


def open_pty(*, rows: int | None = None, cols: int | None = None, raw: bool = True) -> tuple[int, str]:
    """Open a new pty pair; return ``(master_fd, slave_path)`` for a guest to open.

    The slave is set to raw mode (``raw=True``), so bytes pass unchanged both ways, and to
    the given window size.  The slave fd itself is closed again: the guest opens the path.
    Until it does, reads on the master report a hang-up.
    """
    master, slave = os.openpty()
    try:
        path = os.ttyname(slave)
        if raw:
            tty.setraw(slave)
        if rows is not None and cols is not None:
            set_winsize(slave, rows, cols)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_inheritable(master, False)
    return master, path


class Pty:
    """A pty whose master the host keeps, across guests opening and closing the slave.

    ``connect()`` attaches a transport; when the guest closes the slave (shutdown, reboot)
    that transport ends cleanly, and ``wait_for_slave()`` waits until a slave is open again.
    """

    def __init__(self, *, rows: int | None = None, cols: int | None = None) -> None:
        self.master, self.slave_path = open_pty(rows=rows, cols=cols)
        # Holding a slave fd open ourselves makes the master usable before the guest opens
        # it, and keeps the line discipline settings; dropped by hold_slave(False).
        self._held: int | None = None

    def hold_slave(self, hold: bool = True) -> None:
        """Keep a slave fd open on the host side (so writes before the guest opens it work)."""
        if hold and self._held is None:
            self._held = os.open(self.slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        elif not hold and self._held is not None:
            os.close(self._held)
            self._held = None

    def slave_open(self) -> bool:
        """Whether some process has the slave open (POLLHUP clears on the master then)."""
        import select

        p = select.poll()
        p.register(self.master, select.POLLIN)
        return not any(ev & select.POLLHUP for _, ev in p.poll(0))

    async def wait_for_slave(self, interval: float = 0.05, timeout: float | None = None) -> None:
        """Wait until the slave is open again (a rebooted guest reopening its console)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.slave_open():
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"nobody opened {self.slave_path}")
            await asyncio.sleep(interval)

    async def connect(
        self, protocol_factory: Callable[[], asyncio.Protocol], **kwargs: Any
    ) -> tuple[ConsoleTransport, asyncio.Protocol]:
        """Attach a transport to the master (the fd stays the Pty's: closing the transport
        does not close it)."""
        return await connect_console(protocol_factory, self.master, close_fds=False, **kwargs)

    def close(self) -> None:
        self.hold_slave(False)
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def __enter__(self) -> Pty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the transport --------------------------------------------------------------------------


class ConsoleProtocol(asyncio.Protocol):
    """A protocol base for consoles: adds ``resized(rows, cols)``, called on host resizes."""

    def resized(self, rows: int, cols: int) -> None:
        """The console's window size changed."""


class ConsoleTransport(FlowControlledTransport):
    """Bytes both ways over a tty/pty fd pair, with flow control in both directions.

    Reads are delivered with ``protocol.data_received``; a hang-up (EIO or EOF on a pty
    master when the slave side is closed) ends the transport with ``connection_lost(None)``.
    Writes are buffered: ``write`` never blocks and never drops; above the high-water mark
    the protocol's ``pause_writing`` is called, below the low-water mark ``resume_writing``.
    ``devices`` watches the fds (default: :func:`sigpoll.device_watcher` of ``loop``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.Protocol,
        read_fd: int,
        write_fd: int | None = None,
        *,
        close_fds: bool = True,
        extra: dict[str, Any] | None = None,
        devices: DeviceWatcher | None = None,
    ) -> None:
        # Asked once: every fd added to a watcher is removed from the same one.
        self._devices = device_watcher(loop) if devices is None else devices
        extra = dict(extra or {})
        extra.setdefault("read_fd", read_fd)
        extra.setdefault("write_fd", read_fd if write_fd is None else write_fd)
        with contextlib.suppress(OSError):
            extra.setdefault("ttyname", os.ttyname(read_fd))
        super().__init__(loop, protocol, extra)
        self._rfd = read_fd
        self._wfd = read_fd if write_fd is None else write_fd
        self._close_fds = close_fds
        self._buffer: collections.deque[memoryview] = collections.deque()
        self._buffered = 0
        self._reading = True
        self._writer_armed = False
        self.bytes_read = 0  #: bytes delivered to the protocol so far
        self.bytes_written = 0  #: bytes the tty has accepted so far
        self._saved_flags = {fd: fcntl.fcntl(fd, fcntl.F_GETFL) for fd in {self._rfd, self._wfd}}
        for fd in {self._rfd, self._wfd}:
            os.set_blocking(fd, False)
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._start_reading)

    # -- reading --

    def _start_reading(self) -> None:
        if self._reading and not self._closing:
            self._devices.add_device_reader(self._rfd, self._on_readable)

    def _on_readable(self) -> None:
        # Read until EAGAIN: on a device fd a hint means "look now", and edge-style
        # watching must not leave bytes behind.
        for _ in range(16):  # bounded, so one busy console cannot starve the loop
            try:
                data = os.read(self._rfd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.EIO:  # pty master: every slave fd is closed
                    self._hang_up()
                else:
                    self._fatal(exc)
                return
            if not data:
                self._hang_up()
                return
            self.bytes_read += len(data)
            self._protocol.data_received(data)
            if not self._reading or self._closing:
                return

    def _hang_up(self) -> None:
        keep_open = False
        with contextlib.suppress(AttributeError):
            keep_open = bool(self._protocol.eof_received())
        if keep_open:
            self._devices.remove_device_reader(self._rfd)
            self._reading = False
            return
        self._force_close(None)

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            self._devices.remove_device_reader(self._rfd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._devices.add_device_reader(self._rfd, self._on_readable)

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    # -- writing --

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._accept_write(data):
            return
        if not self._buffer:
            # Fast path: try the write now; buffer only what the tty refuses.
            try:
                n = os.write(self._wfd, data[:_WRITE_LIMIT])
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc)
                return
            self.bytes_written += n
            if n == len(data):
                return
            data = memoryview(bytes(data))[n:]
        else:
            data = memoryview(bytes(data))
        self._buffer.append(data)
        self._buffered += len(data)
        self._arm_writer()
        self._maybe_pause()

    def _arm_writer(self) -> None:
        if not self._writer_armed:
            self._writer_armed = True
            self._devices.add_device_writer(self._wfd, self._on_writable)

    def _on_writable(self) -> None:
        while self._buffer:
            chunk = self._buffer[0]
            try:
                n = os.write(self._wfd, chunk[:_WRITE_LIMIT])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fatal(exc)
                return
            self._buffered -= n
            self.bytes_written += n
            if n == len(chunk):
                self._buffer.popleft()
            else:
                self._buffer[0] = chunk[n:]
        if not self._buffer:
            self._writer_armed = False
            self._devices.remove_device_writer(self._wfd)
            self._drained()
        self._maybe_resume()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    # -- closing (the state machine is FlowControlledTransport's) --

    def _write_pending(self) -> bool:
        return bool(self._buffer)

    def _on_close(self) -> None:
        # No more input once close() is asked for; output still drains.
        if self._reading:
            self._devices.remove_device_reader(self._rfd)

    def _fatal(self, exc: Exception) -> None:
        if self._loop.get_debug():
            self._loop.call_exception_handler(
                {"message": "fatal error on console transport", "exception": exc,
                 "transport": self, "protocol": self._protocol}
            )
        self._force_close(exc)

    def _detach(self) -> None:
        with contextlib.suppress(Exception):
            self._devices.remove_device_reader(self._rfd)
        if self._writer_armed:
            with contextlib.suppress(Exception):
                self._devices.remove_device_writer(self._wfd)
            self._writer_armed = False
        self._buffer.clear()
        self._buffered = 0

    def _release(self) -> None:
        for fd, flags in self._saved_flags.items():
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        if self._close_fds:
            for fd in {self._rfd, self._wfd}:
                with contextlib.suppress(OSError):
                    os.close(fd)

    # -- window size --

    def get_winsize(self) -> tuple[int, int]:
        return get_winsize(self._wfd)

    def set_winsize(self, rows: int, cols: int) -> None:
        set_winsize(self._wfd, rows, cols)

    def __repr__(self) -> str:
        return f"<ConsoleTransport fd={self._rfd}/{self._wfd} {self._state()} buffered={self._buffered}>"


class TeeProtocol(asyncio.Protocol):
    """Wraps a protocol and copies every byte received into a log file as well."""

    def __init__(self, inner: asyncio.Protocol, log: Any) -> None:
        self.inner = inner
        self.log = log

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def connect_console(
    protocol_factory: Callable[[], asyncio.Protocol],
    read_fd: int,
    write_fd: int | None = None,
    *,
    close_fds: bool = True,
    tee: Any = None,
    devices: DeviceWatcher | None = None,
) -> tuple[ConsoleTransport, asyncio.Protocol]:
    """Attach a protocol to a console fd pair on the running loop.

    ``tee`` is a binary file object that receives a copy of everything read.  ``devices``
    watches the fds (default: :func:`sigpoll.device_watcher` of the running loop).
    """
    loop = asyncio.get_running_loop()
    protocol = protocol_factory()
    inner = TeeProtocol(protocol, tee) if tee is not None else protocol
    transport = ConsoleTransport(loop, inner, read_fd, write_fd, close_fds=close_fds,
                                 devices=devices)
    return transport, protocol


async def open_console(
    read_fd: int | None = None,
    write_fd: int | None = None,
    *,
    path: str | None = None,
    limit: int = 2**16,
    close_fds: bool = True,
    tee: Any = None,
    devices: DeviceWatcher | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a console as asyncio streams: ``reader, writer = await open_console(fd)``.

    Give an fd (and optionally a separate write fd), or a ``path`` to open (a tty device or
    a pty slave).  The streams are binary-safe; ``writer.drain()`` waits for the tty to take
    what was written (write flow control), and a slow reader of ``reader`` pauses reading
    from the tty (read backpressure).  ``devices`` is as for :func:`connect_console`.
    """
    if path is not None:
        if read_fd is not None:
            raise ValueError("give an fd or a path, not both")
        read_fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        close_fds = True
    if read_fd is None:
        raise ValueError("open_console() needs an fd or a path")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await connect_console(
        lambda: protocol, read_fd, write_fd, close_fds=close_fds, tee=tee, devices=devices
    )
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer
