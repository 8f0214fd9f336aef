"""``python -m sigpoll.guest run [options] [-- COMMAND...]``: boot a User-Mode Linux guest.

With no command it drops into a shell in the guest on your terminal (^] detaches and powers
the guest off).  With ``-- COMMAND`` it runs that command in the guest, streams its output to
stdout and exits with its status, like running a subprocess: a standard input that is a pipe
or a file reaches the command (through a virtio-console port), a terminal's does not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Sequence

from .. import _cli
from ._guest import MIN_MEM, BootError, Guest, GuestError, physical_memory

__all__ = ["main"]

log = logging.getLogger("sigpoll.guest")

_DESCRIPTION = "Boot a User-Mode Linux guest whose console, shares and ports are sigpoll's."
_RUN_DESCRIPTION = """\
Boot a User-Mode Linux guest on the host's root file system, read-only, in a jail (the guest
never gets your rights, even as root).  With -- COMMAND, run it in the guest, stream its
output and exit with its status; a standard input that is a pipe or a file is forwarded to it.
Without a command, attach your terminal to a shell in the guest (^] detaches).

examples:
  python -m sigpoll.guest run -- uname -a
  python -m sigpoll.guest run --share ./data:data -- sha256sum /mnt/data/big
  python -m sigpoll.guest run --port log -- sh -c 'dmesg > /dev/virtio-ports/log'
  echo hello | python -m sigpoll.guest run -- sh -c 'read v; echo $v'
