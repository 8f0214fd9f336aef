"""The fixed load generator for the echo benchmark (uvloop's method).

Opens ``--conns`` connections to an echo server and, on each, sends one message of
``--msize`` bytes, waits until all of it has come back, and sends the next, for
``--duration`` seconds.  It prints one JSON object: messages, bytes, seconds and rates.

It is deliberately independent of the loop under test: a plain ``select.epoll`` loop over
non-blocking sockets in its own process, identical for every server it measures, so the
only thing that changes between runs is the server's event loop.

    python bench/echo_client.py --addr 127.0.0.1:25000 --msize 1024 --conns 8 --duration 5
    python bench/echo_client.py --addr /tmp/echo.sock ...
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time

__all__ = ["run_client", "main"]


def _connect(addr: str) -> socket.socket:
    if addr.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(addr)
    else:
        host, _, port = addr.rpartition(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def run_client(addr: str, msize: int, conns: int, duration: float) -> dict[str, float]:
    """Drive ``conns`` echo connections for ``duration`` seconds; return the totals."""
    message = b"x" * msize
    view = memoryview(message)
    buf = bytearray(max(msize, 65536))
    socks = [_connect(addr) for _ in range(conns)]
    ep = select.epoll()
    # Per connection: bytes of the current message still to send / still to receive.
    to_send: dict[int, int] = {}
    to_recv: dict[int, int] = {}
    by_fd: dict[int, socket.socket] = {}
    for s in socks:
        fd = s.fileno()
        by_fd[fd] = s
        to_send[fd] = msize
        to_recv[fd] = msize
        ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
    messages = 0
    start = time.perf_counter()
    deadline = start + duration
    try:
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            for fd, ev in ep.poll(deadline - now):
                s = by_fd[fd]
                if ev & select.EPOLLOUT:
                    left = to_send[fd]
                    try:
                        left -= s.send(view[msize - left :])
                    except BlockingIOError:
                        pass
                    to_send[fd] = left
                    if left == 0:
                        ep.modify(fd, select.EPOLLIN)
                if not ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    continue
                try:
                    n = s.recv_into(buf)
                except BlockingIOError:
                    continue
                if n == 0:
                    raise ConnectionError("server closed the connection")
                left = to_recv[fd] - n
                if left > 0:
                    to_recv[fd] = left
                    continue
                # The whole echo is back: count it and start the next message at once,
                # trying the send directly before falling back to EPOLLOUT.
                messages += 1
                to_recv[fd] = msize
                try:
                    sent = s.send(message)
                except BlockingIOError:
                    sent = 0
                to_send[fd] = msize - sent
                if sent < msize:
                    # Still sending: watch both ways so the echo never backs up behind us.
                    ep.modify(fd, select.EPOLLIN | select.EPOLLOUT)
        elapsed = time.perf_counter() - start
    finally:
        ep.close()
        for s in socks:
            s.close()
    return {
        "messages": messages,
        "bytes": messages * msize,
        "seconds": elapsed,
        "messages_per_s": messages / elapsed,
        "mib_per_s": messages * msize / elapsed / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", required=True, help="host:port or a unix socket path")
    ap.add_argument("--msize", type=int, default=1024, help="message size in bytes")
    ap.add_argument("--conns", type=int, default=8, help="concurrent connections")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds to run")
    args = ap.parse_args(argv)
    result = run_client(args.addr, args.msize, args.conns, args.duration)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
