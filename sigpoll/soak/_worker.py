"""The guest's half of the soak, and the data both halves agree on.

The guest runs this file with its own python3 (it sees the host's root file system, so the
file runs from where sigpoll is installed; only the standard library is used).  It drives
three streams at once until its deadline and then prints one summary line per stream:

* console: numbered lines whose content follows from their number;
* 9P: files written into the share (checked by reading them back, then renamed into place
  for the host to check), and files the host writes, read, checked and removed;
* port: a block stream each way through a virtio-console port, every block derived from its
  number, so a lost, repeated or corrupted block is named, not just counted.

The host imports the generators below, so both sides compute the same bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import threading
import time

__all__ = ["BLOCK", "block", "console_line", "file_content", "main"]

BLOCK = 32 * 1024  #: bytes per port block
_HEAD = struct.Struct("<II")  # block number, payload length (0: the stream ends)


def _stretch(label: str, size: int) -> bytes:
    seed = hashlib.sha256(label.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def console_line(n: int) -> bytes:
    """Line ``n`` of the guest's console stream (without the newline)."""
    return b"C %d %s" % (n, hashlib.sha256(b"console:%d" % n).hexdigest().encode() * 2)


def file_content(kind: str, n: int) -> bytes:
    """File ``n`` of stream ``kind`` ("g": the guest writes, "h": the host writes)."""
    size = 1024 + (n * 7919) % (256 * 1024)
    return _stretch(f"file:{kind}:{n}", size)


def block(direction: str, n: int) -> bytes:
    """Block ``n`` of the port stream ``direction`` ("up": guest to host, "down")."""
    return _stretch(f"port:{direction}:{n}", BLOCK)


def frame(n: int, payload: bytes) -> bytes:
    """A port block on the wire: number, length, payload."""
    return _HEAD.pack(n, len(payload)) + payload


def read_frames(read: object, on_block: object) -> None:
    """Read frames with ``read(n) -> bytes`` until the end frame, calling ``on_block(n, payload)``."""
    buf = b""
    while True:
        while len(buf) < _HEAD.size:
            more = read(1 << 16)  # type: ignore[operator]
            if not more:
                raise EOFError("port closed before the end frame")
            buf += more
        n, size = _HEAD.unpack_from(buf)
        if size == 0:
            return
        while len(buf) < _HEAD.size + size:
            more = read(1 << 16)  # type: ignore[operator]
            if not more:
                raise EOFError("port closed inside a block")
            buf += more
        on_block(n, buf[_HEAD.size : _HEAD.size + size])  # type: ignore[operator]
        buf = buf[_HEAD.size + size :]


class _Out:
    """Whole lines to the console, one write each, whatever thread prints them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def line(self, data: bytes) -> None:
        with self.lock:
            view = memoryview(data + b"\n")
            while view:
                view = view[os.write(1, view) :]


def _console(out: _Out, deadline: float, result: dict[str, int]) -> None:
    n = 0
    while time.monotonic() < deadline:
        out.line(console_line(n))
        n += 1
    result["lines"] = n


def _ninep(share: str, deadline: float, result: dict[str, int]) -> None:
    wrote = wbytes = wbad = read = rbytes = rbad = 0
    n = 0
    while time.monotonic() < deadline:
        data = file_content("g", n)
        tmp = os.path.join(share, f"g{n}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            if f.read() != data:
                wbad += 1  # what the guest wrote did not read back
        os.rename(tmp, os.path.join(share, f"g{n}.dat"))
        wrote += 1
        wbytes += len(data)
        n += 1
        for name in sorted(os.listdir(share)):
            if name.startswith("h") and name.endswith(".dat"):
                path = os.path.join(share, name)
                with open(path, "rb") as f:
                    got = f.read()
                if got != file_content("h", int(name[1:-4])):
                    rbad += 1
                os.unlink(path)
                read += 1
                rbytes += len(got)
    result.update(wrote=wrote, wbytes=wbytes, wbad=wbad, read=read, rbytes=rbytes, rbad=rbad)


def _port(path: str, deadline: float, result: dict[str, int]) -> None:
    fd = os.open(path, os.O_RDWR)
    got = {"blocks": 0, "bad": 0, "next": 0}

    def on_block(n: int, payload: bytes) -> None:
        if n != got["next"] or payload != block("down", n):
            got["bad"] += 1
        got["next"] = n + 1
        got["blocks"] += 1

    def receive() -> None:
        read_frames(lambda size: os.read(fd, size), on_block)

    receiver = threading.Thread(target=receive)
    receiver.start()
    sent = 0
    while time.monotonic() < deadline:
        view = memoryview(frame(sent, block("up", sent)))
        while view:
            view = view[os.write(fd, view) :]
        sent += 1
    os.write(fd, frame(sent, b""))
    receiver.join()
    os.close(fd)
    result.update(sent=sent, received=got["blocks"], bad=got["bad"])


def main(argv: list[str]) -> int:
    """``python3 _worker.py SECONDS SHARE_DIR PORT_DEVICE``: run the guest's streams."""
    seconds, share, port = float(argv[0]), argv[1], argv[2]
    deadline = time.monotonic() + seconds
    out = _Out()
    results: dict[str, dict[str, int]] = {"console": {}, "ninep": {}, "port": {}}
    errors: list[str] = []

    def guarded(name: str, target: object, *args: object) -> threading.Thread:
        def body() -> None:
            try:
                target(*args, deadline, results[name])  # type: ignore[operator]
            except Exception as exc:  # reported on the console: the host counts it as a failure
                errors.append(f"{name}: {exc!r}")

        thread = threading.Thread(target=body, name=name)
        thread.start()
        return thread

    threads = [
        guarded("console", _console, out),
        guarded("ninep", _ninep, share),
        guarded("port", _port, port),
    ]
    for thread in threads:
        thread.join()
    for name, values in results.items():
        out.line(b"END %s %s" % (name.encode(), " ".join(f"{k}={v}" for k, v in sorted(values.items())).encode()))
    for error in errors:
        out.line(b"ERROR " + error.encode())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
