"""What every byte-stream transport of sigpoll's backends shares: write flow control.

A console on a tty and a virtio-console port buffer writes differently, but they pause and
resume their protocol the same way, so a console consumer works on either.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["FlowControlledTransport"]

DEFAULT_HIGH_WATER = 64 * 1024


class FlowControlledTransport(asyncio.Transport):
    """An asyncio transport whose subclasses report :meth:`get_write_buffer_size`.

    Above the high-water mark the protocol's ``pause_writing`` is called, at or below the
    low-water mark ``resume_writing``; subclasses call :meth:`_maybe_pause` after buffering
    and :meth:`_maybe_resume` after draining.
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

    def get_write_buffer_size(self) -> int:
        raise NotImplementedError

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
