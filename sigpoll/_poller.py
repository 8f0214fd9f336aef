"""The Poller: a thin Python face on the C core in csrc/ (see csrc/sigpoll.h)."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import select
import signal as _signal_module
import stat
import warnings
from typing import Protocol, Union

try:
    from ._core import ffi, lib
except ModuleNotFoundError as exc:  # the C core is not built where sigpoll was imported from
    if exc.name != f"{__package__}._core":
        raise
    _here = os.path.dirname(os.path.abspath(__file__))
    # name= the package: `python -m sigpoll.X` then prints this one line, not a traceback.
    raise ImportError(
        f"sigpoll's C core is not built in {_here}"
        + (" (a source checkout, which shadows the installed sigpoll): run from another "
           "directory, or build it here with `pip install -e .`"
           if os.path.exists(os.path.join(_here, os.pardir, "csrc")) else
           ": reinstall sigpoll (`pip install --force-reinstall sigpoll`)"),
        name=__package__,
    ) from None
from ._errors import PollerClosedError, SignalMaskWarning
from ._signals import DEFAULT_SIGNAL, check_signal_free, threads_not_blocking

__all__ = [
    "ERROR",
    "HANGUP",
    "READABLE",
    "WRITABLE",
    "Counters",
    "FileLike",
    "Poller",
    "register_device",
]

READABLE: int = select.EPOLLIN
WRITABLE: int = select.EPOLLOUT
ERROR: int = select.EPOLLERR
HANGUP: int = select.EPOLLHUP

_MAX_TIMEOUT_MS = 2**31 - 1
_SIGIO = int(_signal_module.SIGIO)  # the kernel's fallback when the RT queue overflows
_INTERRUPTED = lib.SP_INTERRUPTED


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


FileLike = Union[int, _HasFileno]


@dataclasses.dataclass(frozen=True, slots=True)
class Counters:
    """What the poller has seen since it was created.

    ``hints_pending`` counts signals for an fd that was not ready yet when checked: the fd
    stayed armed in epoll and its later edge woke a later wait.  ``edges_recovered`` counts
    hinted fds epoll had not reported but a level check found ready: each one is an event
    a poller acting only on epoll_wait(.., 0) after the signal (UML's scheme) would have
    lost or delayed.  ``polled`` counts waits that busy polling answered before the poller
    would have gone to sleep (see :attr:`Poller.busy_poll_us`).
    """

    wakeups: int = 0
    signals: int = 0
    hints_confirmed: int = 0
    hints_pending: int = 0
    edges_recovered: int = 0
    overflows: int = 0
    rescans: int = 0
    polled: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _fd_of(fileobj: FileLike) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


def _describe(fd: int) -> str:
    """A short name for the kind of file behind fd, for error messages."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "closed"
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    try:
        return os.readlink(f"/proc/self/fd/{fd}")  # e.g. anon_inode:[eventfd]
    except OSError:
        return "unknown file type"


# The largest busy-polling ceiling a poller takes, in microseconds (one second).
_MAX_BUSY_POLL_US = 1_000_000


def _busy_poll_ns(value: float) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            0 <= value <= _MAX_BUSY_POLL_US):
        raise ValueError(f"busy_poll_us must be a number from 0 to {_MAX_BUSY_POLL_US}, "
                         f"not {value!r}")
    return round(value * 1000)


