"""One writer per mode, and the ttys they write into.

Every writer does the same thing, the way UML's console does: write the xxd dump of an
endless zero stream into a tty until EAGAIN, then wait for the tty to become writable
again.  Only the waiting differs:

- ``sigpoll``: a :class:`sigpoll.Poller`, the tty registered for WRITABLE, edge-triggered.
- ``naive``: User-Mode Linux's own scheme (:class:`NaivePoller`: SIGIO, sleep until it
  arrives, then ``epoll_wait(.., 0)`` once), edge-triggered, with no retry step.
  In both, a wait that comes back empty after ~1 s counts as "the user pressed a key" and
  the write is tried again: that is how UML's console gets going again after the race ate
  its wakeup, and it keeps the tool measuring instead of hanging.
- ``asyncio``/``uvloop``: a stock event loop with ``loop.add_writer`` (level-triggered,
  no signals), as a baseline.

The target is either the user's own terminal (fd 1) or a fresh pty whose master is
drained by a reader in a separate process, paced like a terminal emulator so the writer
keeps hitting EAGAIN.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import fcntl
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import sigpoll

from .xxd import ZeroStream

__all__ = [
    "MODES",
    "NUDGE_SECONDS",
    "HintCounts",
    "LoopWriter",
    "NaivePoller",
    "NaiveWriter",
    "PollerWriter",
    "Target",
    "Writer",
    "WriterStats",
    "make_writer",
    "open_pty",
    "open_terminal",
    "reader_main",
    "uvloop_missing",
]

#: Every mode, in the order ``--compare`` runs them.
MODES: tuple[str, ...] = ("sigpoll", "naive", "asyncio", "uvloop")

#: An empty wait this long is taken as a keypress (see the module docstring).
NUDGE_SECONDS = 1.0

# Largest single write: big enough that a fast terminal costs few syscalls, small enough
# that a --bytes limit or the deadline is checked often.
_MAX_WRITE = 1 << 20


def uvloop_missing() -> str | None:
    """Why uvloop mode cannot run here, or None if it can."""
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        return f"uvloop is not importable ({exc}); pip install uvloop"
    return None


class HintCounts(NamedTuple):
    """The poller counters the report shows (all zero for the event-loop modes)."""

    sigios: int = 0
    hints: int = 0
    recovered: int = 0


@dataclasses.dataclass
class WriterStats:
    """What a writer did.  Plain attributes: the watchdog and progress line read them from
    other threads, and single attribute reads and writes are atomic under the GIL."""

    bytes: int = 0
    writes: int = 0
    eagains: int = 0
    nudges: int = 0
    started: float = 0.0
    ended: float = 0.0
    last_write: float = 0.0
    running: bool = False
    ends_with_newline: bool = True

    def begin(self) -> None:
        """Mark the start of the measured run."""
        now = time.monotonic()
        self.started = self.last_write = now
        self.running = True

    def finish(self) -> None:
        """Mark the end of the measured run (idempotent)."""
        if self.running:
            self.ended = time.monotonic()
            self.running = False

    @property
    def elapsed(self) -> float:
        """Seconds the run took so far (or in all, once finished)."""
        if not self.started:
            return 0.0
        return (self.ended or time.monotonic()) - self.started


class _Source:
    """The endless zero dump, cut off after ``limit`` bytes if one is given."""

    __slots__ = ("_stream", "_view", "_left")

    def __init__(self, limit: int | None) -> None:
        self._stream = ZeroStream()
        self._view = memoryview(b"")
        self._left = math.inf if limit is None else limit

    def pending(self) -> memoryview | None:
        """The next bytes to write, or None once the limit is reached."""
        if self._left <= 0:
            return None
        if not self._view:
            self._view = memoryview(next(self._stream))
        view = self._view[:_MAX_WRITE]
        if len(view) > self._left:
            view = view[: int(self._left)]
        return view

    def advance(self, n: int) -> None:
        """Drop ``n`` bytes that were written."""
        self._view = self._view[n:]
        self._left -= n


class Writer(abc.ABC):
    """A writer for one mode.  Lifecycle, all from the main thread unless noted:
    ``prepare()`` before any helper thread starts, ``run()`` in the writer thread,
    ``stop()`` from anywhere, ``close()`` after the writer thread has ended."""

    mode: str

    def __init__(self, fd: int, *, seconds: float | None, limit: int | None) -> None:
        self.fd = fd
        self.seconds = seconds
        self.stats = WriterStats()
        self.error: str | None = None
        self._source = _Source(limit)
        self._stopping = False
        self._saved_flags: int | None = None

    def prepare(self) -> None:
        """Remember the fd's flags; subclasses then set up their poller or loop."""
        self._saved_flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        # Format the first chunk now: the first one ever also builds the dump template
        # (a few ms), which would otherwise come out of the first mode's measured time.
        self._source.pending()

    def run(self) -> None:
        """The writer thread's body: never raises, records the error instead."""
        try:
            self._run()
        except Exception as exc:  # reported in the summary; the thread must not die loudly
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.stats.finish()

    @abc.abstractmethod
    def _run(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask the writer to stop soon.  Thread-safe, and safe in a Python signal handler."""

    def hint_counts(self) -> HintCounts:
        """The poller's counters as the report wants them."""
        return HintCounts()

    def close(self) -> None:
        """Put the fd's file status flags back as they were before ``prepare()``.

        Never leave a user's terminal non-blocking: the shell that gets it back would see
        EAGAIN on its own reads and writes.
        """
        if self._saved_flags is not None:
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self._saved_flags)
            except OSError:
                pass  # the fd is gone: nothing left to restore
            self._saved_flags = None

    def _deadline(self) -> float:
        return math.inf if self.seconds is None else self.stats.started + self.seconds

    def _write_and_wait(self, wait: Callable[[float], list[tuple[int, int]]]) -> None:
        """The run of the waiting modes: write until EAGAIN, then ``wait`` for an edge.

        The tty is registered edge-triggered, and the next edge only comes after EAGAIN,
        so every burst writes until then.  A wait that comes back empty while output is
        owed, a whole second, is the "keypress" of the module docstring."""
        st = self.stats
        st.begin()
        deadline = self._deadline()
        while not self._stopping:
            if not self._write_burst(deadline):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            events = wait(min(NUDGE_SECONDS, remaining))
            if not events and not self._stopping and time.monotonic() < deadline:
                st.nudges += 1

    def _write_burst(self, deadline: float) -> bool:
        """Write until EAGAIN (True: wait for writability and come back) or until the
        source, the time or the run is over (False: stop)."""
        st = self.stats
        src = self._source
        while True:
            view = src.pending()
            if view is None:
                return False
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                n = 0
            if n <= 0:
                st.eagains += 1
                return True
            now = time.monotonic()
            src.advance(n)
            st.bytes += n
            st.writes += 1
            st.last_write = now
            st.ends_with_newline = view[n - 1] == 0x0A
            if now >= deadline or self._stopping:
                return False


