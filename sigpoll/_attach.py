"""Race-free device I/O inside any running asyncio loop (stock asyncio, uvloop, ...).

:func:`attach` creates a :class:`sigpoll.Poller` and nests it in the host loop as a single
reader: the poller's epoll fd becomes readable whenever one of its device fds (or its
signalfd) is, the host loop calls back, and ``poller.wait(0)`` collects the ready devices
and runs their callbacks.  uvloop users keep their loop and still get O_ASYNC hints with
sigpoll's retry step for the device fds.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

from ._devices import _forget_attached, _note_attached, attached_to
from ._poller import (
    READABLE,
    WAKES_READER,
    WAKES_WRITER,
    WRITABLE,
    Counters,
    FileLike,
    Poller,
    _fd_of,
    register_device,
)
from ._signals import pick_signal

__all__ = ["AttachedPoller", "attach"]


def _signals_read_on(loop: asyncio.AbstractEventLoop) -> dict[int, object]:
    """The hint signals already read on ``loop``'s thread: signal -> whose."""
    from ._loop import Loop

    taken: dict[int, object] = {p.poller_signal: p for p in attached_to(loop)}
    if isinstance(loop, Loop) and not loop.is_closed():
        taken[loop.poller_signal] = loop
    return taken


class _Callback:
    """One registered callback: run in its context, errors go to the loop's handler."""

    __slots__ = ("callback", "args", "context")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.context = contextvars.copy_context()


