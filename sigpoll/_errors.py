"""Exceptions and warnings shared across sigpoll."""

from __future__ import annotations

__all__ = ["PollerClosedError", "SignalMaskWarning", "WriteBufferFullError"]


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


class WriteBufferFullError(BufferError):
    """A write would queue more output than the transport's ``max_write_buffer`` allows.

    The write is refused whole: none of its bytes were sent or queued, and what was queued
    before is untouched. Writers that wait for ``drain()`` (or honour ``pause_writing``)
    never see this; it stops one that ignores flow control from growing memory without
    bound, for example while the peer has stopped reading.
    """