class PollerWriter(Writer):
    """The sigpoll mode: a :class:`sigpoll.Poller`, WRITABLE, edge-triggered."""

    mode = "sigpoll"

    def __init__(self, fd: int, *, seconds: float | None, limit: int | None) -> None:
        super().__init__(fd, seconds=seconds, limit=limit)
        self._poller: sigpoll.Poller | None = None
        self._final = HintCounts()

    def prepare(self) -> None:
        """Create the poller here, in the main thread, before the watchdog and writer
        threads start: they inherit the signal mask the poller sets up in this thread."""
        super().prepare()
        self._poller = sigpoll.Poller()
        self._poller.register(self.fd, sigpoll.WRITABLE, edge=True)

    def _run(self) -> None:
        assert self._poller is not None, "prepare() first"
        self._write_and_wait(self._poller.wait)

    def stop(self) -> None:
        self._stopping = True
        poller = self._poller
        if poller is not None and not poller.closed:
            poller.wake()

    def hint_counts(self) -> HintCounts:
        poller = self._poller
        if poller is None or poller.closed:
            return self._final
        c = poller.counters
        return HintCounts(c.signals, c.hints_confirmed + c.hints_pending + c.edges_recovered, c.edges_recovered)

    def close(self) -> None:
        """Unregister (which restores the fd's flags, signal and owner) and close."""
        poller = self._poller
        if poller is not None:
            self._final = self.hint_counts()
            try:
                if not poller.closed and self.fd in poller:
                    poller.unregister(self.fd)
            finally:
                poller.close()
        super().close()


# fcntl.h values Python's fcntl module does not name.
_F_SETSIG, _F_GETSIG, _F_SETOWN_EX, _F_GETOWN_EX = 10, 11, 15, 16


