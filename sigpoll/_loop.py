"""The asyncio event loop built on the sigpoll poller.

:class:`Loop` is asyncio's Unix selector loop with a :class:`~sigpoll._selector.PollerSelector`
underneath, so every fd it watches (sockets, pipes, the self-pipe, devices) sits in the one
epoll set of a :class:`sigpoll.Poller`.  Everything asyncio offers on Linux (transports, TLS,
subprocesses, signal handlers, executors, sendfile) is inherited unchanged; the loop replaces
only the iteration step (:meth:`Loop._run_once`), which reads the poller directly instead of
going through ``selectors`` objects, and the cross-thread wake-up, which uses the poller's
eventfd instead of a byte through the self-pipe.

Ordinary fds are registered without O_ASYNC signals (they would cost a signal and a signalfd
read per readiness change and buy nothing, since the loop always sleeps in epoll_wait).
Device fds opt in with :meth:`Loop.add_device_reader` / :meth:`Loop.add_device_writer`.

Private asyncio details: every override of a private asyncio method below says which
CPython versions it was checked against; tests/test_asyncio_internals.py pins each one
(a fingerprint of the asyncio code it mirrors, and the names and fields it uses), so a
Python that changes one fails there by name.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import os
import signal as _signal
import socket
import sys
import threading
import warnings
from asyncio import events as _events
from asyncio import format_helpers as _format_helpers
from asyncio import selector_events as _selector_events
from asyncio import unix_events as _unix_events
from collections import deque
from collections.abc import Callable, Coroutine
from selectors import EVENT_READ, EVENT_WRITE
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, Unpack

from ._errors import PollerClosedError, SignalMaskWarning
from ._poller import WAKES_READER, WAKES_WRITER, Counters, FileLike, Poller
from ._selector import PollerSelector
from ._signals import threads_not_blocking

__all__ = ["Loop", "new_event_loop", "run"]
if sys.version_info < (3, 16):
    __all__ += ["EventLoopPolicy", "install"]  # deprecated: see the end of this module

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")

_SIGIO = int(_signal.SIGIO)

# Kept equal to asyncio.base_events so timer housekeeping behaves identically.
_MIN_SCHEDULED_TIMER_HANDLES = 100
_MIN_CANCELLED_TIMER_HANDLES_FRACTION = 0.5
_MAXIMUM_SELECT_TIMEOUT = 24 * 3600

_Handle = asyncio.Handle
_TimerHandle = asyncio.TimerHandle

#: Size of the loop's shared receive buffer: asyncio's own read size for transports.
_RECV_SIZE = 256 * 1024


# asyncio's transport classes are private, so typeshed does not describe them.
_SocketTransportBase: Any = getattr(_selector_events, "_SelectorSocketTransport")
_DatagramTransportBase: Any = getattr(_selector_events, "_SelectorDatagramTransport")
_ReadPipeTransportBase: Any = getattr(_unix_events, "_UnixReadPipeTransport")
_unix_logger: Any = getattr(_unix_events, "logger")


# -- transports ------------------------------------------------------------------------------
#
# asyncio's transports read with sock.recv(256 KiB) / os.read(fd, 256 KiB).  Each such call
# allocates a 256 KiB bytes object (above glibc's mmap threshold: an mmap, page faults and
# an munmap per read) and then shrinks it to the bytes that came.  On this kind of machine
# that allocation costs several times the recv itself.  These subclasses read into one
# buffer per loop and hand the protocol an exact-size copy: the same data, the same
# maximum chunk, the same callbacks and errors, without the big allocation.


class _SocketTransport(_SocketTransportBase):  # type: ignore[misc]
    """asyncio's selector socket transport, reading into the loop's shared buffer."""

    # Replaces _SelectorSocketTransport._read_ready__data_received, reached through the
    # base class's _read_ready_cb (plain protocols; buffered ones keep asyncio's reader).
    # Checked against CPython 3.11.7, 3.12.1, 3.13.0 (the same code in all three).

    def _read_ready__data_received(self) -> None:
        if self._conn_lost:
            return
        size = self.max_size
        rbuf = self._loop._rbuf
        try:
            if size <= _RECV_SIZE:
                n = self._sock.recv_into(rbuf, size)
                data = rbuf[:n].tobytes()
            else:
                data = self._sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not data:
            self._read_ready__on_eof()
            return
        try:
            self._protocol.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")


class _DatagramTransport(_DatagramTransportBase):  # type: ignore[misc]
    """asyncio's selector datagram transport, receiving into the loop's shared buffer."""

    # Replaces _SelectorDatagramTransport._read_ready; checked against 3.11.7, 3.12.1, 3.13.0.

    def _read_ready(self) -> None:
        if self._conn_lost:
            return
        size = self.max_size
        rbuf = self._loop._rbuf
        try:
            if size <= _RECV_SIZE:
                n, addr = self._sock.recvfrom_into(rbuf, size)
                data = rbuf[:n].tobytes()
            else:
                data, addr = self._sock.recvfrom(size)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._protocol.error_received(exc)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on datagram transport")
        else:
            self._protocol.datagram_received(data, addr)


class _ReadPipeTransport(_ReadPipeTransportBase):  # type: ignore[misc]
    """asyncio's read pipe transport (pipes, subprocess output), reading into a shared buffer."""

    # Replaces _UnixReadPipeTransport._read_ready; checked against 3.11.7, 3.12.1, 3.13.0.

    def _read_ready(self) -> None:
        size = self.max_size
        try:
            if size <= _RECV_SIZE:
                rbuf = self._loop._rbuf
                n = os.readv(self._fileno, (rbuf[:size],))
                data = rbuf[:n].tobytes()
            else:
                data = os.read(self._fileno, size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal_error(exc, "Fatal read error on pipe transport")
            return
        if data:
            self._protocol.data_received(data)
            return
        # End of file: the same sequence as asyncio's pipe transport.
        if self._loop.get_debug():
            _unix_logger.info("%r was closed by peer", self)
        self._closing = True
        self._loop._remove_reader(self._fileno)
        self._loop.call_soon(self._protocol.eof_received)
        self._loop.call_soon(self._call_connection_lost, None)


_HandleT = TypeVar("_HandleT", bound=asyncio.Handle)


def _from_caller(handle: _HandleT) -> _HandleT:
    """Drop this module's frames from the end of a debug-mode handle's creation stack.

    asyncio trims its own frames from ``Handle._source_traceback`` (the stack recorded in
    debug mode) so that it ends at the line that scheduled the callback; the overrides
    here add frames of their own on top, which would make ``repr(handle)``, slow-callback
    warnings and "created at" reports point into this file.
    """
    tb = getattr(handle, "_source_traceback", None)
    while tb and tb[-1].filename == __file__:
        del tb[-1]
    return handle


def _new_poller(signal: int | None, busy_poll_us: float) -> Poller:
    # The poller warns about threads that do not block its signals.  That only matters
    # once a device fd sends signals, and a plain loop has none, so the check is
    # deferred to the first add_device_reader/writer (see Loop._check_thread_masks).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SignalMaskWarning)
        return Poller(signal=signal, busy_poll_us=busy_poll_us)


class Loop(asyncio.SelectorEventLoop):
    """An asyncio event loop whose readiness comes from a :class:`sigpoll.Poller`.

    Create it with :func:`new_event_loop` (or ``asyncio.Runner(loop_factory=
    sigpoll.new_event_loop)``).  ``signal`` chooses the poller's real-time hint signal
    (default :data:`sigpoll.DEFAULT_SIGNAL`).  ``busy_poll_us`` turns on the poller's
    adaptive busy polling (:attr:`busy_poll_us`): lower latency for request/reply
    traffic, paid for with a spinning CPU.  It is off by default.

    On top of :class:`asyncio.AbstractEventLoop` it offers the device API:
    :meth:`add_device_reader`, :meth:`add_device_writer`, :meth:`remove_device_reader`,
    :meth:`remove_device_writer` and :meth:`poller_counters`.
    """

    if TYPE_CHECKING:
        # asyncio's private loop state and helpers this class uses (typeshed omits them).
        _selector: PollerSelector | None
        _ready: deque[Any]  # of asyncio.Handle, whose private fields are read here
        _scheduled: list[Any]  # of asyncio.TimerHandle
        _timer_cancelled_count: int
        _stopping: bool
        _debug: bool
        _closed: bool
        _clock_resolution: float
        _csock: socket.socket
        _signal_handlers: dict[int, Any]

        def _check_closed(self) -> None: ...
        def _check_running(self) -> None: ...
        def _check_signal(self, sig: int) -> None: ...
        def _handle_signal(self, sig: int) -> None: ...
        def _ensure_fd_no_transport(self, fd: FileLike) -> None: ...
        def _add_reader(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> asyncio.Handle: ...
        def _add_writer(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> asyncio.Handle: ...

    def __init__(self, *, signal: int | None = None, busy_poll_us: float = 0) -> None:
        poller = _new_poller(signal, busy_poll_us)
        selector = PollerSelector(poller)
        # Bound once: _run_once reads them on every iteration.
        self._poller = poller
        self._poller_wait = poller.wait
        self._fd_to_key = selector._fd_to_key
        self._masks_checked = False
        # One receive buffer for every transport of this loop (see _SocketTransport).
        self._rbuf = memoryview(bytearray(_RECV_SIZE))
        # Signal numbers whose Python-level handler ran since the self-pipe was last drained.
        self._signals_seen: set[int] = set()
        self._wakeup_claimed = False
        super().__init__(selector)

    # -- transports --------------------------------------------------------------------------
    #
    # The three factories asyncio's selector loop calls (private, same signatures in
    # 3.11.7, 3.12.1, 3.13.0), returning the subclasses above.

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        *,
        extra: dict[str, Any] | None = None,
        server: asyncio.AbstractServer | None = None,
    ) -> asyncio.Transport:
        # CPython 3.12+ makes this check in the method replaced here (GH-88968); sigpoll
        # makes it on every version, so a socket never gets a second transport.
        self._ensure_fd_no_transport(sock)
        return _SocketTransport(self, sock, protocol, waiter, extra, server)

    def _make_datagram_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: Any = None,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.DatagramTransport:
        self._ensure_fd_no_transport(sock)  # as in _make_socket_transport
        return _DatagramTransport(self, sock, protocol, address, waiter, extra)

    def _make_read_pipe_transport(
        self,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.ReadTransport:
        return _ReadPipeTransport(self, pipe, protocol, waiter, extra)

    # -- the iteration step ----------------------------------------------------------------

    def _run_once(self) -> None:
        """One iteration: poll for I/O, move due timers to the ready queue, run it.

        Same order and semantics as asyncio.BaseEventLoop._run_once; the difference is
        that readiness comes straight from the poller as (fd, epoll bits) pairs and is
        turned into ready handles in one pass.  Debug mode uses asyncio's own step, so
        slow-callback reporting is exactly asyncio's.  Checked against CPython 3.11.7,
        3.12.1 and 3.13.0 (3.13 only rewrote the timeout clamp, as done here), with the
        Handle/TimerHandle fields it reads (_cancelled, _when, _scheduled, _context,
        _callback, _args) and the loop's _ready, _scheduled, _timer_cancelled_count.
        """
        if self._debug:
            super()._run_once()  # type: ignore[misc]
            return
        handle: Any
        scheduled = self._scheduled
        count = len(scheduled)
        if (
            count > _MIN_SCHEDULED_TIMER_HANDLES
            and self._timer_cancelled_count / count > _MIN_CANCELLED_TIMER_HANDLES_FRACTION
        ):
            # Too many cancelled timers: rebuild the heap without them.
            live = []
            for handle in scheduled:
                if handle._cancelled:
                    handle._scheduled = False
                else:
                    live.append(handle)
            heapq.heapify(live)
            self._scheduled = scheduled = live
            self._timer_cancelled_count = 0
        else:
            while scheduled and scheduled[0]._cancelled:
                self._timer_cancelled_count -= 1
                handle = heapq.heappop(scheduled)
                handle._scheduled = False

        ready = self._ready
        if ready or self._stopping:
            timeout: float | None = 0
        elif scheduled:
            timeout = scheduled[0]._when - self.time()
            if timeout > _MAXIMUM_SELECT_TIMEOUT:
                timeout = _MAXIMUM_SELECT_TIMEOUT
            elif timeout < 0:
                timeout = 0
        else:
            timeout = None

        events: list[tuple[int, int]] | None = self._poller_wait(timeout)
        if events:
            fd_to_key = self._fd_to_key
            for fd, ev in events:
                key = fd_to_key.get(fd)
                if key is None:
                    continue  # unregistered by a callback earlier in this batch
                reader, writer = key.data
                if reader is not None and ev & WAKES_READER:
                    if reader._cancelled:
                        self._remove_reader(key.fileobj)
                    else:
                        ready.append(reader)
                if writer is not None and ev & WAKES_WRITER:
                    if writer._cancelled:
                        self._remove_writer(key.fileobj)
                    else:
                        ready.append(writer)
            events = None

        if scheduled:
            end_time = self.time() + self._clock_resolution
            while scheduled:
                handle = scheduled[0]
                if handle._when >= end_time:
                    break
                heapq.heappop(scheduled)
                handle._scheduled = False
                ready.append(handle)

        # Only what is ready now runs; callbacks scheduled by these wait for the next
        # poll, so I/O cannot be starved by a callback that keeps rescheduling itself.
        popleft = ready.popleft
        for _ in range(len(ready)):
            handle = popleft()
            if handle._cancelled:
                continue
            if type(handle) is _Handle or type(handle) is _TimerHandle:
                # Handle._run inlined: one Python frame less per callback.
                try:
                    handle._context.run(handle._callback, *handle._args)  # type: ignore[attr-defined]
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self._callback_failed(handle, exc)
            else:
                handle._run()
        handle = None  # break the cycle through a failed callback's traceback

    # -- scheduling fast paths -------------------------------------------------------------------
    #
    # Every task step and future callback goes through call_soon, so asyncio's layers
    # (_check_closed, _call_soon, traceback trimming that only applies in debug mode) are
    # folded into one frame here.  Debug mode, a closed loop and bad arguments take
    # asyncio's own path, so their checks and error messages are unchanged.  Checked
    # against call_soon/_call_soon/call_at/call_later of CPython 3.11.7, 3.12.1, 3.13.0.

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        if self._debug or self._closed:
            return _from_caller(super().call_soon(callback, *args, context=context))
        handle = _Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if when is None or self._debug or self._closed:
            return _from_caller(super().call_at(when, callback, *args, context=context))
        timer: Any = _TimerHandle(when, callback, args, self, context)
        heapq.heappush(self._scheduled, timer)
        timer._scheduled = True
        return timer  # type: ignore[no-any-return]

    def call_later(
        self,
        delay: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        if delay is None or self._debug or self._closed:
            return _from_caller(super().call_later(delay, callback, *args, context=context))
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def _callback_failed(self, handle: Any, exc: BaseException) -> None:
        # The report asyncio.Handle._run makes, so exception handlers see the same context
        # (checked against 3.11.7, 3.12.1, 3.13.0).  Only non-debug runs come here, where
        # 3.13's _format_callback_source(debug=False), its default, leaves arguments out
        # as Handle._run does.
        source = _format_helpers._format_callback_source(handle._callback, handle._args)
        context: dict[str, Any] = {
            "message": f"Exception in callback {source}",
            "exception": exc,
            "handle": handle,
        }
        if handle._source_traceback:
            context["source_traceback"] = handle._source_traceback
        self.call_exception_handler(context)

    def _write_to_self(self) -> None:
        # Private hook of the selector loop (3.11.7, 3.12.1, 3.13.0), with no public one.
        # call_soon_threadsafe's wake-up: the poller's eventfd is drained inside the wait,
        # so no callback has to run to empty a self-pipe.  (Signals still come through
        # the self-pipe: signal.set_wakeup_fd needs a socket to write to.)
        try:
            self._poller.wake()
        except (PollerClosedError, OSError):
            pass  # closing or closed: nobody left to wake

    # -- readers and writers ---------------------------------------------------------------

    def _remove_reader(self, fd: FileLike) -> bool:
        removed: bool = super()._remove_reader(fd)  # type: ignore[misc]
        if self._selector is not None and self._selector._device:
            self._drop_device_side(fd, EVENT_READ)
        return removed

    def _remove_writer(self, fd: FileLike) -> bool:
        removed: bool = super()._remove_writer(fd)  # type: ignore[misc]
        if self._selector is not None and self._selector._device:
            self._drop_device_side(fd, EVENT_WRITE)
        return removed

    def _drop_device_side(self, fd: FileLike, direction: int) -> None:
        selector: PollerSelector = self._selector  # type: ignore[assignment]
        try:
            key = selector.get_key(fd)
        except (KeyError, ValueError):
            return  # fully unregistered: the selector forgot the device flag too
        if selector.is_device(key.fd):
            selector.set_device(key.fd, direction, False)

    # -- device API --------------------------------------------------------------------------

    def add_device_reader(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` whenever device ``fd`` is readable.

        Like :meth:`add_reader`, but the fd is registered with O_ASYNC real-time signal
        hints (its O_ASYNC and O_NONBLOCK flags are set until the last device callback on it
        is removed), so a readiness edge the kernel signals before epoll sees it is still
        delivered.  Meant for character devices (ttys, ptys, tun/tap), FIFOs and sockets
        that back a guest's devices.  Raises OSError if the fd cannot deliver signals.
        """
        self._add_device(fd, EVENT_READ, callback, args)

    def add_device_writer(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` whenever device ``fd`` is writable (see add_device_reader)."""
        self._add_device(fd, EVENT_WRITE, callback, args)

    def remove_device_reader(self, fd: FileLike) -> bool:
        """Stop watching device ``fd`` for reading; True if a callback was removed.

        When no device callback is left on the fd, its original flags, signal and owner
        are restored.
        """
        return self._remove_reader(fd)

    def remove_device_writer(self, fd: FileLike) -> bool:
        """Stop watching device ``fd`` for writing; True if a callback was removed."""
        return self._remove_writer(fd)

    def is_device(self, fd: FileLike) -> bool:
        """Whether ``fd`` is currently registered with O_ASYNC signal hints."""
        if self._selector is None:
            return False
        try:
            return self._selector.is_device(fd)
        except ValueError:
            return False

    def poller_counters(self) -> Counters:
        """A snapshot of the loop's poller counters (wake-ups, signals, recovered edges...)."""
        self._check_closed()
        return self._poller.counters

    @property
    def busy_poll_us(self) -> float:
        """Ceiling of the poller's adaptive busy polling, in microseconds (0: off).

        See :attr:`sigpoll.Poller.busy_poll_us`.  It can be changed while the loop runs.
        """
        return self._poller.busy_poll_us

    @busy_poll_us.setter
    def busy_poll_us(self, value: float) -> None:
        self._check_closed()
        self._poller.busy_poll_us = value
        if self.is_running():
            self._claim_wakeup_fd()

    def run_forever(self) -> None:
        # asyncio's own refusals (closed; already running; another loop running in this
        # thread) come first, before this call claims anything: the wake-up fd belongs to
        # the run going on, if any.  They are made here rather than left to super(): from
        # 3.13.0 a refused run_forever() also runs asyncio's cleanup, which unsets the
        # running loop of the run going on (CPython gh-130145).
        self._check_closed()
        self._check_running()
        self._claim_wakeup_fd()
        try:
            super().run_forever()
        finally:
            self._release_wakeup_fd()

    def _claim_wakeup_fd(self) -> None:
        # A pending Python-level signal handler (asyncio.Runner's SIGINT, say) runs once
        # the loop thread is back in the interpreter.  A wait asleep in epoll_wait is
        # interrupted by the signal; a busy-polling one can miss it between two looks and
        # then sleep on, so while it polls the signal must also leave a wake-up byte.
        if (self._wakeup_claimed or not self._poller.busy_poll_us
                or threading.current_thread() is not threading.main_thread()):
            return
        fd = self._csock.fileno()
        old = _signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
        if old == -1:
            self._wakeup_claimed = True
        elif old != fd:
            _signal.set_wakeup_fd(old)  # somebody else's: leave it alone

    def _release_wakeup_fd(self) -> None:
        if self._wakeup_claimed:
            self._wakeup_claimed = False
            if not self._signal_handlers:  # add_signal_handler still needs it otherwise
                _signal.set_wakeup_fd(-1)

    @property
    def poller_signal(self) -> int:
        """The real-time signal that carries the device fds' readiness hints."""
        return self._poller.signal

    def _add_device(
        self, fd: FileLike, direction: int, callback: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._check_closed()
        self._ensure_fd_no_transport(fd)
        self._check_thread_masks()
        selector: PollerSelector = self._selector  # type: ignore[assignment]
        add = self._add_reader if direction == EVENT_READ else self._add_writer
        try:
            selector.get_key(fd)
        except KeyError:
            registered = False
        else:
            registered = True
            # Switch signals on before replacing any callback, so a refusal (a regular
            # file, say) leaves the fd exactly as it was.
            selector.set_device(fd, direction, True)
        add(fd, callback, *args)
        if not registered:
            try:
                selector.set_device(fd, direction, True)
            except BaseException:
                if direction == EVENT_READ:
                    super()._remove_reader(fd)  # type: ignore[misc]
                else:
                    super()._remove_writer(fd)  # type: ignore[misc]
                raise

    def _check_thread_masks(self) -> None:
        # Deferred from the poller's creation (see _new_poller): from here on signals
        # really are sent, so a thread that would take them is worth a warning, once.
        if self._masks_checked:
            return
        self._masks_checked = True
        unblocked = threads_not_blocking(self._poller.signal, _SIGIO)
        if unblocked:
            warnings.warn(
                SignalMaskWarning(
                    f"threads {unblocked} do not block signal {self._poller.signal} and "
                    "SIGIO; create the loop before starting threads, or block them with "
                    "signal.pthread_sigmask in those threads"
                ),
                stacklevel=3,
            )

    # -- signals -----------------------------------------------------------------------------

    def add_signal_handler(
        self, sig: int, callback: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> None:
        """As :meth:`asyncio.AbstractEventLoop.add_signal_handler`.

        The poller's own real-time signal and SIGIO (the kernel's RT-queue overflow
        notice) are read through the poller's signalfd and cannot be handled here:
        RuntimeError.
        """
        self._check_signal(sig)
        if sig == self._poller.signal or sig == _SIGIO:
            raise RuntimeError(
                f"signal {sig} is used by the loop's poller for device readiness hints; "
                "create the loop with another signal= to handle it"
                if sig != _SIGIO
                else "SIGIO is used by the loop's poller (RT signal queue overflow)"
            )
        super().add_signal_handler(sig, callback, *args)
        # Stock asyncio dispatches on the signal numbers written into its self-pipe, so a
        # burst of one signal that fills the pipe drops the byte of any other signal that
        # follows, and that handler never runs.  Here the byte is only a wake-up: the
        # Python-level handler records the number in a set (coalescing, as the kernel does
        # for standard signals) and the loop dispatches from the set once the pipe is
        # drained.  A full pipe already means a wake-up is pending, hence no warning.
        _signal.signal(sig, self._note_signal)
        _signal.set_wakeup_fd(self._csock.fileno(), warn_on_full_buffer=False)

    def _note_signal(self, signum: int, frame: object) -> None:
        self._signals_seen.add(signum)

    # _process_self_data and _read_from_self: private steps of the selector loop's
    # self-pipe reader (the same in 3.11.7, 3.12.1, 3.13.0).

    def _process_self_data(self, data: bytes) -> None:
        pass  # the bytes only woke the loop; _read_from_self dispatches from _signals_seen

    def _read_from_self(self) -> None:
        super()._read_from_self()  # type: ignore[misc]
        if self._signals_seen:
            # Swap first: a signal that lands during dispatch goes into the new set, and its
            # byte (or the still-full pipe) wakes the loop again.
            seen, self._signals_seen = self._signals_seen, set()
            for signum in sorted(seen):
                self._handle_signal(signum)


def new_event_loop(*, busy_poll_us: float = 0) -> Loop:
    """Return a new sigpoll event loop.  This factory is the primary entry point.

    Use it with ``asyncio.Runner(loop_factory=sigpoll.new_event_loop)`` or
    ``asyncio.run(main(), loop_factory=sigpoll.new_event_loop)`` (Python 3.12+), or
    through :func:`run`.  ``busy_poll_us`` is passed to :class:`Loop`.
    """
    return Loop(busy_poll_us=busy_poll_us)


def run(main: Coroutine[Any, Any, _T], *, debug: bool | None = None,
        busy_poll_us: float = 0) -> _T:
    """Run coroutine ``main`` on a new sigpoll loop, like :func:`asyncio.run`, and return its result.

    The loop is created by :func:`new_event_loop` (with ``busy_poll_us``) and closed
    afterwards, together with async generators and the default executor, exactly as
    asyncio.run does.
    """
    def factory() -> Loop:
        return new_event_loop(busy_poll_us=busy_poll_us)

    with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
        return runner.run(main)


# -- the policy: deprecated, kept for code that still goes through asyncio's policies ----------
#
# Nothing in sigpoll itself uses a policy.  asyncio deprecates policies from 3.14 and
# removes them in 3.16; like uvloop's, sigpoll's policy and install() warn from 3.12 (where
# asyncio.run(loop_factory=...) is the replacement) and are not defined from 3.16 on.

_POLICY_DEPRECATED = (
    "asyncio event loop policies are deprecated (from Python 3.14, gone in 3.16); "
    "use sigpoll.run() or asyncio.Runner(loop_factory=sigpoll.new_event_loop)"
)


def _warn_policy(what: str, stacklevel: int) -> None:
    if sys.version_info >= (3, 12):
        warnings.warn(f"{what} is deprecated: {_POLICY_DEPRECATED}", DeprecationWarning,
                      stacklevel=stacklevel + 1)


def _policy_base() -> Any:
    # The Unix default policy, looked up by its private name: from 3.14 the public alias
    # warns on access.  Checked against 3.11, 3.12, 3.13 (_UnixDefaultEventLoopPolicy).
    from asyncio import unix_events

    for name in ("_UnixDefaultEventLoopPolicy", "_DefaultEventLoopPolicy"):
        base = getattr(unix_events, name, None)
        if base is not None:
            return base
    return _events.BaseDefaultEventLoopPolicy  # pragma: no cover


if sys.version_info < (3, 16):

    class EventLoopPolicy(_policy_base()):  # type: ignore[misc]
        """An asyncio event loop policy whose loops are sigpoll :class:`Loop` objects.

        Deprecated (DeprecationWarning from Python 3.12, like uvloop's): asyncio's policies
        are deprecated from 3.14 and removed in 3.16.  Use :func:`run` or
        ``asyncio.Runner(loop_factory=sigpoll.new_event_loop)``.  It remains for code that
        calls ``asyncio.new_event_loop()`` or ``asyncio.get_event_loop()`` and expects a
        sigpoll loop.
        """

        def __init__(self) -> None:
            _warn_policy("sigpoll.EventLoopPolicy", stacklevel=2)
            super().__init__()

        def _loop_factory(self) -> Loop:
            return Loop()

        def __repr__(self) -> str:
            return f"<sigpoll.EventLoopPolicy at {id(self):#x}>"

    def install() -> None:
        """Make :class:`EventLoopPolicy` the current asyncio policy.

        Deprecated along with policies (DeprecationWarning from Python 3.12, like
        ``uvloop.install()``): use :func:`run` or
        ``asyncio.Runner(loop_factory=sigpoll.new_event_loop)`` instead.
        """
        _warn_policy("sigpoll.install()", stacklevel=2)
        with warnings.catch_warnings():
            # One warning is enough: not the policy's, nor asyncio's own on 3.14+.
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(EventLoopPolicy())
