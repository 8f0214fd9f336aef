"""What every byte-stream transport of sigpoll's backends shares: write flow control.

A console on a tty and a virtio-console port buffer writes differently, but they pause and
resume their protocol the same way, and they refuse a write past the same hard cap, so a
console consumer works on either.
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
    nothing; subclasses call :meth:`_check_room` before they send or queue any of it.
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

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol
