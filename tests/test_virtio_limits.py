"""A hostile vhost-user frontend against the real backend in its own process.

Each test starts ``python -m sigpoll.virtio console`` and plays a frontend that attacks it
the way docs/reliability.md says it cannot: memory that shrinks under the backend (SIGBUS),
descriptor chains that name the same buffer again and again (amplification), and replies
left unread (a blocked loop).  Each measures the backend process from outside: whether it
lives, its peak RSS (VmHWM), whether its other ports keep moving, how long SIGTERM takes.
"""

from __future__ import annotations

import contextlib
from contextlib import closing
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sigpoll.virtio._frontend import ConsoleDriver, Frontend
from sigpoll.virtio._testing import recv_exactly
from sigpoll.virtio._vhost_user import Request, encode_message

MiB = 1 << 20


class Backend:
    """``python -m sigpoll.virtio console`` with port 0 and a port "data" on unix sockets."""

    def __init__(self, tmp: str, python_flags: list[str] = ()) -> None:  # type: ignore[assignment]
        self.sock = os.path.join(tmp, "vu.sock")
        self.port0 = os.path.join(tmp, "port0.sock")
        self.data = os.path.join(tmp, "data.sock")
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, *python_flags, "-m", "sigpoll.virtio", "console", "--socket", self.sock,
             "--port0", f"unix:{self.port0}", "--port", f"data=unix:{self.data}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err)
        wait_for(lambda: all(os.path.exists(p) for p in (self.sock, self.port0, self.data))
                 or self.proc.poll() is not None, "the backend's sockets")
        assert self.proc.poll() is None, self.stderr()

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def peak_rss(self) -> int:
        """The backend's VmHWM in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def connect(self, path: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        return s

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._err.close()


@contextlib.contextmanager
def backend(tmp_path: Any, python_flags: list[str] = ()) -> Iterator[Backend]:  # type: ignore[assignment]
    b = Backend(str(tmp_path), python_flags)
    try:
        yield b
    finally:
        b.close()


def wait_for(pred: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


@contextlib.contextmanager
def console(b: Backend, mem_size: int = 4 * MiB, *, high: int = 0) -> Iterator[tuple[Frontend, ConsoleDriver]]:
    """A frontend with the console driver's handshake done (ports 0 and 1), for the block.
    With ``high``, everything allocated after the rings and the first control buffers lies
    from there up."""
    fe = Frontend(b.sock, mem_size=mem_size)
    try:
        fe.handshake()
        drv = ConsoleDriver(fe, 2)
        drv.start()
        if high:
            fe.reset_allocator(high)
        drv.poll(lambda ev: drv.names() == {1: "data"})
        yield fe, drv
    finally:
        fe.close()


def healthy_session(b: Backend) -> None:
    """The next frontend is served: bytes go both ways on port 0."""
    with console(b) as (fe, drv), closing(b.connect(b.port0)) as client:
        drv.poll(lambda ev: drv.host_open(0))
        drv.write(0, b"hello from the next guest\n")
        assert recv_exactly(client, 26) == b"hello from the next guest\n"
        client.sendall(b"typed\n")
        assert drv.read(0, 6) == b"typed\n"


# -- memory that shrinks under the backend ---------------------------------------------------

@pytest.mark.parametrize("python_flags", [[], ["-X", "faulthandler"]], ids=["plain", "faulthandler"])
@pytest.mark.parametrize("where", ["rings", "guest-to-host buffer", "host-to-guest buffer"])
def test_memory_truncated_under_the_backend_drops_the_frontend_not_the_backend(
        tmp_path: Any, where: str, python_flags: list[str]) -> None:
    """The frontend truncates its memory fd after SET_MEM_TABLE, then makes the backend
    touch the vanished pages: through a ring index (a memoryview load), through a copy of
    guest output, through a copy of host input.  The backend must live, drop that
    frontend, and serve the next one."""
    with backend(tmp_path, python_flags) as b:
        with console(b, high=2 * MiB) as (fe, drv), contextlib.ExitStack() as cleanup:
            if where == "rings":
                fe.add(1, out=b"x" * 4096)
                os.ftruncate(fe.memfd, 0)
                fe.kick(1)
            elif where == "guest-to-host buffer":
                fe.add(1, out=b"x" * 4096)  # the buffer lies above 2 MiB, the rings below
                os.ftruncate(fe.memfd, 1 * MiB)
                fe.kick(1)
            else:
                # Port 0's receive buffers were posted above 2 MiB; the host's bytes land there.
                client = cleanup.enter_context(closing(b.connect(b.port0)))
                drv.poll(lambda ev: drv.host_open(0))
                os.ftruncate(fe.memfd, 1 * MiB)
                client.sendall(b"y" * 10000)
            # From here on the frontend must not touch its own memory: it would die of it too.
            wait_for(lambda: "took its memory away" in b.stderr() or b.proc.poll() is not None,
                     "the backend dropping the frontend")
            assert b.proc.poll() is None, f"backend died ({b.proc.returncode}): {b.stderr()}"
        healthy_session(b)
        assert b.proc.poll() is None
        assert "Traceback" not in b.stderr() and "Fatal Python error" not in b.stderr(), b.stderr()


def test_a_bus_error_outside_guest_memory_still_kills(tmp_path: Any) -> None:
    """The guard only answers for guest memory: any other SIGBUS goes to the previous
    handler (faulthandler here, which reports it) and then kills, as without sigpoll."""
    script = f"""
