"""``python -m sigpoll.virtio console`` (``sigpoll-virtio``): serve a virtio console over vhost-user.

See ``_DESCRIPTION`` (what ``console --help`` says).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from .._cli import (
    Parser,
    UsageError,
    add_busy_poll_option,
    add_verbosity_options,
    port_name,
    run_command,
    setup_logging,
    strict_unix_path,
    unix_path,
    unpollable,
)
from .._unixsock import remove_unix
from ._backend import VhostUserBackend
from ._console import ConsoleDevice, ConsolePort
from ._services import PortSocket, bridge_port_to_fds, serve_ninep

__all__ = ["main"]

log = logging.getLogger("sigpoll.virtio")

_DESCRIPTION = """\
Serve a virtio console to a vhost-user frontend (QEMU, UML, crosvm...) connecting on
--socket.  Port 0 (the guest's hvc0) is this command's standard input and output, or a
unix socket with --port0 unix:PATH.  Each --port NAME=unix:PATH adds a named port (the
guest's /dev/virtio-ports/NAME) exposed as a unix socket, one client at a time, and
--port NAME=ninep:DIR serves DIR over 9P on the port.  Every socket is mode 0600 and only
this user and root may connect.

Standard input may be anything: a terminal (put in raw mode), a pipe, a file or /dev/null
(as a service starts it); when it ends, port 0 stops getting input but its output still
goes to standard output.  Frontends are served one after another (a guest rebooting is
just the next frontend) until SIGINT or SIGTERM (exit status 130, 143).  Exit status 2:
the command line cannot be used."""


def _named_port(spec: str) -> tuple[str, str, str]:
    """``NAME=unix:PATH`` or ``NAME=ninep:DIR`` -> (name, kind, path)."""
    name, sep, where = spec.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=unix:PATH or NAME=ninep:DIR, got {spec!r}")
    try:
        port_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if where.startswith("ninep:"):
        directory = where[6:]
        if not directory or not os.path.isdir(directory):
            raise argparse.ArgumentTypeError(f"port {name}: {directory!r} is not a directory")
        return name, "ninep", directory
    if not where.startswith("unix:"):
        raise argparse.ArgumentTypeError(f"port {name}: expected unix:PATH or ninep:DIR, got {where!r}")
    return name, "unix", strict_unix_path(where)


def _parser() -> Parser:
    p = Parser("sigpoll.virtio", description="virtio devices over vhost-user.")
    sub = p.add_subparsers(dest="device", required=True, metavar="DEVICE")
    c = sub.add_parser("console", help="a virtio console (port 0 plus named ports)",
                       description=_DESCRIPTION)
    c.add_argument("--socket", required=True, type=unix_path, metavar="[unix:]PATH",
                   help="the vhost-user socket the frontend connects to")
    c.add_argument("--port0", type=strict_unix_path, metavar="unix:PATH",
                   help="expose port 0 (hvc0) as a unix socket instead of stdin/stdout")
    c.add_argument("--port", type=_named_port, action="append", default=[],
                   metavar="NAME=unix:PATH|NAME=ninep:DIR",
                   help="a named port exposed as a unix socket, or serving DIR over 9P (repeatable); "
                        "NAME: letters, digits, '-', '_', '.'")
    c.add_argument("--no-reply-ack", action="store_true", help="do not offer REPLY_ACK")
    add_busy_poll_option(c)
    add_verbosity_options(c)
    return p


def _copy(source: int, sink: int, close_source: bool = False) -> None:
    """Everything from ``source`` to ``sink`` with plain blocking reads and writes, to EOF
    (for files and /dev/null, which epoll refuses, and the pipes that stand in for them)."""
    with contextlib.suppress(OSError):
        while chunk := os.read(source, 65536):
            view = memoryview(chunk)
            while view:
                view = view[os.write(sink, view):]
    if close_source:
        os.close(source)


@contextlib.contextmanager
def _stdio_for_the_loop() -> Iterator[tuple[int, int]]:
    """Standard input and output as fds the loop can watch.

    A terminal is used as it is.  Any other standard input is read with plain reads into a
    pipe that stays open after it ends (so the guest's output still flows); a standard
    output epoll refuses (a regular file, /dev/null) is written with plain writes from a
    pipe.  The copying threads are daemons: input may never end.
    """
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    ours: list[int] = []
    feeder: tuple[threading.Thread, int] | None = None
    drain: threading.Thread | None = None
    try:
        read_fd = stdin
        if not os.isatty(stdin):
            read_fd, feed = os.pipe2(os.O_CLOEXEC)
            ours.append(read_fd)
            thread = threading.Thread(target=_copy, args=(stdin, feed), name="virtio-stdin",
                                      daemon=True)
            thread.start()
            feeder = (thread, feed)
        write_fd = stdout
        if unpollable(stdout) is not None:
            out_r, write_fd = os.pipe2(os.O_CLOEXEC)
            ours.append(write_fd)
            drain = threading.Thread(target=_copy, args=(out_r, stdout, True), name="virtio-stdout",
                                     daemon=True)
            drain.start()
        yield read_fd, write_fd
    finally:
        for fd in ours:
            with contextlib.suppress(OSError):
                os.close(fd)
        if feeder is not None:
            thread, feed = feeder
            # Closed only once its writer is done: closing an fd another thread may still
            # write to could hand the number to a new file.  (A reader of a pipe that
            # never ends keeps it until the process exits, moments later.)
            thread.join(0.1)
            if not thread.is_alive():
                os.close(feed)
        if drain is not None:
            drain.join(5)  # what the guest printed last reaches the file


async def _serve_port_on_stdio(port: ConsolePort) -> None:
    from .. import tty

    with _stdio_for_the_loop() as (read_fd, write_fd), tty.raw_mode(read_fd):
        await bridge_port_to_fds(port, read_fd, write_fd)
        await asyncio.get_running_loop().create_future()  # the port outlives its input


async def _console(args: argparse.Namespace) -> int:
    names = [n for n, _, _ in args.port]
    if len(set(names)) != len(names):
        raise UsageError("port names must be unique")
    device = ConsoleDevice(names, multiport=True, size=None)
    backend = VhostUserBackend(device, reply_ack=not args.no_reply_ack)
    # Every socket is bound before anything is served: a bad path is reported and nothing
    # is left half-started.
    sockets: list[PortSocket] = []
    if args.port0:
        sockets.append(PortSocket(device.ports[0], args.port0))
    for port, (_, kind, path) in zip(device.ports[1:], args.port):
        if kind == "unix":
            sockets.append(PortSocket(port, path))
    listener = None
    try:
        for ps in sockets:
            try:
                ps.listen()
            except OSError as exc:
                raise UsageError(f"cannot listen on {ps.path}: {_why(exc)}") from None
        try:
            listener = backend.listen(args.socket)
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.socket}: {_why(exc)}") from None
        log.info("vhost-user console on %s; port 0 on %s", args.socket,
                 f"unix:{args.port0}" if args.port0 else "stdin/stdout")
        return await _serve(args, device, backend, sockets)
    finally:
        for ps in sockets:
            ps.close()
        if listener is not None:
            remove_unix(listener)


def _why(exc: OSError) -> str:
    import errno

    if isinstance(exc, FileExistsError):
        return "the path exists and is not a socket (it is left alone)"
    if exc.errno == errno.EADDRINUSE:
        return "another server is listening there"
    return exc.strerror or str(exc)


async def _serve(args: argparse.Namespace, device: ConsoleDevice, backend: VhostUserBackend,
                 sockets: list[PortSocket]) -> int:
    servers = []
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(backend.serve())]
    tasks += [asyncio.ensure_future(ps.serve()) for ps in sockets]
    for port, (_, kind, path) in zip(device.ports[1:], args.port):
        if kind == "ninep":
            from ..ninep import NinepServer

            server = NinepServer(path)
            servers.append(server)
            tasks.append(asyncio.ensure_future(serve_ninep(port, server)))
    if not args.port0:
        tasks.append(asyncio.ensure_future(_serve_port_on_stdio(device.ports[0])))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        backend.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            await server.close()
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            log.error("%s", t.exception())
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    args = _parser().parse_args(argv)
    setup_logging(args, own="sigpoll.virtio")
    return run_command(_console(args), busy_poll_us=args.busy_poll_us, logger=log)


if __name__ == "__main__":
    sys.exit(main())
