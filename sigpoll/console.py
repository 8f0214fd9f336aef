"""``python -m sigpoll.console``: attach your terminal to a console, interactively.

    python -m sigpoll.console attach PATH [--escape ^]] [--log FILE] [--raw]
    python -m sigpoll.console run [--escape ^]] [--log FILE] [--raw] -- COMMAND [ARGS...]

``attach`` connects the terminal to a tty device or pty slave PATH (a guest's console).
``run`` starts COMMAND on a new pty, as its controlling terminal, and attaches to it; the
command's exit status becomes ours.  In both, the escape character (Ctrl-] by default, as in
``virsh console``) detaches: the terminal is restored and the command ends; after ``run``
the program sees its terminal hang up.  The terminal is also restored on SIGTERM, SIGHUP
and errors.  Window size changes of your terminal are passed on to the console.

What the console prints reaches your terminal through :class:`~sigpoll._termfilter.
TerminalFilter`: control sequences that would write your clipboard, change fonts or colours,
move the window or make the terminal type back are dropped, and the modes a guest may leave
set are reset on detach.  ``--raw`` passes every byte through unchanged (the log always gets
the raw bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

from . import tty as stty
from ._loop import new_event_loop
from ._termfilter import RESET_SEQUENCE, TerminalFilter

__all__ = ["Bridge", "main", "parse_escape"]

_PREFIX = "[sigpoll.console]"


def parse_escape(text: str) -> int:
    """``^]`` / ``^A`` style or a single character -> the byte it stands for."""
    if len(text) == 2 and text[0] == "^":
        code = ord(text[1].upper()) ^ 0x40
        if 0 <= code < 0x20 or code == 0x7F:
            return code
    if len(text) == 1 and ord(text) < 0x80:
        return ord(text)
    raise ValueError(f"escape must be one character or ^X, not {text!r}")


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
    ``raw``; ``log`` receives it unfiltered.
    """

    def __init__(self, escape: int, log: BinaryIO | None = None, *, raw: bool = False) -> None:
        self.escape = escape
        self.log = log
        self.filter: TerminalFilter | None = None if raw else TerminalFilter()
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.terminal = _Side(self, "terminal")
        self.console = _Side(self, "console")

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
            if self.filter is not None:
                data = self.filter.feed(data)
        target = self.peer_of(name).transport
        if target is not None:
            target.write(data)

    def dropped(self) -> str:
        """A summary of what the filter kept from the terminal, or "" if nothing."""
        counts = self.filter.counts if self.filter is not None else None
        if counts is None:
            return ""
        parts = [f"{n} {k}" for k in ("osc", "strings", "csi", "c1") if (n := getattr(counts, k))]
        return f"kept {', '.join(parts)} control sequence(s) from the terminal (--raw passes them)" if parts else ""

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
                if self.filter is not None and os.isatty(1):
                    self.terminal.transport.write(RESET_SEQUENCE)
                self.terminal.transport.close()
            if self.console.transport is not None:
                if close_console or not isinstance(console, stty.ConsoleTransport):
                    self.console.transport.close()
                else:
                    console.pause_reading()  # handed back to its owner, quiet
            await asyncio.sleep(0)  # let the transports restore their fds' flags


def _say(message: str) -> None:
    # Raw mode turns off output post-processing, hence the explicit CR.
    sys.stderr.write(f"\r\n{_PREFIX} {message}\r\n" if os.isatty(2) else f"{_PREFIX} {message}\n")
    sys.stderr.flush()


async def _attach(path: str, escape: int, log: BinaryIO | None, raw: bool) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        _say(f"cannot open {path}: {exc.strerror}")
        return 1
    _say(f"attached to {path} (pid {os.getpid()}); escape is {_show(escape)}")
    _say(await _bridge_terminal(fd, escape, log, raw))
    return 0


async def _bridge_terminal(console_fd: int, escape: int, log: BinaryIO | None, raw: bool) -> str:
    """Join the terminal, in raw mode, with ``console_fd`` until detach or hang-up; say what
    the filter kept from the terminal, and return why it ended."""
    bridge = Bridge(escape, log, raw=raw)
    with stty.raw_mode(0):
        reason = await bridge.run(console_fd, close_console=True)
    if summary := bridge.dropped():
        _say(summary)
    return reason


async def _run(argv: Sequence[str], escape: int, log: BinaryIO | None, raw: bool) -> int:
    rows = cols = None
    with contextlib.suppress(OSError):
        rows, cols = stty.get_winsize(0)
    master, path = stty.open_pty(rows=rows or None, cols=cols or None, raw=False)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_child_setup(path),
            close_fds=True,
        )
    except OSError as exc:
        os.close(master)
        _say(f"cannot run {argv[0]}: {exc.strerror}")
        return 127
    _say(f"running {' '.join(argv)} on {path} (pid {os.getpid()}); escape is {_show(escape)}")
    reason = await _bridge_terminal(master, escape, log, raw)
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGHUP)
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    _say(reason if reason == "detached" else f"{argv[0]} exited with status {code}")
    return 128 - code if code < 0 else code


def _child_setup(path: str) -> Any:
    def setup() -> None:
        # In the new session: open the pty slave as the controlling terminal, on 0/1/2.
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        fd = os.open(path, os.O_RDWR)
        import fcntl
        import termios

        fcntl.ioctl(fd, termios.TIOCSCTTY, 0)
        for target in (0, 1, 2):
            os.dup2(fd, target)
        if fd > 2:
            os.close(fd)

    return setup


def _show(escape: int) -> str:
    return f"^{chr(escape ^ 0x40)}" if escape < 0x20 or escape == 0x7F else chr(escape)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sigpoll.console",
        description="Attach your terminal to a console (a tty, a pty slave, or a new pty running a program).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("attach", "attach to an existing tty or pty slave"),
        ("run", "run a program on a new pty and attach to it"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--escape", default="^]", help="detach character (default ^])")
        p.add_argument("--log", help="also write everything the console prints to this file")
        p.add_argument(
            "--raw", action="store_true",
            help="pass every control sequence to your terminal (default: drop those that "
            "write the clipboard, change fonts/colours/window, or make the terminal type back)",
        )
        if name == "attach":
            p.add_argument("path", help="tty device or pty slave, e.g. /dev/pts/3")
        else:
            p.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse ``argv``, attach or run, and return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        escape = parse_escape(args.escape)
    except ValueError as exc:
        parser.error(str(exc))
    if not os.isatty(0):
        parser.error("standard input is not a terminal")
    command: list[str] = []
    if args.command == "run":
        command = list(args.argv)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            parser.error("run needs a command: run -- COMMAND [ARGS...]")
    log: BinaryIO | None = None
    if args.log:
        try:
            log = open(args.log, "ab")
        except OSError as exc:
            parser.error(f"cannot open log {args.log}: {exc.strerror}")
    loop = new_event_loop()
    try:
        if args.command == "attach":
            return loop.run_until_complete(_attach(args.path, escape, log, args.raw))
        return loop.run_until_complete(_run(command, escape, log, args.raw))
    except KeyboardInterrupt:
        return 130
    finally:
        loop.close()
        if log is not None:
            log.close()


if __name__ == "__main__":
    sys.exit(main())
