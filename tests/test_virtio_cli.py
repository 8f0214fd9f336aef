"""``python -m sigpoll.virtio console`` as a subprocess, driven by the Python frontend.

Port 0 goes through the command's stdin/stdout, a named port through a unix socket; two
frontends are served one after another (the first leaves after its socket client, the
second while its client is still connected), and SIGTERM ends the command cleanly.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from sigpoll.virtio._frontend import ConsoleDriver, Frontend


def _wait_for(pred: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def _read_exactly(fd: int, n: int, timeout: float = 10.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"{len(got)} of {n} bytes")
        chunk = os.read(fd, n - len(got))
        if not chunk:
            raise EOFError(f"{len(got)} of {n} bytes, then EOF")
        got += chunk
    return got


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError(f"{len(got)} of {n} bytes, then EOF")
        got += chunk
    return bytes(got)


def _session(sock: str, data_sock: str, proc: subprocess.Popen[bytes], n: int) -> tuple[Frontend, ConsoleDriver, socket.socket]:
    """One frontend: port 0 both ways over stdio, then the data port both ways."""
    assert proc.stdin is not None and proc.stdout is not None
    fe = Frontend(sock, mem_size=16 << 20)
    fe.handshake()
    drv = ConsoleDriver(fe, 2)
    drv.start()
    drv.poll(lambda ev: drv.names() == {1: "data"} and drv.host_open(0))
    # port 0: guest -> stdout, stdin -> guest
    drv.write(0, b"from guest %d\n" % n)
    assert _read_exactly(proc.stdout.fileno(), 13) == b"from guest %d\n" % n
    proc.stdin.write(b"typed %d\n" % n)
    proc.stdin.flush()
    assert drv.read(0, 8) == b"typed %d\n" % n
    # the named port, through the unix socket
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(data_sock)
    drv.poll(lambda ev: drv.host_open(1))  # the client's arrival opened the host side
    drv.open(1)
    up = os.urandom(100_000)
    drv.write(1, up)
    assert _recv_exactly(client, len(up)) == up
    down = os.urandom(50_000)
    client.sendall(down)
    assert drv.read(1, len(down)) == down
    return fe, drv, client


@pytest.mark.parametrize("extra", [[], ["--busy-poll-us", "200"]])
def test_cli_serves_stdio_and_a_unix_port_to_frontends_one_after_another(
        tmp_path: Any, extra: list[str]) -> None:
    sock, data_sock = str(tmp_path / "vu.sock"), str(tmp_path / "data.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sigpoll.virtio", "console", "--socket", sock, "--port", f"data=unix:{data_sock}",
         *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: os.path.exists(sock) and os.path.exists(data_sock) or proc.poll() is not None,
                  "the command's sockets")
        assert proc.poll() is None

        # First frontend: the socket client leaves first; the guest sees the host close.
        fe, drv, client = _session(sock, data_sock, proc, 1)
        client.close()
        drv.poll(lambda ev: not drv.host_open(1))
        fe.close()

        # Second frontend (a rebooted guest): the same stdio, the next socket client; this
        # time the frontend leaves first and the client reads EOF.
        fe, drv, client = _session(sock, data_sock, proc, 2)
        fe.close()
        assert client.recv(1) == b""
        client.close()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "Traceback" not in err, err
        assert not os.path.exists(sock) and not os.path.exists(data_sock)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def test_cli_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Any) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    out = subprocess.run(
        [sys.executable, "-m", "sigpoll.virtio", "console", "--socket", str(tmp_path / "vu.sock"),
         "--port", f"data=unix:{precious}"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "not a socket" in out.stderr and "Traceback" not in out.stderr
    assert precious.read_text() == "keep me"
    assert not (tmp_path / "vu.sock").exists()


def test_cli_refuses_a_bad_busy_poll_ceiling(tmp_path: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sigpoll.virtio", "console", "--socket", str(tmp_path / "vu.sock"),
         "--busy-poll-us", "lots"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "--busy-poll-us" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "vu.sock").exists()
