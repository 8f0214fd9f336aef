"""The stall watchdog: a thread that checks the tty on its own and times idle writers.

A stall is a stretch during which the tty was writable and the writer made no successful
write, longer than a threshold.  The watchdog does not trust the writer's poller (that is
what is under test): it asks the kernel directly with ``poll(POLLOUT, 0)`` every few ms.
"""

from __future__ import annotations

import dataclasses
import select
import threading
import time
from typing import Protocol

__all__ = ["Activity", "StallReport", "Watchdog"]


class Activity(Protocol):
    """What the watchdog reads from the writer (plain attributes, updated by the writer)."""

    #: monotonic time of the writer's last successful write (its start time before any)
    last_write: float
    #: True between the writer's start and the moment it decided to stop
    running: bool
    #: monotonic time the writer stopped (0.0 while running)
    ended: float


@dataclasses.dataclass(frozen=True)
class StallReport:
    """Stalls seen: how many crossed the threshold, and the longest one in ms."""

    stalls: int
    longest_ms: float


class Watchdog:
    """Counts stalls of a writer on ``fd`` from its own thread.

    Start it after the writer's poller exists (threads inherit the creating thread's
    signal mask, and the poller blocks its signals in the thread that creates it).
    """

    def __init__(
        self, fd: int, activity: Activity, threshold_s: float, interval_s: float = 0.004
    ) -> None:
        self._fd = fd
        self._activity = activity
        self._threshold = threshold_s
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sigpoll-stress-watchdog", daemon=True)
        self._lock = threading.Lock()
        self._stalls = 0
        self._longest = 0.0
        # The open episode: when the tty was first seen writable after the last write.
        self._since: float | None = None
        self._counted = False

    def start(self) -> None:
        """Start polling in the watchdog's own thread."""
        self._thread.start()

    def stop(self) -> StallReport:
        """Stop the thread and return the final count (an open stall is closed at the
        moment the writer stopped, so clean-up time is never counted)."""
        self._stop.set()
        if self._thread.ident is not None:  # it may never have been started
            self._thread.join()
        with self._lock:
            if self._since is not None:
                end = self._activity.ended or time.monotonic()
                self._close(max(0.0, end - self._since))
                self._since = None
            return StallReport(self._stalls, round(self._longest * 1000.0, 1))

    def snapshot(self) -> StallReport:
        """The count so far, including an open stall past the threshold (for progress)."""
        with self._lock:
            longest = self._longest
            if self._since is not None and self._counted:
                longest = max(longest, time.monotonic() - self._since)
            return StallReport(self._stalls, round(longest * 1000.0, 1))

    # -- the thread ----------------------------------------------------------------------

    def _close(self, duration: float) -> None:
        """End the open episode after ``duration`` seconds (lock held)."""
        if self._counted or duration > self._threshold:
            if not self._counted:
                self._stalls += 1
            self._longest = max(self._longest, duration)
        self._counted = False

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        act = self._activity
        # Event.wait as the sleep: stop() takes effect at once instead of after a tick.
        while not self._stop.wait(self._interval):
            if not act.running:
                continue  # not started yet, or already stopping: nothing to judge
            last = act.last_write  # read before polling, so a write in between ends the episode
            try:
                writable = bool(poller.poll(0))
            except OSError:
                return  # the fd went away under us; the writer reports that
            now = time.monotonic()
            with self._lock:
                if self._since is not None and last > self._since:
                    # The writer wrote: the episode ended with that write.
                    self._close(last - self._since)
                    self._since = None
                if writable:
                    if self._since is None:
                        # Start from when we saw it, not from the last write: before this
                        # tick the tty may well not have been writable.
                        self._since = now
                    elif not self._counted and now - self._since > self._threshold:
                        self._counted = True
                        self._stalls += 1
                elif self._since is not None:
                    # No longer writable without a write of ours (flow control, say):
                    # waiting is then the right thing, so the episode ends here.
                    self._close(now - self._since)
                    self._since = None
