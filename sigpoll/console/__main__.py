"""``python -m sigpoll.console`` (``sigpoll-console``): attach your terminal to a console.

    sigpoll-console attach [--escape ^]] [--log FILE] [--raw] PATH
    sigpoll-console run [--escape ^]] [--log FILE] [--raw] -- COMMAND [ARGS...]

``attach`` connects the terminal to a tty device or pty slave PATH (a guest's console).
``run`` starts COMMAND on a new pty, as its controlling terminal, and attaches to it; the
command's exit status becomes ours.  In both, the escape character (Ctrl-] by default, as in
``virsh console``) detaches: the terminal is restored and, after ``run``, the program sees its
terminal hang up.  SIGINT, SIGTERM and SIGHUP end it the same way (status 130, 143, 129).
Window size changes of your terminal are passed on to the console.

What the console prints reaches your terminal through the terminal filter (see
:mod:`sigpoll._termfilter`); ``--raw`` passes every byte through unchanged (the log always
gets the raw bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

from .. import tty as stty
from .._cli import (
    EXIT_USAGE,
    Parser,
    UsageError,
    add_verbosity_options,
    run_command,
    setup_logging,
    unpollable,
)
from ._bridge import Bridge, parse_escape, show_escape

__all__ = ["main"]

log = logging.getLogger("sigpoll.console")

#: After detach or hang-up, how long the program may take to exit before SIGHUP, and then
#: before SIGKILL (each is waited for without blocking the loop).
_GRACE = 2.0


def _escape(text: str) -> int:
    try:
        return parse_escape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> Parser:
    parser = Parser("sigpoll.console", description="Attach your terminal to a console: a tty, "
                    "a pty slave, or a new pty running a program.  The escape character detaches.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("attach", "attach to an existing tty or pty slave"),
        ("run", "run a program on a new pty and attach to it"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--escape", type=_escape, default="^]", metavar="CHAR",
                       help="detach character: one character or ^X")
        p.add_argument("--log", metavar="FILE", help="also append everything the console prints to FILE")
        p.add_argument("--raw", action="store_true",
                       help="pass every control sequence to your terminal (normally those that "
                            "write the clipboard, change fonts/colours/window, or make the "
                            "terminal type back are blocked)")
        add_verbosity_options(p)
        if name == "attach":
            p.add_argument("path", help="tty device or pty slave, e.g. /dev/pts/3")
        else:
            p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                           help="the program to run")
    return parser


def _say(bridge: Bridge | None, message: str) -> None:
    # After console output that did not end its line, start the message on a fresh one.
    if bridge is not None and not bridge.at_line_start and os.isatty(2):
        with contextlib.suppress(OSError):
            os.write(2, b"\r\n")
        bridge.at_line_start = True
    log.info("%s", message)


async def _bridge_terminal(console_fd: int, escape: int, logfile: BinaryIO | None,
                           raw: bool) -> tuple[str, Bridge]:
    """Join the terminal, in raw mode, with ``console_fd`` until detach or hang-up; say what
    the filter blocked, and return why it ended."""
    bridge = Bridge(escape, logfile, raw=raw)
    try:
        with stty.raw_mode(0):
            reason = await bridge.run(console_fd, close_console=True)
    finally:
        if summary := bridge.dropped():
            _say(bridge, summary)
    return reason, bridge


async def _attach(path: str, escape: int, logfile: BinaryIO | None, raw: bool) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.error("cannot open %s: %s", path, exc.strerror)
        return 1
    why = unpollable(fd)
    if why is not None:
        os.close(fd)
        raise UsageError(f"cannot attach to {path}: it is {why}, not a console "
                         "(give a tty device or a pty slave)")
    _say(None, f"attached to {path}; escape is {show_escape(escape)}")
    reason, bridge = await _bridge_terminal(fd, escape, logfile, raw)
    _say(bridge, reason)
    return 0


async def _run(argv: Sequence[str], escape: int, logfile: BinaryIO | None, raw: bool) -> int:
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
        log.error("cannot run %s: %s", argv[0], exc.strerror)
        return 127
    bridge: Bridge | None = None
    code: int | None = None
    try:
        _say(None, f"running {shlex.join(argv)} on {path} (pid {proc.pid}); "
                   f"escape is {show_escape(escape)}")
        reason, bridge = await _bridge_terminal(master, escape, logfile, raw)
        if reason != "detached":  # the program closed its terminal: it is likely exiting
            code = await _wait_exit(proc, _GRACE)
    finally:
        # Detached, hung up without exiting, or stopped by a signal: the program's terminal
        # is gone, so it gets the hang-up a terminal gives, then SIGKILL if it ignores that.
        if code is None:
            code = await _end(proc)
    if reason == "detached":
        _say(bridge, f"detached; {argv[0]} (pid {proc.pid}) ended with status {_status(code)}")
    else:
        _say(bridge, f"{argv[0]} exited with status {_status(code)}")
    return _status(code)


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


async def _end(proc: subprocess.Popen[bytes]) -> int:
    """Hang the program's session up, then kill it if it is still there; its return code."""
    for signum in (signal.SIGHUP, signal.SIGCONT, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        if signum == signal.SIGCONT:
            continue  # a stopped program must run to see the hang-up
        code = await _wait_exit(proc, _GRACE)
        if code is not None:
            return code
    return proc.wait()


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The return code once ``proc`` exits, or None after ``timeout`` seconds; the loop
    keeps running meanwhile (a pidfd when the kernel has them, else short sleeps)."""
    code = proc.poll()
    if code is not None:
        return code
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = -1
    try:
        if pidfd >= 0:
            exited: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, readable)
            try:
                await asyncio.wait_for(exited, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(pidfd)
        else:
            deadline = loop.time() + timeout
            while proc.poll() is None and loop.time() < deadline:
                await asyncio.sleep(0.02)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return proc.poll()


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


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse ``argv``, attach or run, and return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(args, own="sigpoll.console")
    if not os.isatty(0):
        parser.error("standard input is not a terminal: attach and run join your terminal "
                     "to the console, so run them in one")
    why = unpollable(1)
    if why is not None:
        parser.error(f"standard output is {why}, which cannot take the console's output as it "
                     "comes: keep a copy with --log FILE instead")
    command: list[str] = []
    if args.command == "run":
        command = list(args.argv)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            parser.error("run needs a command: run -- COMMAND [ARGS...]")
    logfile: BinaryIO | None = None
    if args.log:
        try:
            logfile = open(args.log, "ab")
        except OSError as exc:
            log.error("cannot open log %s: %s", args.log, exc.strerror)
            return EXIT_USAGE
    try:
        if args.command == "attach":
            return run_command(_attach(args.path, args.escape, logfile, args.raw), logger=log)
        return run_command(_run(command, args.escape, logfile, args.raw), logger=log)
    finally:
        if logfile is not None:
            logfile.close()


if __name__ == "__main__":
    sys.exit(main())
