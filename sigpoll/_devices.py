"""One seam for "watch this device fd", whatever loop the backend runs on.

A backend (a console, a virtio port's kick fd, the 9P server on a tty) asks a
:class:`DeviceWatcher` to call it back when its fd is readable or writable.  Two classes
implement the protocol with sigpoll's race-free scheme (O_ASYNC hints plus epoll plus a
level check): :class:`sigpoll.Loop` itself, and the :class:`sigpoll.AttachedPoller` that
:func:`sigpoll.attach` nests in any other loop (stock asyncio, uvloop).
:func:`device_watcher` finds the right one for a loop, so a backend takes an optional
``devices=`` argument and defaults to ``device_watcher()``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._poller import FileLike, _fd_of

if TYPE_CHECKING:
    from ._attach import AttachedPoller
    from ._loop import Loop

__all__ = ["DeviceWatcher", "device_watcher"]


class DeviceWatcher(Protocol):
    """Something that calls back when a device fd is readable or writable.

    Implemented by :class:`sigpoll.Loop` and :class:`sigpoll.AttachedPoller` (both with
    O_ASYNC hints, so no readiness edge is lost), and by the plain fallback
    :func:`device_watcher` returns for a loop with neither.  Adding a callback for a side
    that has one replaces it; the removers return whether there was one.
    """

    def add_device_reader(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` whenever ``fd`` is readable (or in error, or hung up)."""

    def add_device_writer(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` whenever ``fd`` is writable (or in error, or hung up)."""

    def remove_device_reader(self, fd: FileLike) -> bool:
        """Stop watching ``fd`` for reading; True if a callback was removed."""

    def remove_device_writer(self, fd: FileLike) -> bool:
        """Stop watching ``fd`` for writing; True if a callback was removed."""


class _LoopReaders:
    """The fallback: a loop's own add_reader/add_writer, epoll (or select) alone, no hints.

    Correct for sockets and pipes, whose drivers wake pollers before they signal; a tty
    watched this way can see a readiness edge late (docs/design.md), which is what
    :func:`sigpoll.attach` is for.  The fds it watches are remembered here because
    uvloop's remove_reader/remove_writer return None whether or not they removed anything.
    """

    __slots__ = ("_loop", "_readers", "_writers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Shared by every fallback of the loop, so what one backend added another sees.
        self._readers, self._writers = _fallback_fds.setdefault(loop, (set(), set()))

    def add_device_reader(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        self._loop.add_reader(fd, callback, *args)
        self._readers.add(_fd_of(fd))

    def add_device_writer(self, fd: FileLike, callback: Callable[..., object], *args: Any) -> None:
        self._loop.add_writer(fd, callback, *args)
        self._writers.add(_fd_of(fd))

    def remove_device_reader(self, fd: FileLike) -> bool:
        removed = bool(self._loop.remove_reader(fd))
        return _take(self._readers, fd) or removed

    def remove_device_writer(self, fd: FileLike) -> bool:
        removed = bool(self._loop.remove_writer(fd))
        return _take(self._writers, fd) or removed

    def __repr__(self) -> str:
        return f"<sigpoll device fallback: add_reader/add_writer of {self._loop!r}>"


def _take(fds: set[int], fileobj: FileLike) -> bool:
    fd = _fd_of(fileobj)
    if fd in fds:
        fds.discard(fd)
        return True
    return False


# Loop -> (reader fds, writer fds) its fallbacks watch.  The values hold no reference to
# the loop, so the weak key can go.
_fallback_fds: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[set[int], set[int]]] = (
    weakref.WeakKeyDictionary()
)


# Host loop -> its attached pollers, oldest first (AttachedPoller registers and unregisters
# itself).  Weak both ways: a poller refers to its loop, so strong values would keep a
# dropped loop alive through its key.
_attached: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, list[weakref.ref[AttachedPoller]]
] = weakref.WeakKeyDictionary()


def _note_attached(poller: AttachedPoller) -> None:
    _attached.setdefault(poller.loop, []).append(weakref.ref(poller))


def _forget_attached(poller: AttachedPoller) -> None:
    refs = _attached.get(poller.loop)
    if refs is not None:
        refs[:] = [r for r in refs if r() is not None and r() is not poller]
        if not refs:
            del _attached[poller.loop]


def attached_to(loop: asyncio.AbstractEventLoop) -> list[AttachedPoller]:
    """The open pollers :func:`sigpoll.attach` put into ``loop``, oldest first."""
    pollers = []
    for ref in _attached.get(loop, ()):
        poller = ref()
        if poller is not None and not poller.closed:
            pollers.append(poller)
    return pollers


def device_watcher(loop: asyncio.AbstractEventLoop | None = None) -> DeviceWatcher:
    """The :class:`DeviceWatcher` backends on ``loop`` (default: the running loop) should use.

    * a :class:`sigpoll.Loop`: the loop itself;
    * a loop :func:`sigpoll.attach` was called on: its first attached poller still open;
    * any other loop: a fallback on the loop's ``add_reader``/``add_writer`` (no O_ASYNC
      hints: call :func:`sigpoll.attach` first to get them on stock asyncio or uvloop).

    A backend should ask once, when it starts, and keep the answer, so that every fd it
    adds is removed from the same watcher.
    """
    from ._loop import Loop

    if loop is None:
        loop = asyncio.get_running_loop()
    if isinstance(loop, Loop):
        return loop
    pollers = attached_to(loop)
    if pollers:
        return pollers[0]
    return _LoopReaders(loop)


if TYPE_CHECKING:
    # mypy checks here that both implementations satisfy the protocol.
    def _conforms(loop: Loop, attached: AttachedPoller) -> tuple[DeviceWatcher, DeviceWatcher]:
        return loop, attached
