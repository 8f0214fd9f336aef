"""A raw 9P2000.L client that a guest runs against its share server (tests only; it runs with
the guest's Python, so standard library only).  It speaks for itself, not for the guest
kernel's v9fs: that is the point (a guest user, or a hostile guest, may do the same).

    python3 raw9p.py [--privileged-port] attach           attach claiming uid 0
    python3 raw9p.py [--privileged-port] open-fifo NAME   attach, walk to NAME, open it; wait

It prints ``ATTACHED`` when the server lets it attach (then ``OPEN-SENT`` for open-fifo) or
``REFUSED ...`` when the server closes or refuses the connection.  ``--privileged-port``
binds a source port below 1024 first (only the guest's root may).
"""

from __future__ import annotations

import socket
import struct
import sys
import time

SERVER = ("192.0.2.1", 5640)
NOFID = 0xFFFFFFFF
TVERSION, TATTACH, RATTACH, TWALK, RWALK, TLOPEN = 100, 104, 105, 110, 111, 12


def _string(text: str) -> bytes:
    return struct.pack("<H", len(text)) + text.encode()


class Client:
    def __init__(self, privileged: bool) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if privileged:
            for port in range(600, 1024):
                try:
                    self.sock.bind(("", port))
                    break
                except OSError:
                    continue
        self.sock.settimeout(10)
        self.sock.connect(SERVER)

    def send(self, kind: int, body: bytes, tag: int = 1) -> None:
        self.sock.sendall(struct.pack("<IBH", 7 + len(body), kind, tag) + body)

    def answer(self) -> int:
        head = self.sock.recv(7, socket.MSG_WAITALL)
        if len(head) < 7:
            raise ConnectionError("the server closed the connection")
        size, kind, _ = struct.unpack("<IBH", head)
        self.sock.recv(size - 7, socket.MSG_WAITALL)
        return kind

    def attach(self) -> bool:
        self.send(TVERSION, struct.pack("<I", 65536) + _string("9P2000.L"), tag=0xFFFF)
        self.answer()
        self.send(TATTACH, struct.pack("<II", 0, NOFID) + _string("root") + _string("") + struct.pack("<I", 0))
        return self.answer() == RATTACH


def main(argv: list[str]) -> None:
    privileged = "--privileged-port" in argv
    args = [a for a in argv if a != "--privileged-port"]
    try:
        client = Client(privileged)
        if not client.attach():
            print("REFUSED (an error reply)", flush=True)
            return
    except (OSError, ConnectionError) as exc:
        print(f"REFUSED ({type(exc).__name__})", flush=True)
        return
    print("ATTACHED", flush=True)
    if args[0] == "open-fifo":
        client.send(TWALK, struct.pack("<IIH", 0, 1, 1) + _string(args[1]))
        assert client.answer() == RWALK
        client.send(TLOPEN, struct.pack("<II", 1, 0))  # the server's open(2) waits for a writer
        print("OPEN-SENT", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1:])
