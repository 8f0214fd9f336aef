"""Listening unix sockets that only their owner can reach.

A socket's file mode comes from the process umask at bind time, so a permissive umask would
let other users connect to a guest's vhost-user socket (and hand it memory to map) or to a
port's socket (and read the guest's output).  :func:`listen_unix` binds, narrows the mode,
and only then listens: a connection attempt in between is refused, never accepted.
:func:`peer_allowed` is the second check, on each accepted connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct
from collections.abc import Collection

__all__ = ["listen_unix", "peer_allowed", "peer_uid"]

_UCRED = struct.Struct("iII")  # pid, uid, gid


def listen_unix(path: str, *, backlog: int = 4, mode: int = 0o600) -> socket.socket:
    """A non-blocking listening socket at ``path`` with file mode ``mode``.

    A stale socket file at ``path`` is replaced; any other file there is an error
    (:class:`FileExistsError`), so a typo cannot delete a user's file.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process on the other end of a connected unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(creds)[1])


def peer_allowed(sock: socket.socket, allow_uids: Collection[int] = ()) -> bool:
    """Whether the peer is this process's own user, root, or one of ``allow_uids`` (a jailed
    guest's uid, say)."""
    try:
        uid = peer_uid(sock)
    except OSError:
        return False
    return uid in (0, os.geteuid()) or uid in allow_uids
