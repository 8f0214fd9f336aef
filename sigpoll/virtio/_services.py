"""Host-side services on console ports: a unix-socket bridge and a 9P file server.

* :class:`PortSocket` exposes a port as a unix socket, one client at a time (the CLI's
  ``--port NAME=unix:PATH`` and the guest runtime's ``--port``).
* :func:`serve_ninep` runs a :class:`sigpoll.ninep.NinepServer` connection on a port, a
  fresh one for every guest session, and :func:`ninep_mount_command` is the guest's side:
  the command line that mounts it.  The guest's ``trans=fd`` cannot use a port device
  directly (see :mod:`sigpoll.virtio._fd_relay`), so the mount goes through a small relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from typing import Any

from .._unixsock import listen_unix
from ._console import ConsolePort

__all__ = ["RELAY_SCRIPT", "PortSocket", "ninep_mount_command", "serve_ninep"]

#: The guest-side relay (standard library only); the guest sees the host's root, so it runs
#: from where it is installed.
RELAY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fd_relay.py")


class _Pipe(asyncio.Protocol):
    """One side of a two-transport bridge, with flow control passed across."""

    def __init__(self, bridge: _Bridge, side: int) -> None:
        self.bridge, self.side = bridge, side

    def connection_made(self, transport: Any) -> None:
        ends = self.bridge.ends
        ends[self.side] = transport
        # Bytes that arrive before the other end exists would have nowhere to go: the end
        # that comes first waits, unread, for the second.
        other = ends[1 - self.side]
        if other is None:
            transport.pause_reading()
        else:
            other.resume_reading()

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
    """Copies bytes between ``ends[0]`` (the port) and ``ends[1]`` (a host endpoint).

    Either end closing closes the other, except that with ``keep_host`` the host end (a
    terminal) outlives the port, for the next guest.
    """

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

    def close(self) -> None:
        for end in self.ends:
            if end is not None:
                end.close()


class PortSocket:
    """A console port exposed as a unix socket at ``path``, one client at a time.

    A client's bytes go to the guest and the guest's to the client, with flow control
    passed across.  The guest closing the port ends the client's connection (it reads EOF
    after everything the guest wrote); the client closing ends the host side of the port.
    The next client is accepted after that.  :meth:`listen` binds at once, so a bad path is
    an ``OSError`` before anything runs; a file at ``path`` that is not a socket is never
    replaced.  :meth:`close` stops serving and removes the socket file.
    """

    def __init__(self, port: ConsolePort, path: str) -> None:
        self.port = port
        self.path = path
        self.clients = 0  #: clients served so far
        self._listener: socket.socket | None = None
        self._bridge: _Bridge | None = None

    def listen(self) -> None:
        """Bind and listen, mode 0600 (replacing a stale socket file, never any other file)."""
        if self._listener is None:
            self._listener = listen_unix(self.path, backlog=1)

    async def serve(self) -> None:
        """Serve clients one after another until cancelled (or :meth:`close`)."""
        self.listen()
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        try:
            while self._listener is not None:
                client, _ = await loop.sock_accept(self._listener)
                self.clients += 1
                bridge = self._bridge = _Bridge()
                # The client's end first: connecting the port tells the guest the host side
                # is open, and the guest's first bytes may follow at once.
                await loop.connect_accepted_socket(lambda: _Pipe(bridge, 1), client)
                try:
                    self.port.connect(lambda: _Pipe(bridge, 0))
                except RuntimeError:
                    bridge.close()  # someone attached to the port directly: not ours to take
                    raise
                # The next client is accepted when this one or the port ends.
                await asyncio.wait([bridge.port_gone, bridge.host_gone], return_when=asyncio.FIRST_COMPLETED)
                bridge.close()
                self._bridge = None
                await asyncio.sleep(0)
        finally:
            if self._bridge is not None:
                self._bridge.close()
                self._bridge = None

    def close(self) -> None:
        """Stop listening, end the current client and remove the socket file."""
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


async def bridge_port_to_fds(port: ConsolePort, read_fd: int, write_fd: int) -> None:
    """Wire a port to a console fd pair (a terminal, or pipes) until that fd pair ends.

    The fds outlive guest sessions: when the guest goes away (reboot) the next one is
    attached to the same terminal.
    """
    from .. import tty

    bridge = _Bridge(keep_host=True)
    await tty.connect_console(lambda: _Pipe(bridge, 1), read_fd, write_fd, close_fds=False)
    try:
        while not bridge.host_gone.done():
            bridge.port_gone = asyncio.get_running_loop().create_future()
            port.connect(lambda: _Pipe(bridge, 0))
            await asyncio.wait([bridge.port_gone, bridge.host_gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        bridge.close()


async def serve_ninep(port: ConsolePort, server: Any, *, peer: str | None = None) -> None:
    """Serve 9P on ``port`` with ``server`` (a :class:`sigpoll.ninep.NinepServer`) until cancelled.

    Every guest session gets a fresh 9P connection: the guest closing the port (unmount)
    or going away (reboot) ends one, and its fids are released.  Mount it in the guest
    with :func:`ninep_mount_command`.
    """
    name = peer or f"virtio-port:{port.name or port.id}"
    while True:
        transport, _ = port.connect(lambda: server.protocol(name))
        try:
            await transport.wait_closed()
        except asyncio.CancelledError:
            transport.abort()
            raise
        await asyncio.sleep(0)


def ninep_mount_command(device: str, mountpoint: str, *, msize: int = 512 * 1024,
                        options: str = "access=any,cache=none", python: str | None = None,
                        relay: str = RELAY_SCRIPT) -> list[str]:
    """The guest's argv that mounts the 9P server on port ``device`` at ``mountpoint``.

    ``device`` is the port in the guest (``/dev/vport0p1`` or ``/dev/virtio-ports/NAME``).
    It runs the relay with the host's Python (``python``, default the running interpreter,
    which the guest sees through the host's root file system) and ``mount -t 9p`` with
    ``trans=fd`` on the relay's socket.  Its exit status is mount's.  ``relay`` is the
    path at which the guest sees :data:`RELAY_SCRIPT` (the same path by default; a guest
    that hides the host's /tmp needs a copy elsewhere, see ``Guest.copy_in``).
    """
    fd = 3
    opts = f"trans=fd,rfdno={fd},wfdno={fd},version=9p2000.L,msize={msize}"
    if options:
        opts += "," + options
    interpreter = python or os.path.realpath(sys.executable)
    return [interpreter, "-I", "-S", relay, device, str(fd), "--",
            "mount", "-t", "9p", "-o", opts, "none", mountpoint]