class AttachedPoller:
    """A sigpoll poller running inside another event loop.  Create with :func:`attach`.

    A :class:`sigpoll.DeviceWatcher`, like :class:`sigpoll.Loop`: :meth:`add_device_reader`,
    :meth:`add_device_writer`, :meth:`remove_device_reader`, :meth:`remove_device_writer`
    and :meth:`poller_counters`.  Callbacks run on the host loop's thread, from the host
    loop's reader callback for the poller's fd; an exception in one goes to the host loop's
    exception handler and does not stop the others.  Use it as a context manager, or call
    :meth:`close` before closing the host loop.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, signal: int | None = None, max_events: int = 256
    ) -> None:
        self._loop = loop
        # The loop's own poller (a sigpoll Loop) and any poller attached before are read on
        # this loop's thread too: sharing a signal with one of them would let it drain
        # this poller's hints (and the other way round), so a shared one is refused.
        taken = _signals_read_on(loop)
        if signal is None:
            signal = pick_signal(frozenset(taken))
        elif signal in taken:
            raise ValueError(
                f"signal {signal} already carries the hints of {taken[signal]!r} on this "
                "loop's thread; pass another real-time signal, or omit signal= to have a "
                "free one picked"
            )
        self._poller = Poller(signal=signal, max_events=max_events)
        # fd -> [reader, writer]; the mask registered in the poller follows from it.
        self._callbacks: dict[int, list[_Callback | None]] = {}
        self._fd = self._poller.fileno()
        try:
            loop.add_reader(self._fd, self._on_ready)
        except BaseException:
            self._poller.close()
            raise
        _note_attached(self)

    # -- properties ---------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The host loop."""
        return self._loop

    @property
    def poller(self) -> Poller:
        """The nested poller (read its settings; register fds through this object)."""
        return self._poller

    @property
    def poller_signal(self) -> int:
        """The real-time signal that carries the device fds' readiness hints."""
        return self._poller.signal

    @property
    def closed(self) -> bool:
        return self._poller.closed

    def fileno(self) -> int:
        """The poller's epoll fd, watched by the host loop."""
        return self._fd

    def poller_counters(self) -> Counters:
        """A snapshot of the nested poller's counters."""
        return self._poller.counters

    # -- device API ---------------------------------------------------------------------------

    def add_device_reader(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` on the host loop whenever device ``fd`` is readable.

        The fd is registered with O_ASYNC real-time signal hints (O_ASYNC and O_NONBLOCK
        are set until its last callback is removed).  Replaces an earlier reader for it.
        Raises OSError if the fd cannot be polled or deliver signals.
        """
        self._add(_fd_of(fd), 0, _Callback(callback, args))

    def add_device_writer(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` on the host loop whenever device ``fd`` is writable."""
        self._add(_fd_of(fd), 1, _Callback(callback, args))

    def remove_device_reader(self, fd: FileLike) -> bool:
        """Stop watching ``fd`` for reading; True if there was a reader."""
        return self._remove(_fd_of(fd), 0)

    def remove_device_writer(self, fd: FileLike) -> bool:
        """Stop watching ``fd`` for writing; True if there was a writer."""
        return self._remove(_fd_of(fd), 1)

    def _add(self, fd: int, side: int, cb: _Callback) -> None:
        if self._poller.closed:
            raise RuntimeError("the attached poller is closed")
        pair = self._callbacks.get(fd)
        if pair is None:
            pair = [None, None]
            pair[side] = cb
            register_device(self._poller, fd, _mask(pair))
            self._callbacks[fd] = pair
            return
        old = pair[side]
        pair[side] = cb
        try:
            self._poller.modify(fd, _mask(pair))
        except BaseException:
            pair[side] = old
            raise

    def _remove(self, fd: int, side: int) -> bool:
        pair = self._callbacks.get(fd)
        if pair is None or pair[side] is None:
            return False
        pair[side] = None
        if pair[0] is None and pair[1] is None:
            del self._callbacks[fd]
            try:
                self._poller.unregister(fd)
            except (KeyError, OSError):
                pass  # closed by the caller first: epoll has forgotten it already
        elif not self._poller.closed:
            self._poller.modify(fd, _mask(pair))
        return True

    # -- dispatch -----------------------------------------------------------------------------

    def _on_ready(self) -> None:
        # The host loop saw the epoll fd readable.  wait(0) runs sigpoll's whole scheme
        # (signalfd drain, hint confirmation) without blocking the host loop.
        try:
            ready = self._poller.wait(0)
        except RuntimeError:
            # Closed (PollerClosedError) between the host's poll and this callback.
            return
        callbacks = self._callbacks
        for fd, ev in ready:
            pair = callbacks.get(fd)
            if pair is None:
                continue
            reader, writer = pair
            if reader is not None and ev & WAKES_READER:
                self._run(reader)
            if writer is not None and ev & WAKES_WRITER and pair[1] is writer:
                self._run(writer)

    def _run(self, cb: _Callback) -> None:
        try:
            cb.context.run(cb.callback, *cb.args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"Exception in sigpoll device callback {cb.callback!r}",
                    "exception": exc,
                    "poller": self,
                }
            )

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach from the host loop and close the poller (restoring every device fd's flags).

        Idempotent.  Safe after the host loop was closed.
        """
        if self._poller.closed:
            return
        _forget_attached(self)
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._callbacks.clear()
        self._poller.close()

    def __enter__(self) -> AttachedPoller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._poller.closed else f"{len(self._callbacks)} devices"
        return f"<sigpoll.AttachedPoller signal={self._poller.signal} {state} on {self._loop!r}>"


def _mask(pair: list[_Callback | None]) -> int:
    return (READABLE if pair[0] is not None else 0) | (WRITABLE if pair[1] is not None else 0)


def attach(
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    signal: int | None = None,
    max_events: int = 256,
) -> AttachedPoller:
    """Run a sigpoll poller inside ``loop`` (default: the running loop) and return it.

    Works with any loop that implements ``add_reader`` for an epoll fd: stock asyncio's
    selector loop, uvloop, and sigpoll's own loop.  Register device fds on the returned
    :class:`AttachedPoller`; backends started on ``loop`` afterwards find it through
    :func:`sigpoll.device_watcher`.  ``signal`` is the poller's real-time hint signal;
    by default :data:`sigpoll.DEFAULT_SIGNAL`, or the next one no poller of this process
    uses.  A signal already read on the loop's thread (a sigpoll loop's own, another
    attached poller's) is refused with ValueError: whichever poller drained it first would
    take the other's hints.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    return AttachedPoller(loop, signal=signal, max_events=max_events)
