"""A :class:`selectors.BaseSelector` whose only source of readiness is a sigpoll Poller.

asyncio's selector event loop talks to its selector through the ``BaseSelector`` API, so a
Poller-backed selector is enough to put every fd the loop watches into the poller's epoll
set.  Ordinary fds (sockets, pipes, the loop's self-pipe) are registered with
``signals=False``: an O_ASYNC signal per readiness change would only add a syscall and a
signalfd read to each wake-up.  Device fds opt into signals through
:meth:`PollerSelector.set_device`, which the loop's ``add_device_reader`` /
``add_device_writer`` use.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterator, Mapping
from selectors import EVENT_READ, EVENT_WRITE, BaseSelector, SelectorKey
from typing import Any

from ._poller import WAKES_READER, WAKES_WRITER, FileLike, Poller, register_device
from ._poller import _fd_of as _fileobj_to_fd

__all__ = ["PollerSelector"]

_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT


def _to_epoll(events: int) -> int:
    mask = 0
    if events & EVENT_READ:
        mask |= _EPOLLIN
    if events & EVENT_WRITE:
        mask |= _EPOLLOUT
    return mask


class _KeyMap(Mapping[Any, SelectorKey]):
    """Read-only ``fileobj -> SelectorKey`` view, as ``get_map()`` must return."""

    __slots__ = ("_sel",)

    def __init__(self, sel: PollerSelector) -> None:
        self._sel = sel

    def __len__(self) -> int:
        return len(self._sel._fd_to_key)

    def __getitem__(self, fileobj: Any) -> SelectorKey:
        fd = self._sel._lookup_fd(fileobj)
        key = self._sel._fd_to_key.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        return key

    def __iter__(self) -> Iterator[Any]:
        return iter(self._sel._fd_to_key)


class PollerSelector(BaseSelector):
    """``selectors.BaseSelector`` over a :class:`sigpoll.Poller`.

    The selector owns the poller it is given (closing the selector closes the poller).
    ``select()`` returns ``[(key, events), ...]`` like every stdlib selector; the loop in
    :mod:`sigpoll._loop` bypasses it on its hot path and reads :attr:`poller` and the
    ``fd -> key`` table directly.
    """

    def __init__(self, poller: Poller | None = None) -> None:
        self._poller: Poller = Poller() if poller is None else poller
        self._wait = self._poller.wait
        self._fd_to_key: dict[int, SelectorKey] = {}
        # fds registered with O_ASYNC signals, with the directions asked for as devices.
        self._device: dict[int, int] = {}
        # Device fds whose driver has no fasync: watched through epoll alone.
        self._no_async: set[int] = set()
        self._map: _KeyMap | None = _KeyMap(self)
        # Register ordinary fds with O_ASYNC signals too.  Off: bench/bench_loop.py turns
        # it on only to measure what a signal per readiness change costs a socket.
        self._signals_for_all = False

    @property
    def poller(self) -> Poller:
        """The poller every registration goes to."""
        return self._poller

    # -- lookup --------------------------------------------------------------------------

    def _lookup_fd(self, fileobj: FileLike) -> int:
        try:
            return _fileobj_to_fd(fileobj)
        except ValueError:
            # A closed file object no longer has its fd; find it by identity so it can
            # still be unregistered (asyncio does this when a transport closes late).
            for key in self._fd_to_key.values():
                if key.fileobj is fileobj:
                    return key.fd
            raise

    # -- BaseSelector API ----------------------------------------------------------------

    def register(self, fileobj: FileLike, events: int, data: Any = None) -> SelectorKey:
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        fd = self._lookup_fd(fileobj)
        if fd in self._fd_to_key:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = SelectorKey(fileobj, fd, events, data)
        signals = self._signals_for_all
        try:
            self._poller.register(fd, _to_epoll(events), signals=signals)
        except FileExistsError:
            # Registered behind the selector's back (an fd number reused after a close
            # that epoll noticed but we did not): start over with the new file.
            self._poller.unregister(fd)
            self._poller.register(fd, _to_epoll(events), signals=signals)
        self._fd_to_key[fd] = key
        return key

    def unregister(self, fileobj: FileLike) -> SelectorKey:
        fd = self._lookup_fd(fileobj)
        key = self._fd_to_key.pop(fd, None)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        self._device.pop(fd, None)
        self._no_async.discard(fd)
        try:
            self._poller.unregister(fd)
        except (KeyError, OSError):
            # The fd was closed before being unregistered; epoll dropped it already,
            # which is the state we wanted.
            pass
        return key

    def modify(self, fileobj: FileLike, events: int, data: Any = None) -> SelectorKey:
        fd = self._lookup_fd(fileobj)
        key = self._fd_to_key.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        if events != key.events:
            try:
                self._poller.modify(fd, _to_epoll(events))
            except (KeyError, FileNotFoundError):
                # The file behind this fd number changed (closed and reopened): epoll
                # has no entry for the new one, so register it afresh.
                signals = fd in self._device or self._signals_for_all
                self._poller.unregister(fd)
                self._poller.register(fd, _to_epoll(events), signals=signals)
            except BaseException:
                self.unregister(fileobj)
                raise
        elif data is key.data:
            return key
        key = SelectorKey(key.fileobj, fd, events, data)
        self._fd_to_key[fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            # Millisecond ceiling like EpollSelector: never return before the deadline.
            timeout = math.ceil(timeout * 1e3) * 1e-3
        ready = []
        fd_to_key = self._fd_to_key
        for fd, ev in self._wait(timeout):
            key = fd_to_key.get(fd)
            if key is None:
                continue
            events = 0
            if ev & WAKES_WRITER:
                events |= EVENT_WRITE
            if ev & WAKES_READER:
                events |= EVENT_READ
            ready.append((key, events & key.events))
        return ready

    def close(self) -> None:
        self._fd_to_key.clear()
        self._device.clear()
        self._map = None
        self._poller.close()

    def get_key(self, fileobj: FileLike) -> SelectorKey:
        fd = self._lookup_fd(fileobj)
        key = self._fd_to_key.get(fd)
        if key is None:
            raise KeyError(f"{fileobj!r} is not registered")
        return key

    def get_map(self) -> Mapping[Any, SelectorKey]:
        return self._map  # type: ignore[return-value]

    def fileno(self) -> int:
        """The poller's epoll fd."""
        return self._poller.fileno()

    # -- devices -------------------------------------------------------------------------

    def set_device(self, fileobj: FileLike, direction: int, on: bool) -> None:
        """Mark ``direction`` (EVENT_READ/EVENT_WRITE) of a registered fd as a device side.

        An fd with any device side is registered in the poller with O_ASYNC signals; when
        the last device side goes, it is re-registered without them (which also restores
        its original file status flags, signal and owner).  An fd whose driver cannot send
        O_ASYNC signals at all (an eventfd, a timerfd) is watched through epoll alone: its
        readiness reaches epoll directly, with no signal-first ordering to race against.
        """
        fd = self._lookup_fd(fileobj)
        key = self._fd_to_key[fd]
        before = self._device.get(fd, 0)
        after = (before | direction) if on else (before & ~direction)
        if bool(before) != bool(after):
            mask = _to_epoll(key.events)
            self._poller.unregister(fd)
            try:
                if after and not register_device(self._poller, fd, mask):
                    self._no_async.add(fd)
                else:
                    if not after:
                        self._poller.register(fd, mask, signals=False)
                    self._no_async.discard(fd)
            except BaseException:
                # Not signal-capable (or gone): put the old registration back so the
                # loop's callbacks keep working, then report the refusal.
                try:
                    self._poller.register(fd, mask, signals=bool(before))
                except OSError:
                    self._fd_to_key.pop(fd, None)
                    self._device.pop(fd, None)
                raise
        if after:
            self._device[fd] = after
        else:
            self._device.pop(fd, None)

    def is_device(self, fileobj: FileLike) -> bool:
        """Whether the fd is registered with O_ASYNC signals."""
        fd = self._lookup_fd(fileobj)
        return fd in self._device and fd not in self._no_async