import mmap, os
from sigpoll.virtio._memory import GuestMemory
from sigpoll.virtio._vhost_user import MemoryRegion
fd = os.memfd_create("guest")
os.ftruncate(fd, 1 << 20)
mem = GuestMemory.map_fds([MemoryRegion(0, 1 << 20, 0, 0)], [fd])   # installs the guard
other = os.memfd_create("not-guest")
os.ftruncate(other, 1 << 20)
mm = mmap.mmap(other, 1 << 20)
os.ftruncate(other, 0)
print("touching", flush=True)
mm[4096]
print("survived", flush=True)
"""
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, timeout=60)
    assert out.returncode == -signal.SIGBUS, (out.returncode, out.stderr)
    assert b"touching" in out.stdout and b"survived" not in out.stdout
    assert b"Fatal Python error: Bus error" in out.stderr


# -- descriptor amplification ----------------------------------------------------------------

def _stopped_or_broken(b: Backend, fe: Frontend, index: int, want: int) -> Callable[[], bool]:
    got: list[object] = []

    def check() -> bool:
        got.extend(fe.used(index))
        return len(got) >= want or "broken" in b.stderr() or b.proc.poll() is not None

    return check


def test_one_chain_naming_the_same_megabyte_512_times_is_refused_not_copied(tmp_path: Any) -> None:
    """512 indirect descriptors, each the same 1 MiB of a 4 MiB guest: 512 MiB to copy.
    The chain cap (1 MiB per chain, repeats counted) breaks the queue instead; the
    backend's peak RSS moves by no more than the port bound (docs/reliability.md)."""
    with backend(tmp_path) as b:
        with console(b) as (fe, drv):
            buf = fe.alloc(MiB, 4096)
            fe.mem[buf : buf + MiB] = b"A" * MiB
            before = b.peak_rss()
            fe.add_chain(1, [(buf, MiB, 0)] * 512, indirect=True)
            fe.kick(1)
            wait_for(_stopped_or_broken(b, fe, 1, 1), "the backend taking or refusing the chain")
            assert b.proc.poll() is None, b.stderr()
            grown = b.peak_rss() - before
            print(f"peak RSS grew by {grown / MiB:.2f} MiB")
            assert grown < 16 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB"
            assert "bytes to read" in b.stderr()
        healthy_session(b)


def test_a_port_stops_taking_buffers_while_its_backlog_is_full(tmp_path: Any) -> None:
    """Chains of exactly the cap (16 descriptors on the same 64 KiB) keep coming on a port
    nobody reads: the backend takes at most its backlog and leaves the rest in the ring,
    first with no host client, then with a client that connects and never reads."""
    with backend(tmp_path) as b:
        with console(b, mem_size=8 * MiB) as (fe, drv):
            buf = fe.alloc(64 << 10, 4096)
            fe.mem[buf : buf + (64 << 10)] = os.urandom(64 << 10)
            tx = drv.rx(1) + 1
            before = b.peak_rss()
            for _ in range(24):
                fe.add_chain(tx, [(buf, 64 << 10, 0)] * 16, indirect=True)
            fe.kick(tx)
            used = fe.wait_used(tx, 1, timeout=30)
            time.sleep(1.0)  # give it the chance to take more than it should (never a timing)
            used += fe.used(tx)
            assert len(used) == 1, f"{len(used)} chains of 1 MiB taken by a port nobody reads"
            client = b.connect(b.data)  # reads nothing, for now (closed with the test's exit)
            drv.poll(lambda ev: drv.host_open(1))
            drv.open(1)
            time.sleep(1.0)
            used += fe.used(tx)
            assert len(used) < 24, "a client that never reads took every chain"
            grown = b.peak_rss() - before
            print(f"peak RSS grew by {grown / MiB:.2f} MiB, {len(used)} chains taken")
            assert grown < 32 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB ({len(used)} chains taken)"
            # Nothing was dropped: once the client reads, every chain's 1 MiB arrives.
            expected = bytes(fe.mem[buf : buf + (64 << 10)]) * 16
            for i in range(24):
                assert recv_exactly(client, MiB) == expected, f"chain {i}"
                used += fe.used(tx)
            used += fe.wait_used(tx, 24 - len(used), timeout=30)
            assert len(used) == 24
            client.close()
        assert b.proc.poll() is None


# -- replies the frontend never reads --------------------------------------------------------

