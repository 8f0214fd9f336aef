"""Listening unix sockets that only their owner can reach, and that never take a path over.

A socket's file mode comes from the process umask at bind time, so a permissive umask would
let other users connect to a guest's vhost-user socket (and hand it memory to map), to a
port's socket (and read the guest's output) or to a 9P server (and read the export).
:func:`listen_unix` binds, narrows the mode, and only then listens: a connection attempt in
between is refused, never accepted.  The listener it returns also checks each connection's
peer (:func:`peer_allowed`) as it is accepted, so even a socket whose mode was widened later
serves only this user and root.

The path itself is handled as carefully: a file that is not a socket is never replaced (a
typo in ``--unix`` must not delete a user's file), a socket some server is still listening
on is never taken over (a second server would otherwise steal the first one's clients, and
unlink its path on exit), and :func:`remove_unix` removes the socket file only while it is
still the one this listener bound.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct

__all__ = ["MAX_PATH", "UnixListener", "listen_unix", "peer_allowed", "peer_uid", "remove_unix"]

_UCRED = struct.Struct("iII")  # pid, uid, gid
#: The longest unix socket path the kernel takes (sun_path is 108 bytes with its NUL).
MAX_PATH = 107
log = logging.getLogger("sigpoll.unixsock")


class UnixListener(socket.socket):
    """A listening unix socket made by :func:`listen_unix`.

    Its :meth:`accept` (which asyncio's servers and ``loop.sock_accept`` call) closes
    connections from peers :func:`peer_allowed` refuses, counting them in :attr:`refused`,
    and returns the next allowed one.
    """

    path: str = ""  #: where it was bound
    owner_only: bool = True
    refused: int = 0  #: connections closed because the peer was another user
    _bound: tuple[int, int] = (0, 0)  # (st_dev, st_ino) of the socket file it bound

    def accept(self) -> tuple[socket.socket, object]:
        """The next connection from an allowed peer (``BlockingIOError`` when none waits)."""
        while True:
            conn, addr = super().accept()
            if not self.owner_only or peer_allowed(conn):
                return conn, addr
            self.refused += 1
            log.warning("%s: refused a connection from uid %s (only this user and root may connect)",
                        self.path, _uid_or_unknown(conn))
            conn.close()


def _uid_or_unknown(conn: socket.socket) -> str:
    try:
        return str(peer_uid(conn))
    except OSError:
        return "?"


def _is_live(path: str) -> bool:
    """Whether some process accepts connections on the socket file at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (BlockingIOError, InterruptedError):
        return True  # its backlog is full: it is listening
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except PermissionError:
        return True  # someone else's socket: not ours to remove
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def listen_unix(path: str, *, backlog: int = 4, mode: int = 0o600,
                owner_only: bool = True) -> UnixListener:
    """A non-blocking listening socket at ``path`` with file mode ``mode``.

    A stale socket file at ``path`` (nobody listening) is replaced.  Any other file there is
    a :class:`FileExistsError` ("exists and is not a socket"), and a socket that a live
    server listens on is an ``OSError`` with ``errno.EADDRINUSE``: neither is touched.
    With ``owner_only`` (the default) connections from other users are refused as they are
    accepted (see :class:`UnixListener`).
    """
    if len(os.fsencode(path)) > MAX_PATH:
        raise OSError(errno.ENAMETOOLONG, f"a unix socket path is at most {MAX_PATH} bytes", path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        if _is_live(path):
            raise OSError(errno.EADDRINUSE, "a server is already listening on this socket", path)
        os.unlink(path)
    sock = UnixListener(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.path, sock.owner_only = path, owner_only
    try:
        sock.bind(path)
        os.chmod(path, mode)
        st = os.lstat(path)
        sock._bound = (st.st_dev, st.st_ino)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


def remove_unix(sock: socket.socket, path: str | None = None) -> bool:
    """Remove the socket file ``sock`` was bound to, if it is still that file.

    ``path`` defaults to the listener's own.  Another program's socket (or any file) that
    has replaced ours since is left alone.  Returns whether a file was removed.
    """
    if path is None:
        path = getattr(sock, "path", "") or ""
    if not path:
        return False
    bound = getattr(sock, "_bound", None)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or (bound and (st.st_dev, st.st_ino) != bound):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        return True
    return False


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process on the other end of a connected unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(creds)[1])


def peer_allowed(sock: socket.socket) -> bool:
    """Whether the peer is this process's own user or root."""
    try:
        uid = peer_uid(sock)
    except OSError:
        return False
    return uid in (0, os.geteuid())
