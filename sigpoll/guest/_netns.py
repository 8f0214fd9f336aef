"""A private network namespace with a tap device: the wire between a UML guest and the host.

Why: UML's serial lines lose their input for good once the guest's tty throttles them
(``line_throttle`` takes the fd out of UML's epoll set and ``line_unthrottle`` never puts it
back), so 9P over ``trans=fd`` hangs on any reply of about 4 KiB or more.  UML networking
does not have that path.  The namespace keeps the guest's network entirely private: the
tap device, the host's address on it and the guest's live only inside it, and it is
deleted on close.

The host side takes part without moving the whole process: a listening socket is created
inside the namespace by a short-lived thread (``setns`` is per thread) and keeps living
there; UML is started inside it by its ``preexec_fn``.  Needs root and iproute2.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable

__all__ = ["NetNamespace", "NetnsUnavailable"]

_CLONE_NEWNET = 0x40000000
# TEST-NET-1 (RFC 5737): documentation addresses, only ever used inside the namespace.
HOST_ADDRESS = "192.0.2.1"
GUEST_ADDRESS = "192.0.2.2"
PREFIX = 24


class NetnsUnavailable(RuntimeError):
    """A private network namespace cannot be made here (not root, no iproute2, no tun)."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetNamespace:
    """A fresh network namespace holding one tap device for one guest."""

    def __init__(self, tap: str = "tap0") -> None:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2's `ip` is not installed (apt-get install -y iproute2)")
        if os.geteuid() != 0:
            raise NetnsUnavailable("a private network namespace needs root")
        if not os.path.exists("/dev/net/tun"):
            raise NetnsUnavailable("/dev/net/tun is missing")
        self.name = f"sigpoll-{secrets.token_hex(4)}"
        self.tap = tap
        self.host_address = HOST_ADDRESS
        self.guest_address = GUEST_ADDRESS
        self.prefix = PREFIX
        self._fd = -1
        try:
            self._ip("netns", "add", self.name)
            self._ip("-n", self.name, "link", "set", "lo", "up")
            self._ip("-n", self.name, "tuntap", "add", "dev", tap, "mode", "tap")
            self._ip("-n", self.name, "addr", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", tap)
            self._ip("-n", self.name, "link", "set", tap, "up")
            self._fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def guest_args(self) -> list[str]:
        """UML kernel arguments that give the guest an eth0 on the tap device."""
        return [f"eth0=tuntap,{self.tap}"]

    def guest_setup(self) -> list[str]:
        """Shell lines for the guest's init: bring eth0 up with the guest's address."""
        return [
            "ip link set lo up",
            f"ip addr add {self.guest_address}/{self.prefix} dev eth0",
            "ip link set eth0 up",
        ]

    def listen(self, port: int = 0, backlog: int = 16) -> socket.socket:
        """A TCP socket listening on the host's address inside the namespace."""
        result: list[socket.socket | BaseException] = []

        def make() -> None:
            try:
                _setns(self._fd)  # this thread only; it ends right after
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host_address, port))
                sock.listen(backlog)
                result.append(sock)
            except BaseException as exc:  # handed to the caller's thread
                result.append(exc)

        t = threading.Thread(target=make, name="sigpoll-netns")
        t.start()
        t.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def preexec(self, then: Callable[[], None] | None = None) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the child into the namespace (then runs ``then``)."""
        fd = self._fd

        def enter() -> None:
            _setns(fd)
            if then is not None:
                then()

        return enter

    def close(self) -> None:
        """Delete the namespace (and with it the tap device).  Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