def _flood_unread_requests(fe: Frontend) -> int:
    """Send GET_FEATURES (each wants a reply) without reading, until the backend stops
    taking them: the socket stays full for half a second (it has replies it cannot send)."""
    fe.sock.setblocking(False)
    sent = 0
    request = encode_message(Request.GET_FEATURES)
    while sent < 1_000_000:
        try:
            fe.sock.send(request)
            sent += 1
        except BlockingIOError:
            _, writable, _ = select.select([], [fe.sock], [], 0.5)
            if not writable:
                return sent
    raise AssertionError("the backend took a million requests without its replies being read")


def test_a_frontend_that_never_reads_replies_does_not_stall_the_ports(tmp_path: Any) -> None:
    """With replies piling up unread, the backend's loop must stay free: port 0 and the
    data port keep moving both ways (on a loop blocked in sendall nothing would move until
    the frontend is dropped)."""
    with backend(tmp_path) as b:
        with console(b) as (fe, drv), closing(b.connect(b.port0)) as con, closing(b.connect(b.data)) as data:
            drv.poll(lambda ev: drv.host_open(0) and drv.host_open(1))
            drv.open(1)
            assert _flood_unread_requests(fe) > 0
            # Each step has a deadline well inside the backend's 5 s reply timeout.
            for rnd in range(5):
                drv.write(0, b"console %02d\n" % rnd, timeout=4)
                assert recv_exactly(con, 11) == b"console %02d\n" % rnd
                payload = os.urandom(8192)
                drv.write(1, payload, timeout=4)
                assert recv_exactly(data, len(payload)) == payload
                data.sendall(payload[:4096])
                assert drv.read(1, 4096, timeout=4) == payload[:4096]
            assert b.proc.poll() is None


def test_sigterm_stops_the_backend_within_a_second_while_replies_are_unread(tmp_path: Any) -> None:
    with backend(tmp_path) as b:
        with console(b) as (fe, drv):
            assert _flood_unread_requests(fe) > 0
            time.sleep(0.3)  # the backend is now facing a full socket
            started = time.monotonic()
            b.proc.send_signal(signal.SIGTERM)
            try:
                rc = b.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                rc = None
            took = time.monotonic() - started
            print(f"SIGTERM to exit: {took:.3f} s")
            assert rc == 128 + signal.SIGTERM, (rc, b.stderr())  # the commands' stop status
            # The promise is one second; the deadline here is generous for a busy machine.
            assert took < 2.5, f"SIGTERM took {took:.1f} s to stop the backend"


def test_a_frontend_leaving_replies_unread_is_dropped_and_the_next_one_served(tmp_path: Any) -> None:
    with backend(tmp_path) as b:
        with console(b) as (fe, drv):
            assert _flood_unread_requests(fe) > 0
            wait_for(lambda: "left replies unread" in b.stderr() or b.proc.poll() is not None,
                     "the backend dropping a frontend that does not read", timeout=60)
        healthy_session(b)
        assert "Traceback" not in b.stderr(), b.stderr()


# -- control messages the guest asks for but never collects ---------------------------------

def test_control_requests_whose_answers_are_never_collected_are_bounded(tmp_path: Any) -> None:
    """Each DEVICE_READY makes the device queue a DEVICE_ADD per port for the guest.  A guest
    that keeps sending it and never posts buffers for the answers must not make the backend
    queue without end: past a bound it stops reading the guest's control messages (they
    wait in its ring) until the answers are collected."""
    control = struct.Struct("<IHH")
    with backend(tmp_path) as b, console(b, mem_size=16 * MiB) as (fe, drv):
        before = b.peak_rss()
        added = taken = 0
        while added < 300_000:
            for _ in range(24):
                fe.add(3, out=control.pack(0, 0, 1))  # DEVICE_READY, again and again
            added += 24
            fe.kick(3)
            give_up = time.monotonic() + 2
            while (taken := taken + len(fe.used(3))) < added and time.monotonic() < give_up:
                fe.wait_call(3, 0.01)
            if taken < added:
                break  # the backend stopped taking them: the bound at work
        grown = b.peak_rss() - before
        print(f"{taken} DEVICE_READY taken, peak RSS grew by {grown / MiB:.2f} MiB")
        assert b.proc.poll() is None, b.stderr()
        assert grown < 8 * MiB, f"peak RSS grew by {grown / MiB:.1f} MiB for {taken} control messages"
        # Nothing was lost: as the guest collects the answers, its waiting messages are read.
        answers = 0
        deadline = time.monotonic() + 60
        while taken < added and time.monotonic() < deadline:
            answers += len(fe.used(2))
            for _ in range(len(fe.rings[2].free)):
                fe.add(2, in_len=64)
            fe.kick(2)
            taken += len(fe.used(3))
            fe.wait_call(2, 0.01)
        waiting = added - taken
        assert waiting == 0, f"{waiting} control messages never read after {answers} answers collected"
