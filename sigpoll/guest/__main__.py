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
import time
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


# After a stop signal (or at the end), the guest must be gone within this many seconds, even
# if something of it hangs in the host (a share server thread stuck in a system call): then
# the process leaves without it.  Everything that outlives the process (the guest's processes,
# namespaces, directory and sockets) is removed before that point or by the jail's launcher.
_CLEANUP_DEADLINE = 30.0


def _leave_after(seconds: float, status: list[int]) -> None:
    """Exit with ``status[0]`` after ``seconds`` unless the process has exited by then."""
    import threading

    def watchdog() -> None:
        time.sleep(seconds)
        _status(f"cleanup did not finish in {seconds:g}s (a share server is stuck in the host?); leaving")
        sys.stdout.flush()
        os._exit(status[0])

    threading.Thread(target=watchdog, name="sigpoll-guest-exit", daemon=True).start()


async def _main(args: argparse.Namespace, command: list[str], final: list[int]) -> int:
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
    stopped = False
    try:
        await guest.start()
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
    except BootError as exc:
        _status(str(exc))
        return 1
    except GuestError as exc:
        _status(str(exc))
        return 1
    except asyncio.CancelledError:
        stopped = True
        raise
    finally:
        _leave_after(_CLEANUP_DEADLINE, final)
        await guest.stop(timeout=_STOP_TIMEOUT if stopped else 20.0)


# A stopped command's guest gets this long to power off before it is killed.
_STOP_TIMEOUT = 3.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0].startswith("-"):
        parser.error(f"unknown option {command[0]!r} (put the guest command after --)")
    final = [1]  # the status a watchdog exit uses
    signum: list[int] = []

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_signal(n: int) -> None:
            if not signum:
                signum.append(n)
                final[0] = 128 + n
            task.cancel()

        for n in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(n, on_signal, n)
        try:
            return await _main(args, command, final)
        except asyncio.CancelledError:
            if not signum:
                raise
            return 128 + signum[0]

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        status = runner.run(guarded())
    return 128 + signum[0] if signum else status


if __name__ == "__main__":
    sys.exit(main())