"""

#: The port a forwarded standard input travels on (the guest's /dev/virtio-ports/NAME).
STDIN_PORT = "sigpoll-stdin"
# After a stop signal (or at the end), the guest must be gone within this many seconds, even
# if something of it hangs in the host (a share server thread stuck in a system call): then
# the process leaves without it.  Everything that outlives the process (the guest's processes,
# namespaces, directory and sockets) is removed before that point, or by the jail's launcher.
_CLEANUP_DEADLINE = 30.0
# A stopped command's guest gets this long to power off before it is killed.
_STOP_TIMEOUT = 3.0


def _parser() -> tuple[_cli.Parser, _cli.Parser]:
    """The command's parser and its ``run`` subcommand's."""
    parser = _cli.Parser("sigpoll.guest", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="boot a guest; run a command in it or get a shell",
                         description=_RUN_DESCRIPTION)
    run.add_argument("--kernel", metavar="PATH", help="the UML kernel binary (default: linux.uml on PATH)")
    run.add_argument("--mem", type=_cli.size(MIN_MEM, (physical_memory() >> 20 << 20) or None), default=256 << 20,
                     metavar="SIZE", help="guest memory")
    run.add_argument("--boot-timeout", type=_cli.real(0, above=True, what="a number of seconds"),
                     default=60.0, metavar="SECONDS", help="how long the guest may take to come up")
    run.add_argument("--share", action="append", default=[], metavar="HOSTDIR[:TAG]",
                     help="share a host directory with the guest at /mnt/TAG (9P); repeatable")
    run.add_argument("--share-via", choices=("net", "virtio"), default="net",
                     help="carry shares over a private network (needs root) or over virtio-console ports")
    run.add_argument("--port", action="append", default=[], metavar="NAME[=unix:PATH]",
                     help="a virtio-console port: /dev/virtio-ports/NAME in the guest, a unix socket on "
                          "the host (in the guest's private directory unless PATH is given); repeatable")
    run.add_argument("--rw", action="store_true",
                     help="trust the guest: run UML unconfined as you, with the host's root writable "
                          "(it can then change any of your files; a warning says so)")
    _cli.add_verbosity_options(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                     help="the command to run in the guest")
    return parser, run


def _forwarded_stdin() -> bool:
    """Whether standard input is something a command would read (a pipe, a socket, a file),
    rather than a terminal (the shell's, not the command's) or nothing (/dev/null, closed)."""
    try:
        st = os.fstat(0)
    except OSError:
        return False
    if os.isatty(0):
        return False
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):  # /dev/null
        return False
    return True


def _stdin_pump(loop: asyncio.AbstractEventLoop, writer: asyncio.StreamWriter) -> threading.Thread:
    """Copy standard input to ``writer`` from a thread of its own (a file cannot be polled, and
    a pipe nobody closes must not keep the process from exiting: the thread is a daemon)."""

    async def put(chunk: bytes) -> None:
        if chunk:
            writer.write(chunk)
            await writer.drain()  # flow control: the thread waits for the guest to take it
        else:
            writer.close()  # the guest reads EOF once everything before it is read

    def pump() -> None:
        while True:
            try:
                chunk = os.read(0, 1 << 16)
            except OSError:
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(put(chunk), loop).result()
            except Exception:  # the guest or the loop went away: nothing more to forward
                return
            if not chunk:
                return

    thread = threading.Thread(target=pump, name="sigpoll-guest-stdin", daemon=True)
    thread.start()
    return thread


def _leave_after(seconds: float, status: list[int]) -> None:
    """Exit after ``seconds`` unless the process has exited by then: with the stop signal's
    status if one stopped the command, else with ``status[0]``."""

    def watchdog() -> None:
        time.sleep(seconds)
        log.warning("cleanup did not finish in %gs (a share server stuck in the host?); leaving without it",
                    seconds)
        signum = _cli.stop_signal()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(_cli.signal_status(signum) if signum is not None else status[0])

    threading.Thread(target=watchdog, name="sigpoll-guest-exit", daemon=True).start()


async def _boot(guest: Guest) -> None:
    """Start the guest, with a live line on a terminal while it boots."""
    with _cli.Progress() as progress:

        async def tick() -> None:
            t0 = time.monotonic()
            while True:
                progress.update(f"sigpoll.guest: booting the guest: {time.monotonic() - t0:.1f}s")
                await asyncio.sleep(progress.interval)

        ticker = asyncio.ensure_future(tick())
        try:
            await guest.start()
        finally:
            ticker.cancel()


async def _main(guest: Guest, command: list[str], stdin: bool, final: list[int]) -> int:
    stopped = False
    try:
        try:
            await _boot(guest)
        except BootError as exc:
            raise _cli.CommandError(str(exc)) from None
        if command:
            out = sys.stdout.buffer

            def write(chunk: bytes) -> None:
                out.write(chunk)
                out.flush()

            if stdin:
                _, writer = await guest.open_port(STDIN_PORT)
                _stdin_pump(asyncio.get_running_loop(), writer)
                command = ["sh", "-c", f'exec "$@" </dev/virtio-ports/{STDIN_PORT}', "sh", *command]
            result = await guest.run(command, output=write)
            final[0] = result.status
            return result.status
        log.info("shell on the guest console; ^] detaches")
        reason = await guest.interact()
        log.info("%s", reason)
        return _cli.EXIT_OK
    except GuestError as exc:
        raise _cli.CommandError(str(exc)) from None
    except asyncio.CancelledError:
        stopped = True
        raise
    finally:
        _leave_after(_CLEANUP_DEADLINE, final)
        await guest.stop(timeout=_STOP_TIMEOUT if stopped else 20.0)


def _status(message: str) -> None:
    # The port that carries standard input is the command's business, not the user's.
    log.log(logging.DEBUG if message.startswith(f"port {STDIN_PORT}:") else logging.INFO, "%s", message)


def main(argv: Sequence[str] | None = None) -> int:
    top, parser = _parser()
    args = top.parse_args(argv)
    _cli.setup_logging(args, own="sigpoll.guest")
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0].startswith("-"):
        parser.error(f"unknown option {command[0]!r} (put the guest command after --)")
    if not command and not os.isatty(0):
        parser.error("no command, and standard input is not a terminal: nothing to do "
                     "(give -- COMMAND, or run it on a terminal for a shell)")
    if args.share and args.share_via == "net" and os.geteuid() != 0:
        parser.error("--share over the private network needs root; --share-via virtio carries shares without it")
    stdin = bool(command) and _forwarded_stdin()
    try:
        guest = Guest(
            kernel=args.kernel,
            mem=args.mem,
            read_only=not args.rw,
            boot_timeout=args.boot_timeout,
            status=_status,
            shares=args.share,
            ports=args.port + ([STDIN_PORT] if stdin else []),
            share_via=args.share_via,
        )
    except ValueError as exc:
        parser.error(str(exc))
    final = [_cli.EXIT_FAILURE]  # the status a watchdog exit uses
    status = _cli.run_command(_main(guest, command, stdin, final), logger="sigpoll.guest")
    final[0] = status  # if the interpreter's exit waits on a stuck thread, the watchdog uses it
    return status


if __name__ == "__main__":
    sys.exit(main())