class NaivePoller:
    """User-Mode Linux's scheme, on ``select.epoll`` and ``signal.sigtimedwait``.

    As UML's console does (arch/um/os-Linux/file.c, irq.c): the tty gets O_ASYNC with
    F_SETSIG=SIGIO and the process as owner, and is registered edge-triggered; a wait
    sleeps until SIGIO arrives and then asks epoll, with a zero timeout, once.  It misses
    the edges the kernel signals before epoll has them (docs/design.md): that is the point.
    SIGIO must be blocked in every thread (it is, from the constructor on, in this one and
    the threads it starts), or a thread without it blocked takes the signal and dies of it.
    """

    def __init__(self, fd: int, events: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGIO})
        self.fd = fd
        self.signals = 0
        self._woken = False
        self._saved = (fcntl.fcntl(fd, fcntl.F_GETFL), fcntl.fcntl(fd, _F_GETSIG),
                       fcntl.fcntl(fd, _F_GETOWN_EX, bytes(8)))
        self._epoll = select.epoll()
        self._epoll.register(fd, events | select.EPOLLET)
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGIO)
        fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, self._saved[0] | os.O_ASYNC | os.O_NONBLOCK)

    def wait(self, timeout: float) -> list[tuple[int, int]]:
        """Sleep until SIGIO, then look at epoll once, without waiting; if it has nothing,
        sleep until the next SIGIO (UML's loop).  Empty after ``timeout`` or a wake."""
        deadline = time.monotonic() + timeout
        while not self._woken:
            left = deadline - time.monotonic()
            if left <= 0 or signal.sigtimedwait({signal.SIGIO}, left) is None:
                break
            self.signals += 1
            events = self._epoll.poll(0)
            if events:
                return events
        self._woken = False
        return []

    def wake(self) -> None:
        """End a wait now (from any thread): a SIGIO, which is how UML is woken too."""
        self._woken = True
        os.kill(os.getpid(), signal.SIGIO)

    def close(self) -> None:
        """Unregister and put the fd's flags, signal and owner back."""
        with contextlib.suppress(OSError):
            self._epoll.unregister(self.fd)
        self._epoll.close()
        fl, sig, owner = self._saved
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fl)
            fcntl.fcntl(self.fd, _F_SETSIG, sig)
            fcntl.fcntl(self.fd, _F_SETOWN_EX, owner)


class NaiveWriter(Writer):
    """The naive mode: :class:`NaivePoller`, WRITABLE, edge-triggered, no retry step."""

    mode = "naive"

    def __init__(self, fd: int, *, seconds: float | None, limit: int | None) -> None:
        super().__init__(fd, seconds=seconds, limit=limit)
        self._poller: NaivePoller | None = None
        self._signals = 0

    def prepare(self) -> None:
        """Block SIGIO here, in the main thread, before the other threads start."""
        super().prepare()
        self._poller = NaivePoller(self.fd, select.EPOLLOUT)

    def _run(self) -> None:
        assert self._poller is not None, "prepare() first"
        self._write_and_wait(self._poller.wait)

    def stop(self) -> None:
        self._stopping = True
        if self._poller is not None:
            self._poller.wake()

    def hint_counts(self) -> HintCounts:
        if self._poller is not None:
            self._signals = self._poller.signals
        return HintCounts(self._signals)

    def close(self) -> None:
        if self._poller is not None:
            self._signals = self._poller.signals
            self._poller.close()
            self._poller = None
        super().close()


class LoopWriter(Writer):
    """The asyncio and uvloop modes: ``loop.add_writer`` on a stock event loop."""

    def __init__(
        self,
        fd: int,
        mode: str,
        factory: Callable[[], asyncio.AbstractEventLoop],
        *,
        seconds: float | None,
        limit: int | None,
    ) -> None:
        super().__init__(fd, seconds=seconds, limit=limit)
        self.mode = mode
        self._factory = factory
        self._loop: asyncio.AbstractEventLoop | None = None
        # Re-entrant: stop() may run from a signal handler that interrupted stop().
        self._lock = threading.RLock()

    def prepare(self) -> None:
        """Save the flags, then make the fd non-blocking (the loop does not do that)."""
        super().prepare()
        os.set_blocking(self.fd, False)

    def _run(self) -> None:
        loop = self._factory()
        with self._lock:
            self._loop = loop
            stopping = self._stopping
        try:
            if not stopping:
                self._serve(loop)
        finally:
            with self._lock:
                self._loop = None
            loop.close()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = self.fd
        st = self.stats
        st.begin()
        deadline = self._deadline()

        def on_writable() -> None:
            try:
                if not self._write_burst(deadline):
                    loop.stop()
                    return
            except OSError as exc:
                # The loop would only log this; the summary should show it.
                self.error = f"{type(exc).__name__}: {exc}"
                loop.stop()

        loop.add_writer(fd, on_writable)
        try:
            if deadline != math.inf:
                loop.call_later(max(0.0, deadline - time.monotonic()), loop.stop)
            loop.run_forever()
        finally:
            st.finish()
            loop.remove_writer(fd)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(loop.stop)