class Poller:
    """An epoll set fed by O_ASYNC real-time signals, with a retry step so no edge is lost.

    ``register`` puts an fd in the epoll set and, unless ``signals=False``, turns on
    O_ASYNC|O_NONBLOCK with F_SETSIG set to the poller's real-time signal and the owner
    set to the polling thread.  ``wait`` always sleeps in epoll_wait; queued signals are
    read through a signalfd as hints, and a hinted fd epoll did not report is checked at
    level, so a readiness edge that the kernel signalled before epoll saw it is neither
    lost nor invented.  See docs/design.md.

    The poller's signals are blocked in the creating thread, and in any thread that calls
    ``wait``.  Threads started afterwards inherit the block; threads that already existed
    are checked, and a :class:`SignalMaskWarning` names any that do not block them.
    """

    __slots__ = ("_p", "_buf", "_ints", "_max", "_woken", "_signal", "__weakref__")

    def __init__(
        self,
        *,
        signal: int | None = None,
        max_events: int = 256,
        busy_poll_us: float = 0,
    ) -> None:
        poll_ns = _busy_poll_ns(busy_poll_us)
        if not isinstance(max_events, int) or not 1 <= max_events <= 65536:
            raise ValueError(f"max_events must be an int from 1 to 65536, not {max_events!r}")
        signo = DEFAULT_SIGNAL if signal is None else int(signal)
        check_signal_free(signo)
        out = ffi.new("sp_poller **")
        rc = lib.sp_poller_new(signo, max_events, out)
        if rc < 0:
            raise OSError(-rc, f"cannot create poller: {os.strerror(-rc)}")
        self._p = ffi.gc(out[0], lib.sp_poller_free)
        self._signal: int = int(lib.sp_poller_signal(self._p))
        self._max = max_events
        self._buf = ffi.new("sp_event[]", max_events)
        # One view of the event buffer as flat (fd, events) pairs: wait() slices it into
        # tuples without touching cffi struct fields one at a time.
        self._ints = memoryview(ffi.buffer(self._buf)).cast("I")
        self._woken = ffi.new("uint32_t *")
        # CPython runs signal handlers only when control returns to the interpreter, so the
        # core hands an EINTR back here and wait() restarts after they ran (PEP 475's way).
        lib.sp_poller_set_options(self._p, lib.SP_RETURN_ON_EINTR)
        lib.sp_poller_set_busy_poll(self._p, poll_ns)
        unblocked = threads_not_blocking(self._signal, _SIGIO)
        if unblocked:
            warnings.warn(
                SignalMaskWarning(
                    f"threads {unblocked} do not block signal {self._signal} and SIGIO; "
                    "create the Poller before starting threads, or call "
                    "signal.pthread_sigmask(signal.SIG_BLOCK, {...}) in them"
                ),
                stacklevel=2,
            )

    # -- properties ----------------------------------------------------------------------

    @property
    def signal(self) -> int:
        """The signal that carries readiness hints."""
        return self._signal

    @property
    def closed(self) -> bool:
        return bool(lib.sp_poller_fileno(self._p) < 0)

    @property
    def counters(self) -> Counters:
        """A snapshot of the poller's counters."""
        c = ffi.new("sp_counters *")
        lib.sp_poller_counters(self._p, c)
        return Counters(
            c.wakeups, c.signals, c.hints_confirmed, c.hints_pending,
            c.edges_recovered, c.overflows, c.rescans, c.polled,
        )

    @property
    def busy_poll_us(self) -> float:
        """Ceiling of adaptive busy polling in microseconds (0, the default: off).

        When set, a wait first looks at the epoll set without sleeping, for a budget that
        adapts between 0 and this ceiling: it grows while events keep arriving sooner
        than the ceiling, and drops to 0 after a longer gap, so an idle poller sleeps at
        once.  Waking a sleeping thread costs tens of microseconds on a virtual machine;
        a request/reply peer that answers within the budget avoids that cost, and the
        CPU spins meanwhile.
        """
        return int(lib.sp_poller_busy_poll(self._p)) / 1000

    @busy_poll_us.setter
    def busy_poll_us(self, value: float) -> None:
        lib.sp_poller_set_busy_poll(self._p, _busy_poll_ns(value))

    def fileno(self) -> int:
        """The epoll fd.  It is pollable, so the poller can nest inside another event loop."""
        fd = lib.sp_poller_fileno(self._p)
        if fd < 0:
            raise PollerClosedError("the poller is closed")
        return int(fd)

    def __len__(self) -> int:
        return int(lib.sp_poller_count(self._p))

    def __contains__(self, fileobj: FileLike) -> bool:
        return bool(lib.sp_poller_lookup(self._p, _fd_of(fileobj), ffi.NULL, ffi.NULL))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} fds"
        return f"<sigpoll.Poller signal={self._signal} {state}>"

    # -- registration --------------------------------------------------------------------

    def register(
        self, fileobj: FileLike, events: int, *, edge: bool = False, signals: bool = True
    ) -> None:
        """Watch ``fileobj`` for ``events`` (READABLE, WRITABLE, ...).

        ``edge=True`` registers it edge-triggered.  ``signals=False`` leaves O_ASYNC off
        and uses epoll alone, for fds (sockets, pipes) where a signal adds only cost.
        Raises FileExistsError if the fd is already registered, OSError naming the fd if
        it is not open or cannot be polled or signal-driven; nothing is changed then.
        """
        fd = _fd_of(fileobj)
        flags = (lib.SP_EDGE if edge else 0) | (0 if signals else lib.SP_NO_SIGNAL)
        rc = lib.sp_poller_register(self._p, fd, _check_events(events), flags)
        if rc < 0:
            raise self._registration_error(-rc, fd)

    def modify(self, fileobj: FileLike, events: int, *, edge: bool | None = None) -> None:
        """Change the events (and optionally edge/level) an fd is watched for."""
        fd = _fd_of(fileobj)
        old = ffi.new("uint32_t *")
        if not lib.sp_poller_lookup(self._p, fd, ffi.NULL, old):
            self._raise_if_closed()
            raise KeyError(f"fd {fd} is not registered")
        if edge is None:
            edge = bool(old[0] & lib.SP_EDGE)
        rc = lib.sp_poller_modify(self._p, fd, _check_events(events), lib.SP_EDGE if edge else 0)
        if rc < 0:
            raise self._registration_error(-rc, fd)

    def unregister(self, fileobj: FileLike) -> None:
        """Stop watching an fd and restore its file status flags, signal and owner.

        An fd the caller already closed is simply forgotten.
        """
        fd = _fd_of(fileobj)
        rc = lib.sp_poller_unregister(self._p, fd)
        if rc < 0:
            raise self._registration_error(-rc, fd)

    # -- waiting -------------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> list[tuple[int, int]]:
        """Wait for readiness; return ``[(fd, events), ...]`` (empty on timeout or wake).

        ``timeout`` is in seconds; None waits until an event or :meth:`wake`.  A signal
        that interrupts the wait restarts it internally; a poller closed by another
        thread raises :class:`PollerClosedError`.
        """
        if timeout is None:
            ms = -1
        elif timeout <= 0:
            ms = 0
        else:
            ms = min(math.ceil(timeout * 1000), _MAX_TIMEOUT_MS)
        while True:
            n = lib.sp_poller_wait(self._p, ms, self._buf, self._max, self._woken)
            if n == 1:  # the common case, without building slices
                ints = self._ints
                return [(ints[0], ints[1])]
            if n > 1:
                it = iter(self._ints[: 2 * n].tolist())
                return list(zip(it, it))
            if n == 0:
                if not self._woken[0] & _INTERRUPTED:
                    return []
                # A signal arrived: its Python handler has run by now (and may have
                # raised, e.g. KeyboardInterrupt).  Restart with the time that is left.
                ms = lib.sp_poller_remaining_ms(self._p)
                continue
            if n == -errno.ESHUTDOWN:
                raise PollerClosedError("the poller was closed")
            if n == -errno.EBUSY:
                raise RuntimeError("another thread is already waiting on this poller")
            raise OSError(-n, f"poller wait failed: {os.strerror(-n)}")

    def wake(self) -> None:
        """Make a current or the next :meth:`wait` return at once.  Thread-safe."""
        rc = lib.sp_poller_wake(self._p)
        if rc < 0 and rc != -errno.ESHUTDOWN:
            raise OSError(-rc, os.strerror(-rc))

    def close(self) -> None:
        """Unregister every fd (restoring its flags) and release the poller's own fds.

        A thread blocked in :meth:`wait` is woken and gets :class:`PollerClosedError`.
        Closing twice is harmless.
        """
        lib.sp_poller_close(self._p)

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- errors --------------------------------------------------------------------------

    def _raise_if_closed(self) -> None:
        if self.closed:
            raise PollerClosedError("the poller is closed")

    def _registration_error(self, code: int, fd: int) -> Exception:
        if code == errno.ESHUTDOWN:
            return PollerClosedError("the poller is closed")
        if code == errno.ENOENT:
            return KeyError(f"fd {fd} is not registered")
        if code == errno.EEXIST:
            return FileExistsError(code, f"fd {fd} is already registered")
        if code == errno.EBADF:
            return OSError(code, f"fd {fd} is not an open file descriptor")
        if code == errno.EPERM:
            return OSError(code, f"fd {fd} ({_describe(fd)}) cannot be polled: epoll refuses it")
        if code == errno.EOPNOTSUPP:
            return OSError(
                code,
                f"fd {fd} ({_describe(fd)}) does not support O_ASYNC signal-driven I/O; "
                "register it with signals=False to watch it through epoll alone",
            )
        return OSError(code, f"fd {fd}: {os.strerror(code)}")


def _check_events(events: int) -> int:
    if not isinstance(events, int) or events < 0 or events > 0xFFFFFFFF:
        raise ValueError(f"invalid events mask: {events!r}")
    return events


def register_device(poller: Poller, fd: int, events: int) -> bool:
    """Register a device fd with O_ASYNC hints where its driver can send them.

    Returns True with signals on; False for an fd whose driver has no fasync (an eventfd, a
    timerfd), which is then watched through epoll alone: such readiness reaches epoll
    directly, with no signal-first ordering to race against.  Any other refusal is raised.
    """
    try:
        poller.register(fd, events, signals=True)
        return True
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
    poller.register(fd, events, signals=False)
    return False
