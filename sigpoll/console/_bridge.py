"""The bridge between the user's terminal and a console fd: filtered, detachable, restored.

Everything the console prints reaches the terminal through a
:class:`~sigpoll._termfilter.TerminalFilter` (unless ``raw``): control sequences that would
write the clipboard, change fonts or colours, move the window or make the terminal type back
are dropped.  On detach the bridge writes only what undoes the modes the console changed
(nothing at all for a console that printed plain text), so the user's cursor stays where the
output left it and the next prompt starts on a line of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any, BinaryIO

from .. import tty as stty
from .._termfilter import TerminalFilter

__all__ = ["Bridge", "parse_escape", "show_escape"]


def parse_escape(text: str) -> int:
    """``^]`` / ``^A`` style or a single character -> the byte it stands for."""
    if len(text) == 2 and text[0] == "^":
        code = ord(text[1].upper()) ^ 0x40
        if 0 <= code < 0x20 or code == 0x7F:
            return code
    if len(text) == 1 and ord(text) < 0x80:
        return ord(text)
    raise ValueError(f"escape must be one character or ^X, not {text!r}")


def show_escape(escape: int) -> str:
    """The escape byte as a user types it (``^]``)."""
    return f"^{chr(escape ^ 0x40)}" if escape < 0x20 or escape == 0x7F else chr(escape)


class _Side(stty.ConsoleProtocol):
    """One end of the bridge: forwards what it reads to the other end's transport."""

    def __init__(self, bridge: Bridge, name: str) -> None:
        self.bridge = bridge
        self.name = name
        self.transport: stty.ConsoleTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, stty.ConsoleTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.bridge.forward(self.name, data)

    def eof_received(self) -> bool:
        self.bridge.finish(f"{self.name} hung up")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.finish(f"{self.name} closed" if exc is None else f"{self.name}: {exc}")

    # Flow control: when one side's tty is not taking our writes, stop reading the other.
    def pause_writing(self) -> None:
        self.bridge.peer_of(self.name).pause()

    def resume_writing(self) -> None:
        self.bridge.peer_of(self.name).resume()

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()


class Bridge:
    """Joins the user's terminal and a console fd; the escape byte detaches.

    Console output is filtered for the terminal (see :mod:`sigpoll._termfilter`) unless
    ``raw``; ``log`` receives it unfiltered.  Either way the modes it changes are followed,
    and undone when :meth:`run` ends.
    """

    def __init__(self, escape: int, log: BinaryIO | None = None, *, raw: bool = False) -> None:
        self.escape = escape
        self.log = log
        self.raw = raw
        self.filter = TerminalFilter()
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.terminal = _Side(self, "terminal")
        self.console = _Side(self, "console")
        #: Whether the terminal's cursor is at the start of a line (as far as the console's
        #: output tells): a status line after detach starts a new line only if not.
        self.at_line_start = True

    def peer_of(self, name: str) -> _Side:
        return self.console if name == "terminal" else self.terminal

    def forward(self, name: str, data: bytes) -> None:
        if name == "terminal":
            cut = data.find(bytes([self.escape]))
            if cut >= 0:
                data = data[:cut]
                if data and self.console.transport is not None:
                    self.console.transport.write(data)
                self.finish("detached")
                return
        else:
            if self.log is not None:
                self.log.write(data)
            kept = self.filter.feed(data)
            if not self.raw:
                data = kept
            if data:
                self.at_line_start = data.endswith((b"\n", b"\r"))
        target = self.peer_of(name).transport
        if target is not None and data:
            target.write(data)

    def dropped(self) -> str:
        """A line on what the filter blocked from the terminal, or "" if nothing."""
        return "" if self.raw else self.filter.summary()

    def finish(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_result(reason)

    async def run(self, console: int | stty.ConsoleTransport, *, close_console: bool) -> str:
        """Join the terminal (fds 0 and 1) with ``console``: an fd, or a transport already
        open on one (it is taken over, and left open unless ``close_console``)."""
        await stty.connect_console(lambda: self.terminal, 0, 1, close_fds=False)
        if isinstance(console, stty.ConsoleTransport):
            console.set_protocol(self.console)
            self.console.connection_made(console)
            console.resume_reading()
            console_fd = int(console.get_extra_info("write_fd"))
        else:
            console_fd = console
            await stty.connect_console(lambda: self.console, console_fd, close_fds=close_console)
        with contextlib.suppress(OSError):
            rows, cols = stty.get_winsize(0)
            if rows and cols:
                stty.set_winsize(console_fd, rows, cols)
        stop_resize: Any = None
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            stop_resize = stty.watch_resize(
                asyncio.get_running_loop(), 0, lambda r, c: stty.set_winsize(console_fd, r, c)
            )
        try:
            return await self.done
        finally:
            if stop_resize is not None:
                stop_resize()
            if self.terminal.transport is not None:
                reset = self.filter.reset_sequence() if os.isatty(1) else b""
                if reset:
                    self.terminal.transport.write(reset)
                self.terminal.transport.close()
            if self.console.transport is not None:
                if close_console or not isinstance(console, stty.ConsoleTransport):
                    self.console.transport.close()
                else:
                    console.pause_reading()  # handed back to its owner, quiet
            await asyncio.sleep(0)  # let the transports restore their fds' flags
