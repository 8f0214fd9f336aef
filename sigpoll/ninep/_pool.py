"""The 9P server's worker threads, and who gets them.

:class:`WorkerPool` runs blocking calls in daemon threads and hands each result back to
the loop.  Unlike ``concurrent.futures.ThreadPoolExecutor`` its threads are never joined:
neither :meth:`WorkerPool.shutdown` nor the interpreter's exit waits for a call that
never returns (a read from a FIFO nobody writes, a hung network file system), so closing
a server and stopping its process always finish.

:class:`Scheduler` decides which waiting request gets a thread when one is free: round
robin over the connections that have work, so one connection's burst of slow calls
waits its turn instead of filling the pool ahead of everyone else, and at most
``share`` threads per peer, so the calls of one peer that never return can take only its
share of the pool, never all of it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeVar

__all__ = ["WorkerPool", "Scheduler", "Waiter"]

T = TypeVar("T")


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # its caller was cancelled meanwhile
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class WorkerPool:
    """``workers`` daemon threads running blocking calls for coroutines on one loop."""

    def __init__(self, workers: int, name: str = "ninep-fs") -> None:
        self.workers = workers
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread."""
        if self._closed:
            raise RuntimeError("the worker pool is shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if len(self._threads) < self.workers:
            self._spawn()
        self._jobs.put((loop, fut, fn, args))
        return await fut

    def _spawn(self) -> None:
        t = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}",
                             daemon=True)
        self._threads.append(t)
        t.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, fut, fn, args = job
            try:
                result: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result = (False, exc)
            try:
                loop.call_soon_threadsafe(_settle, fut, *result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del job, fut, result

    def shutdown(self) -> None:
        """Stop the threads once they are idle; never waits for a call in progress."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)


class Waiter(Protocol):
    """What :class:`Scheduler` serves: a connection with requests waiting for a thread."""

    #: Who it belongs to (the peer address): threads are shared out per peer.
    peer_key: Hashable

    def has_waiting(self) -> bool: ...

    def begin_next(self) -> bool:
        """Start the next waiting request on a thread; False if there was none left to
        start (each one aborted meanwhile)."""


class Scheduler:
    """Shares ``slots`` threads out among connections: round robin, at most ``share``
    running calls per peer."""

    def __init__(self, slots: int, share: int) -> None:
        self.slots = slots
        self.share = share
        self.free = slots
        self._ready: deque[Waiter] = deque()
        self._queued: set[Waiter] = set()
        #: Peer -> threads its connections hold.
        self.running: dict[Hashable, int] = {}
        #: Peer -> its connections that wait while the peer holds its share.
        self._parked: dict[Hashable, deque[Waiter]] = {}

    def wake(self, w: Waiter) -> None:
        """``w`` has a request waiting for a thread."""
        if w not in self._queued:
            self._queued.add(w)
            self._ready.append(w)
        self._grant()

    def release(self, w: Waiter) -> None:
        """A call of ``w``'s ended: its thread is free."""
        self.free += 1
        key = w.peer_key
        n = self.running[key] - 1
        if n:
            self.running[key] = n
        else:
            del self.running[key]
        parked = self._parked.pop(key, None)
        if parked:
            self._ready.extendleft(reversed(parked))
        self._grant()

    def forget(self, w: Waiter) -> None:
        """``w`` is gone: drop it from the queues (its running calls release as usual)."""
        if w in self._queued:
            self._queued.discard(w)
            try:
                self._ready.remove(w)
            except ValueError:
                pass
            parked = self._parked.get(w.peer_key)
            if parked is not None and w in parked:
                parked.remove(w)

    def _grant(self) -> None:
        while self.free and self._ready:
            w = self._ready.popleft()
            key = w.peer_key
            if self.running.get(key, 0) >= self.share:
                self._parked.setdefault(key, deque()).append(w)
                continue
            if w.has_waiting() and w.begin_next():
                self.free -= 1
                self.running[key] = self.running.get(key, 0) + 1
            if w.has_waiting():
                self._ready.append(w)
            else:
                self._queued.discard(w)
