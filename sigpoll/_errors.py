"""Exceptions and warnings shared across sigpoll."""

from __future__ import annotations

__all__ = ["PollerClosedError", "SignalMaskWarning"]


class PollerClosedError(RuntimeError):
    """The poller was closed, possibly by another thread while this one was waiting.

    This is the "device gone" path: it is final, and retrying the call cannot succeed.
    An interrupted wait (EINTR) is the other path and never surfaces: the poller restarts
    the wait itself with the time that is left.
    """


class SignalMaskWarning(RuntimeWarning):
    """A thread of this process does not block the poller's signals.

    Signals aimed at the polling thread are unaffected, but a process-directed copy could
    be taken by that thread (whose default action for an unhandled real-time signal is to
    terminate the process), or an RT signal meant as a hint may be lost.
    """
