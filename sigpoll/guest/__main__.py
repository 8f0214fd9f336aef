"""``python -m sigpoll.guest run [options] [-- COMMAND...]``: boot a User-Mode Linux guest.

With no command it drops into a shell in the guest on your terminal (^] detaches and powers
the guest off).  With ``-- COMMAND`` it runs that command in the guest, streams its output to
stdout and exits with its status, like running a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence

from .._loop import new_event_loop
from . import BootError, Guest, GuestError

__all__ = ["main"]

_PREFIX = "[sigpoll.guest]"


def _status(message: str) -> None:
    end = "\r\n" if os.isatty(2) else "\n"
    sys.stderr.write(f"{_PREFIX} {message}{end}")
    sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sigpoll.guest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot a guest; run a command in it or get a shell")
    run.add_argument("--kernel", help="UML kernel binary (default: linux.uml on PATH)")
    run.add_argument("--mem", default="256M", help="guest memory (default 256M)")
    run.add_argument("--rw", action="store_true", help="mount the host's root read-write (default read-only)")
    run.add_argument("--share", action="append", default=[], metavar="HOSTDIR[:TAG]",
                     help="share a host directory with the guest at /mnt/TAG (9P); repeatable")
    run.add_argument("--share-via", choices=("net", "virtio"), default="net",
                     help="carry shares over a private network (default; needs root) or over virtio ports")
    run.add_argument("--port", action="append", default=[], metavar="NAME[=unix:PATH]",
                     help="a virtio-console port: /dev/virtio-ports/NAME in the guest, a unix socket on "
                          "the host (default in the guest's private directory, shown in the status); repeatable")
    run.add_argument("--quiet", "-q", action="store_true", help="no status lines")
    run.add_argument("--boot-timeout", type=float, default=60.0, help="seconds to wait for the guest (default 60)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...] to run in the guest")
    return parser


async def _main(args: argparse.Namespace, command: list[str]) -> int:
    # SIGTERM/SIGHUP cancel the work, so the finally below cleans the guest up.
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)  # type: ignore[union-attr]
    try:
        guest = Guest(
            kernel=args.kernel,
            mem=args.mem,
            read_only=not args.rw,
            boot_timeout=args.boot_timeout,
            status=None if args.quiet else _status,
            shares=args.share,
            ports=args.port,
            share_via=args.share_via,
        )
    except ValueError as exc:
        _status(str(exc))
        return 2
    try:
        await guest.start()
    except BootError as exc:
        _status(str(exc))
        return 1
    try:
        if command:
            out = sys.stdout.buffer

            def write(chunk: bytes) -> None:
                out.write(chunk)
                out.flush()

            result = await guest.run(command, output=write)
            return result.status
        if not os.isatty(0):
            _status("no command given and standard input is not a terminal: nothing to do")
            return 2
        _status("shell on the guest console; ^] detaches")
        reason = await guest.interact()
        _status(reason)
        return 0
    except GuestError as exc:
        _status(str(exc))
        return 1
    finally:
        await guest.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0].startswith("-"):
        parser.error(f"unknown option {command[0]!r} (put the guest command after --)")
    loop = new_event_loop()
    try:
        return loop.run_until_complete(_main(args, command))
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        _status("stopped by a signal; guest cleaned up")
        return 143
    finally:
        loop.close()


if __name__ == "__main__":
    sys.exit(main())
