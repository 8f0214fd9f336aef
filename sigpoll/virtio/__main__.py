"""``python -m sigpoll.virtio console --socket PATH [...]``: serve a virtio console.

Port 0 (the guest's hvc0) is wired to this command's stdin/stdout, or exposed as a unix
socket with ``--port0 unix:PATH``; each ``--port NAME=unix:PATH`` adds a named port (the
guest's /dev/vportNpM, named NAME) exposed as a unix socket, one client at a time.
Frontends are served one after another (a guest rebooting is just the next frontend)
until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any, NoReturn

from ._backend import VhostUserBackend
from ._console import ConsoleDevice, ConsolePort

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


def _named_port(spec: str) -> tuple[str, str]:
    name, sep, where = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=unix:PATH, got {spec!r}")
    if "/" in name or len(name.encode()) > 255:
        raise argparse.ArgumentTypeError(f"bad port name {name!r}")
    return name, _unix_path(where)


def _parser() -> _Parser:
    p = _Parser(prog="python -m sigpoll.virtio", description="virtio devices over vhost-user")
    sub = p.add_subparsers(dest="device", required=True, parser_class=_Parser)
    c = sub.add_parser("console", help="a virtio console (port 0 plus named ports)")
    c.add_argument("--socket", required=True, help="vhost-user socket path the frontend connects to")
    c.add_argument("--port0", type=_unix_path, metavar="unix:PATH",
                   help="expose port 0 (hvc0) as a unix socket instead of stdin/stdout")
    c.add_argument("--port", type=_named_port, action="append", default=[], metavar="NAME=unix:PATH",
                   help="a named port exposed as a unix socket (repeatable)")
    c.add_argument("--no-reply-ack", action="store_true", help="do not offer REPLY_ACK")
    c.add_argument("-v", "--verbose", action="count", default=0)
    return p


class _Pipe(asyncio.Protocol):
    """One side of a two-transport bridge, with flow control passed across."""

    def __init__(self, bridge: _Bridge, side: int) -> None:
        self.bridge, self.side = bridge, side

    def connection_made(self, transport: Any) -> None:
        self.bridge.ends[self.side] = transport

    def data_received(self, data: bytes) -> None:
        other = self.bridge.ends[1 - self.side]
        if other is not None and not other.is_closing():
            other.write(data)

    def pause_writing(self) -> None:
        other = self.bridge.ends[1 - self.side]
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.bridge.ends[1 - self.side]
        if other is not None:
            other.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.bridge.lost(self.side)


class _Bridge:
    """Copies bytes between ``ends[0]`` (the port) and ``ends[1]`` (a host endpoint)."""

    def __init__(self, keep_host: bool = False) -> None:
        self.ends: list[Any] = [None, None]
        self.keep_host = keep_host
        self.port_gone = asyncio.get_running_loop().create_future()
        self.host_gone = asyncio.get_running_loop().create_future()

    def lost(self, side: int) -> None:
        self.ends[side] = None
        if side == 0:
            if not self.port_gone.done():
                self.port_gone.set_result(None)
            if not self.keep_host and self.ends[1] is not None:
                self.ends[1].close()
        else:
            if not self.host_gone.done():
                self.host_gone.set_result(None)
            if self.ends[0] is not None:
                self.ends[0].close()


async def _serve_port_on_stdio(port: ConsolePort) -> None:
    from .. import tty

    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with tty.raw_mode(stdin):
        bridge = _Bridge(keep_host=True)
        await tty.connect_console(lambda: _Pipe(bridge, 1), stdin, stdout, close_fds=False)
        while not bridge.host_gone.done():
            bridge.port_gone = asyncio.get_running_loop().create_future()
            port.connect(lambda: _Pipe(bridge, 0))
            # The guest going away (reboot) ends the port transport; attach a new one
            # for the next guest, keeping the terminal.
            await asyncio.wait([bridge.port_gone, bridge.host_gone], return_when=asyncio.FIRST_COMPLETED)


async def _serve_port_on_unix(port: ConsolePort, path: str) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.setblocking(False)
    try:
        while True:
            client, _ = await loop.sock_accept(listener)
            bridge = _Bridge()
            port.connect(lambda: _Pipe(bridge, 0))
            await loop.connect_accepted_socket(lambda: _Pipe(bridge, 1), client)
            # One client at a time: the next is accepted when this one or the port ends.
            await asyncio.wait([bridge.port_gone, bridge.host_gone], return_when=asyncio.FIRST_COMPLETED)
            for end in bridge.ends:
                if end is not None:
                    end.close()
            await asyncio.sleep(0)
    finally:
        listener.close()


async def _console(args: argparse.Namespace) -> int:
    names = [n for n, _ in args.port]
    if len(set(names)) != len(names):
        sys.stderr.write("python -m sigpoll.virtio: error: port names must be unique\n")
        return 2
    device = ConsoleDevice(names, multiport=True, size=None)
    backend = VhostUserBackend(device, reply_ack=not args.no_reply_ack)
    try:
        backend.listen(args.socket)
    except OSError as exc:
        sys.stderr.write(f"python -m sigpoll.virtio: error: cannot listen on {args.socket}: {exc.strerror}\n")
        return 2
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    tasks = [asyncio.ensure_future(backend.serve())]
    if args.port0:
        tasks.append(asyncio.ensure_future(_serve_port_on_unix(device.ports[0], args.port0)))
    else:
        tasks.append(asyncio.ensure_future(_serve_port_on_stdio(device.ports[0])))
    for port, (_, path) in zip(device.ports[1:], args.port):
        tasks.append(asyncio.ensure_future(_serve_port_on_unix(port, path)))
    done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
    backend.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
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
    return asyncio.run(_console(args))


if __name__ == "__main__":
    sys.exit(main())
