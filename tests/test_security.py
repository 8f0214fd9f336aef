"""Who can reach a guest's sockets: mode 0600 whatever the umask, and a peer-credential check
on every vhost-user frontend (a frontend hands the backend memory to map and write)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import stat
import tempfile
from typing import Any

import pytest

from sigpoll._unixsock import listen_unix, peer_allowed
from sigpoll.virtio import ConsoleDevice, PortSocket, VhostUserBackend

NOBODY = 65534


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_sockets_are_0600_even_with_an_open_umask(tmp_path: Any) -> None:
    old = os.umask(0)
    try:
        backend = VhostUserBackend(ConsoleDevice())
        backend.listen(str(tmp_path / "vhost.sock")).close()
        device = ConsoleDevice(["data"])
        port_socket = PortSocket(device.ports[1], str(tmp_path / "port.sock"))
        port_socket.listen()
        assert _mode(str(tmp_path / "vhost.sock")) == 0o600
        assert _mode(str(tmp_path / "port.sock")) == 0o600
        port_socket.close()
    finally:
        os.umask(old)


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path: Any) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        listen_unix(str(victim))
    assert victim.read_text() == "keep me"


def _connect_as(uid: int, path: str) -> str:
    """Connect from a child process running as ``uid``; say what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        outcome = b"?"
        try:
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(path)
            except PermissionError:
                outcome = b"denied"
            else:
                outcome = b"closed" if s.recv(1) == b"" else b"open"
        except Exception:
            outcome = b"error"
        os.write(w, outcome)
        os._exit(0)
    os.close(w)
    try:
        return os.read(r, 16).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
def test_another_user_cannot_connect_and_is_refused_if_the_mode_is_opened(run: Any, caplog: Any) -> None:
    # A directory the other user can reach (pytest's own tmp dirs are 0700): the socket
    # itself must say no.
    where = tempfile.mkdtemp(prefix="sigpoll-sec-", dir="/tmp")
    os.chmod(where, 0o755)
    path = os.path.join(where, "vhost.sock")
    caplog.set_level(logging.WARNING, "sigpoll")

    async def main() -> None:
        backend = VhostUserBackend(ConsoleDevice())
        backend.listen(path)
        server = asyncio.ensure_future(backend.serve())
        assert await asyncio.to_thread(_connect_as, NOBODY, path) == "denied"
        os.chmod(path, 0o666)  # a careless chmod: the peer check is the second wall
        assert await asyncio.to_thread(_connect_as, NOBODY, path) == "closed"
        assert backend.sessions == 0
        # Refused as the listener accepts it (sigpoll.unixsock), before the backend sees it.
        assert "refused a connection from uid 65534" in caplog.text
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)

    try:
        run(main(), timeout=30)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_peer_allowed_for_our_own_user() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_allowed(a)