def make_writer(mode: str, fd: int, *, seconds: float | None, limit: int | None) -> Writer:
    """The writer for ``mode`` on ``fd``: stops after ``seconds`` or ``limit`` bytes."""
    if mode == "sigpoll":
        return PollerWriter(fd, seconds=seconds, limit=limit)
    if mode == "naive":
        return NaiveWriter(fd, seconds=seconds, limit=limit)
    if mode == "asyncio":
        return LoopWriter(fd, mode, asyncio.new_event_loop, seconds=seconds, limit=limit)
    if mode == "uvloop":
        import uvloop

        return LoopWriter(fd, mode, uvloop.new_event_loop, seconds=seconds, limit=limit)
    raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


# -- targets -----------------------------------------------------------------------------


class Target:
    """The tty a run writes into: fd 1 (the user's terminal) or a fresh pty's slave."""

    def __init__(self, fd: int, description: str, reader: subprocess.Popen[bytes] | None = None) -> None:
        self.fd = fd
        self.description = description
        self._reader = reader
        self.reader_bytes: int | None = None

    @property
    def is_terminal(self) -> bool:
        """True when writing into the user's own terminal."""
        return self._reader is None

    def close(self) -> None:
        """Close a pty (its reader then sees EIO, reports and exits); the terminal stays."""
        reader = self._reader
        if reader is None:
            return
        os.close(self.fd)
        try:
            out, _ = reader.communicate(timeout=5)
            self.reader_bytes = int(out.split()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            reader.kill()
            reader.wait()


def open_terminal() -> Target:
    """The user's terminal on fd 1: the terminal itself is the reader."""
    return Target(1, "this terminal")


# The reader is tiny, but it must not share the writer's GIL, so it runs in its own process.
_READER_CMD = "from sigpoll.stress._writers import reader_main; reader_main()"

# Each read asks for this much; the master side hands over at most its line-discipline
# buffer (4 KiB) at a time anyway.
_READ_CHUNK = 4096


def open_pty(reader_mbps: float) -> Target:
    """A fresh pty: the writer gets the slave, a reader process drains the master.

    ``reader_mbps`` paces the reader (MB/s, 10**6 bytes) like a terminal emulator that can
    only draw so fast: writers that keep up all deliver that rate, so differences between
    modes come from stalls, not from scheduling noise.  0 reads as fast as possible.
    """
    master, slave = os.openpty()
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        # A new session: the user's Ctrl-C goes to us, and we stop the reader in order.
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER_CMD, repr(float(reader_mbps))],
            stdin=master,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.close(master)
    # Wait until it reads, so its start-up time is not part of the first mode's run.
    assert reader.stdout is not None
    ready, _, _ = select.select([reader.stdout], [], [], 30.0)
    line = reader.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        reader.kill()
        reader.wait()
        os.close(slave)
        raise RuntimeError("the pty reader process did not start")
    pace = f"paced at {reader_mbps:g} MB/s" if reader_mbps > 0 else "unpaced"
    return Target(slave, f"a pty (reader process {pace})", reader)


def reader_main() -> None:
    """Body of the pty reader process: drain fd 0 at the pace given in argv[1] (MB/s of
    dump text; carriage returns the tty adds are free).

    Prints ``ready`` once started and the byte count once the pty is closed.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The mask was inherited from the writer's main thread (which blocks SIGIO and the
    # poller's signal); the reader has no use for that.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    rate = float(sys.argv[1]) * 1e6
    # Reading time left unused (the writer was late) may be made up later, up to 0.5 s
    # worth: a writer that was merely descheduled for a while by other load catches up
    # in full, one that stalls for the ~1 s a missed wakeup costs loses most of it.
    burst = max(rate * 0.5, 4.0 * _READ_CHUNK)
    fd = 0
    total = 0
    tokens = 0.0
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    # Start the clock at the first byte, not at start-up: time spent waiting for the
    # writer to begin must not turn into a head start of saved-up reading.
    select.select([fd], [], [])
    last = time.monotonic()
    try:
        while True:
            want = 1 << 16
            if rate > 0:
                now = time.monotonic()
                tokens = min(burst, tokens + (now - last) * rate)
                last = now
                if tokens < _READ_CHUNK:
                    time.sleep((_READ_CHUNK - tokens) / rate)
                    continue
                want = int(tokens)
            data = os.read(fd, want)
            if not data:
                break
            total += len(data)
            # Pace the text the writer wrote, not the tty's \n -> \r\n expansion of it, so
            # "10 MB/s" here means 10 MB/s of dump for a writer that keeps up.
            tokens -= len(data) - data.count(b"\r")
    except OSError:
        pass  # EIO: the writer closed the slave, which is how a run ends
    sys.stdout.write(f"{total}\n")
    sys.stdout.flush()
