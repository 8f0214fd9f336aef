"""A private network namespace with a tap device: the wire between a UML guest and the host.

Why a network: UML's serial lines lose their input for good once the guest's tty throttles
them (``line_throttle`` takes the fd out of UML's epoll set and ``line_unthrottle`` never
puts it back), so 9P over ``trans=fd`` hangs on any reply of about 4 KiB or more.  UML
networking does not have that path.

The namespace is held by a file descriptor and nothing else: it has no name under
/run/netns, so there is nothing to delete and nothing a killed process can leave behind.  It
lives while this object's fd, a socket made inside it, or a process in it (the guest's UML)
does, and the kernel frees it with its tap device when the last of them goes.  The host takes
part without moving the whole process: a short-lived thread makes the namespace (``unshare``
is per thread) and configures it with plain ioctls (no iproute2), and listening sockets are
made by threads that join it for a moment; the jail launcher puts UML into it
(``netns_fd``).  The tap device belongs to the guest's uid, so an unprivileged UML can attach
to it.  Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and /dev/net/tun.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["NetNamespace", "NetnsUnavailable"]

_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)  # resolved once, in this process
_CLONE_NEWNET = 0x40000000
_TUNSETIFF, _TUNSETPERSIST, _TUNSETOWNER, _TUNSETGROUP = 0x400454CA, 0x400454CB, 0x400454CC, 0x400454CE
_IFF_UP, _IFF_TAP, _IFF_NO_PI = 0x1, 0x0002, 0x1000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _SIOCSIFADDR, _SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
# TEST-NET-1 (RFC 5737): documentation addresses, only ever used inside the namespace.
HOST_ADDRESS = "192.0.2.1"
GUEST_ADDRESS = "192.0.2.2"
PREFIX = 24


class NetnsUnavailable(RuntimeError):
    """A private network namespace cannot be made here (not root, no tun)."""


def _errno_check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a thread of its own (one whose namespace may change) and return its result."""
    result: list[_T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    t = threading.Thread(target=body, name="sigpoll-netns")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s24s", name.encode(), payload)


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(address))


def _set_up(sock: socket.socket, name: str) -> None:
    flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, _ifreq(name)))[1]
    fcntl.ioctl(sock, _SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | _IFF_UP)))


class NetNamespace:
    """A fresh network namespace holding one tap device for one guest.

    ``owner`` (uid, gid) may attach to the tap device without privileges: the guest's UML.
    """

    def __init__(self, tap: str = "tap0", *, owner: tuple[int, int] | None = None) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("a private network namespace needs root")
        if not os.path.exists("/dev/net/tun"):
            raise NetnsUnavailable("/dev/net/tun is missing")
        self.tap = tap
        self.host_address = HOST_ADDRESS
        self.guest_address = GUEST_ADDRESS
        self.prefix = PREFIX
        self._owner = owner
        self._fd = -1
        try:
            self._fd = _in_thread(self._create)
        except OSError as exc:
            raise NetnsUnavailable(f"cannot make the guest's network: {exc.strerror or exc}") from None

    @property
    def fd(self) -> int:
        """The namespace's file descriptor (-1 once closed)."""
        return self._fd

    def _create(self) -> int:
        _errno_check(_libc.unshare(_CLONE_NEWNET), "unshare")  # this thread only; it ends right after
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(tun, _TUNSETIFF, _ifreq(self.tap, struct.pack("H", _IFF_TAP | _IFF_NO_PI)))
                if self._owner is not None:
                    fcntl.ioctl(tun, _TUNSETOWNER, self._owner[0])
                    fcntl.ioctl(tun, _TUNSETGROUP, self._owner[1])
                fcntl.ioctl(tun, _TUNSETPERSIST, 1)  # until the namespace goes
            finally:
                os.close(tun)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                _set_up(s, "lo")
                fcntl.ioctl(s, _SIOCSIFADDR, _ifreq(self.tap, _sockaddr_in(HOST_ADDRESS)))
                netmask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - PREFIX)) & 0xFFFFFFFF))
                fcntl.ioctl(s, _SIOCSIFNETMASK, _ifreq(self.tap, _sockaddr_in(netmask)))
                _set_up(s, self.tap)
        except BaseException:
            os.close(fd)
            raise
        return fd

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
        if self._fd < 0:
            raise ValueError("the namespace is closed")
        fd = self._fd

        def make() -> socket.socket:
            _errno_check(_libc.setns(fd, _CLONE_NEWNET), "setns")  # this thread only
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host_address, port))
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            return sock

        return _in_thread(make)

    def close(self) -> None:
        """Let go of the namespace (the kernel frees it once nothing else holds it).  Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
