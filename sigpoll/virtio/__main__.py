"""``python -m sigpoll.virtio console --socket PATH [...]``: serve a virtio console.

Port 0 (the guest's hvc0) is wired to this command's stdin/stdout, or exposed as a unix
socket with ``--port0 unix:PATH``; each ``--port NAME=unix:PATH`` adds a named port (the
guest's /dev/vportNpM, named NAME) exposed as a unix socket, one client at a time, and
``--port NAME=ninep:DIR`` serves DIR over 9P on the port (mount it in the guest with
:func:`sigpoll.virtio.ninep_mount_command`).  Frontends are served one after another (a
guest rebooting is just the next frontend) until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any, NoReturn

from .._cli import add_busy_poll_option
from .._loop import run
from ._backend import VhostUserBackend
from ._console import ConsoleDevice, ConsolePort
from ._services import PortSocket, bridge_port_to_fds, serve_ninep

__all__ = ["main"]

log = logging.getLogger("sigpoll.virtio")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit status 2, no usage dump and no traceback.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _unix_path(spec: str) -> str:
    if not spec.startswith("unix:") or len(spec) <= 5:
        raise argparse.ArgumentTypeError(f"expected unix:PATH, got {spec!r}")
    return spec[5:]


def _named_port(spec: str) -> tuple[str, str, str]:
    """``NAME=unix:PATH`` or ``NAME=ninep:DIR`` -> (name, kind, path)."""
    name, sep, where = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=unix:PATH or NAME=ninep:DIR, got {spec!r}")
    if "/" in name or "\0" in name or len(name.encode()) > 255:
        raise argparse.ArgumentTypeError(f"bad port name {name!r}")
    if where.startswith("ninep:") and len(where) > 6:
        directory = where[6:]
        if not os.path.isdir(directory):
            raise argparse.ArgumentTypeError(f"port {name}: {directory!r} is not a directory")
        return name, "ninep", directory
    return name, "unix", _unix_path(where)


def _parser() -> _Parser:
    p = _Parser(prog="python -m sigpoll.virtio", description="virtio devices over vhost-user")
    sub = p.add_subparsers(dest="device", required=True, parser_class=_Parser)
    c = sub.add_parser("console", help="a virtio console (port 0 plus named ports)")
    c.add_argument("--socket", required=True, help="vhost-user socket path the frontend connects to")
    c.add_argument("--port0", type=_unix_path, metavar="unix:PATH",
                   help="expose port 0 (hvc0) as a unix socket instead of stdin/stdout")
    c.add_argument("--port", type=_named_port, action="append", default=[], metavar="NAME=unix:PATH|ninep:DIR",
                   help="a named port exposed as a unix socket, or serving DIR over 9P (repeatable)")
    c.add_argument("--no-reply-ack", action="store_true", help="do not offer REPLY_ACK")
    add_busy_poll_option(c)
    c.add_argument("-v", "--verbose", action="count", default=0)
    return p


async def _serve_port_on_stdio(port: ConsolePort) -> None:
    from .. import tty

    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with tty.raw_mode(stdin):
        await bridge_port_to_fds(port, stdin, stdout)


def _error(message: str) -> int:
    sys.stderr.write(f"python -m sigpoll.virtio: error: {message}\n")
    return 2


async def _console(args: argparse.Namespace) -> int:
    names = [n for n, _, _ in args.port]
    if len(set(names)) != len(names):
        return _error("port names must be unique")
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
    try:
        for ps in sockets:
            try:
                ps.listen()
            except OSError as exc:
                return _error(f"cannot listen on {ps.path}: {exc.strerror or exc}")
        try:
            backend.listen(args.socket)
        except OSError as exc:
            return _error(f"cannot listen on {args.socket}: {exc.strerror}")
        return await _serve(args, device, backend, sockets)
    finally:
        for ps in sockets:
            ps.close()


async def _serve(args: argparse.Namespace, device: ConsoleDevice, backend: VhostUserBackend,
                 sockets: list[PortSocket]) -> int:
    servers = []
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: None if stop.done() else stop.set_result(None))
    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(backend.serve())]
    tasks += [asyncio.ensure_future(ps.serve()) for ps in sockets]
    for port, (_, kind, path) in zip(device.ports[1:], args.port):
        if kind == "ninep":
            from ..ninep import NinepServer

            server = NinepServer(path)
            servers.append(server)
            tasks.append(asyncio.ensure_future(serve_ninep(port, server)))
    # Standard input ending (a pipe, /dev/null) only ends port 0's forwarding, not the server.
    extra: list[asyncio.Future[Any]] = [] if args.port0 else [asyncio.ensure_future(_serve_port_on_stdio(device.ports[0]))]
    done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
    backend.stop()
    for t in tasks + extra:
        t.cancel()
    await asyncio.gather(*tasks, *extra, return_exceptions=True)
    for server in servers:
        await server.close()
    for t in done:
        if t is not stop and not t.cancelled() and t.exception() is not None:
            sys.stderr.write(f"python -m sigpoll.virtio: error: {t.exception()}\n")
            return 1
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="sigpoll.virtio: %(message)s", stream=sys.stderr)
    return run(_console(args), busy_poll_us=args.busy_poll_us)


if __name__ == "__main__":
    sys.exit(main())
