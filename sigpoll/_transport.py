"""What every byte-stream transport of sigpoll's backends shares: write flow control and
the closing state machine.

A console on a tty and a virtio-console port buffer writes differently, but they pause and
resume their protocol the same way, they refuse a write past the same hard cap, and they
close the same way (``close`` and ``write_eof`` flush first, ``abort`` does not,
``connection_lost`` comes exactly once, on a later loop iteration), so a console consumer
works on either.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._errors import WriteBufferFullError

__all__ = ["DEFAULT_MAX_WRITE_BUFFER", "FlowControlledTransport"]

DEFAULT_HIGH_WATER = 64 * 1024
#: Hard cap on queued output. Far above the high-water mark, so a writer that honours
#: pause_writing/drain never meets it; one that does not gets an error, not an OOM.
DEFAULT_MAX_WRITE_BUFFER = 16 * 1024 * 1024


class FlowControlledTransport(asyncio.Transport):
    """An asyncio transport whose subclasses report :meth:`get_write_buffer_size`.

    Above the high-water mark the protocol's ``pause_writing`` is called, at or below the
    low-water mark ``resume_writing``; subclasses call :meth:`_maybe_pause` after buffering
    and :meth:`_maybe_resume` after draining. A write that would take the queue past
    ``max_write_buffer`` bytes raises :class:`~sigpoll.WriteBufferFullError` and queues
    nothing; subclasses call :meth:`_accept_write` (or :meth:`_check_room`) before they send
    or queue any of it.

    Closing: ``close()`` and ``write_eof()`` end the transport once the queue is empty
    (subclasses report it with :meth:`_write_pending` and call :meth:`_drained` when it
    empties), ``abort()`` and a fatal error at once (:meth:`_force_close`).  Subclasses
    supply what differs: :meth:`_on_close` (stop taking input when ``close()`` is asked),
    :meth:`_detach` (stop all I/O and drop the queue, at once) and :meth:`_release` (free
    what the transport holds, after the protocol's ``connection_lost``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(extra)
        self._loop = loop
        self._protocol: Any = protocol
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self._writing_paused = False
        self._max_buffer: int | None = DEFAULT_MAX_WRITE_BUFFER
        self._closing = False  # close() asked for, or lost: no more writes, no more reads
        self._eof_pending = False  # write_eof() asked for: close once the queue drains
        self._lost = False  # closed for good; connection_lost is (being) delivered

    def get_write_buffer_size(self) -> int:
        raise NotImplementedError

    def get_max_write_buffer(self) -> int | None:
        """The hard cap on queued output in bytes, or None when there is none."""
        return self._max_buffer

    def set_max_write_buffer(self, size: int | None) -> None:
        """Set the hard cap on queued output (None: unbounded). Must be >= the high-water mark."""
        if size is not None:
            if not isinstance(size, int) or size < self._high:
                raise ValueError(
                    f"max_write_buffer ({size!r}) must be an int >= the high-water mark ({self._high})"
                )
        self._max_buffer = size

    def _check_room(self, nbytes: int) -> None:
        if self._max_buffer is not None and self.get_write_buffer_size() + nbytes > self._max_buffer:
            raise WriteBufferFullError(
                f"writing {nbytes} bytes would queue {self.get_write_buffer_size() + nbytes} bytes, "
                f"over this transport's max_write_buffer of {self._max_buffer}; wait for drain() "
                f"or raise the cap with set_max_write_buffer()"
            )

    def _maybe_pause(self) -> None:
        if not self._writing_paused and self.get_write_buffer_size() > self._high:
            self._writing_paused = True
            self._call_protocol("pause_writing")

    def _maybe_resume(self) -> None:
        if self._writing_paused and self.get_write_buffer_size() <= self._low:
            self._writing_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, name: str) -> None:
        try:
            getattr(self._protocol, name)()
        except Exception as exc:  # a protocol bug must not break the transport's state
            self._loop.call_exception_handler(
                {"message": f"protocol.{name}() failed", "exception": exc,
                 "transport": self, "protocol": self._protocol}
            )

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        if self._max_buffer is not None and high > self._max_buffer:
            raise ValueError(f"high ({high!r}) must be <= max_write_buffer ({self._max_buffer})")
        self._high, self._low = high, low
        self._maybe_pause()
        self._maybe_resume()

    def can_write_eof(self) -> bool:
        return True

    # -- closing --

    def _accept_write(self, data: bytes | bytearray | memoryview) -> bool:
        """Check a write: False if it is to be dropped (closing, lost, empty); raises for
        a non-bytes argument, after write_eof(), or past the hard cap."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if self._eof_pending:
            raise RuntimeError("cannot write after write_eof()")
        if self._closing or self._lost or not data:
            return False  # like asyncio's transports: writes after close are dropped silently
        self._check_room(len(data))
        return True

    def _write_pending(self) -> bool:
        """Whether bytes written are still queued (close and write_eof wait for them)."""
        raise NotImplementedError

    def _on_close(self) -> None:
        """Hook: ``close()`` was asked for while output may still be draining."""

    def _detach(self) -> None:
        """Hook: stop every I/O watch and drop the queue now (the transport is lost)."""

    def _release(self) -> None:
        """Hook: free what the transport holds, after ``connection_lost`` was delivered."""

    def write_eof(self) -> None:
        """Flush what is buffered, then close (these byte streams have no half-close)."""
        if self._closing or self._eof_pending:
            return
        self._eof_pending = True
        if not self._write_pending():
            self._force_close(None)

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Close after the write buffer has drained."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._on_close()
        if not self._write_pending():
            self._loop.call_soon(self._force_close, None)

    def abort(self) -> None:
        self._force_close(None)

    def _drained(self) -> None:
        """Subclasses call this when the write queue has emptied."""
        if (self._closing or self._eof_pending) and not self._lost:
            self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._detach()
        self._loop.call_soon(self._finish, exc)

    def _finish(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._release()

    def _state(self) -> str:
        return "closed" if self._lost else "closing" if self._closing else "open"

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol
