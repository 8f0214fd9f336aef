"""sigpoll's backends on three loops in one run: sigpoll's own, uvloop with attach(), stock
asyncio with attach().

    python bench/bench_backends.py [--mib 32] [--ops 2000] [--rounds 3] [--quick] [--json]

The point (issue 18): a uvloop user who calls ``sigpoll.attach()`` gets the race-free
devices at uvloop's speed.  Each backend runs in the process under test on the host loop;
its peer runs in a separate process, the same peer for every host:

- ``console_write``: :func:`sigpoll.tty.open_console` writes ``--mib`` MiB into a raw pty's
  slave in 64 KiB pieces, awaiting drain; a C reader drains the master.  MB/s.
- ``console_read``: a C writer floods the master with ``--mib`` MiB; the console reads it.
- ``virtio``: a :class:`sigpoll.virtio.VhostUserBackend` console; a Python frontend
  process (memfd memory, eventfd kicks) sends ``--mib`` MiB guest-to-host through port 0's
  transmit ring in 16 KiB buffers, 32 in flight.  The kick fds are the backend's devices.
- ``ninep_read`` / ``ninep_small``: a :class:`sigpoll.ninep.NinepServer` on a unix socket;
  sigpoll's 9P client (on sigpoll's loop, in its process) reads a ``--mib`` MiB file, 8
  Treads in flight, and does ``--ops`` rounds of walk+getattr+clunk, 16 in flight.

On ``uvloop+attach`` and ``asyncio+attach`` the host calls ``sigpoll.attach()`` first, so
the console's fds and the kick fds go to the attached poller (``sigpoll.device_watcher``);
the 9P server's socket is an ordinary asyncio transport on every host.  Every measurement
is a fresh process; the hosts take turns within each round and the median round is
reported, with the process's CPU time per MiB (or per op) beside the rate: steadier than
rates on a shared machine.  Ratios are host / sigpoll (above 1.00: faster than sigpoll's
own loop; for CPU, below 1.00 is better).  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if (HERE.parent / "sigpoll" / "__init__.py").exists():
    sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
# The test peers (a vhost-user frontend, the virtio test backend runner) live with the tests.
sys.path.insert(0, str(HERE.parent / "tests"))

import sigpoll  # noqa: E402

__all__ = ["BACKENDS", "HOSTS", "main"]

HOSTS = ("sigpoll", "uvloop+attach", "asyncio+attach")
BACKENDS = ("console_write", "console_read", "virtio", "ninep_read", "ninep_small")
CHUNK = 64 * 1024
VIRTIO_BUF = 16 * 1024
VIRTIO_INFLIGHT = 32


def new_host(name: str) -> asyncio.AbstractEventLoop:
    if name == "sigpoll":
        return sigpoll.new_event_loop()
    if name == "uvloop+attach":
        import uvloop

        return uvloop.new_event_loop()
    if name == "asyncio+attach":
        return asyncio.SelectorEventLoop()
    raise ValueError(name)


# -- the backends, in the process under test ---------------------------------------------------
#
# Each returns (seconds, CPU seconds of this process) around the transfer itself, set-up
# (compiling the C peers, writing the 9P file, handshakes) left out.


class _Span:
    """Wall clock and this process's CPU time (all threads) between start() and stop()."""

    def start(self) -> None:
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> tuple[float, float]:
        return time.perf_counter() - self.t0, time.process_time() - self.c0


async def _console_write(work: str, nbytes: int, _ops: int) -> tuple[float, float]:
    import tty

    from bench_console import READER_C, _compile
    from sigpoll import tty as stty

    reader = _compile(work, "reader", READER_C)
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    peer = subprocess.Popen([reader], stdin=master, stdout=subprocess.PIPE)
    os.close(master)
    data = bytes(range(256)) * (CHUNK // 256)
    _, writer = await stty.open_console(slave, close_fds=False)
    span = _Span()
    span.start()
    left = nbytes
    while left > 0:
        writer.write(data[: min(left, CHUNK)])
        left -= min(left, CHUNK)
        await writer.drain()
    writer.close()
    await writer.wait_closed()
    os.close(slave)
    out, _ = await asyncio.get_running_loop().run_in_executor(None, peer.communicate)
    result = span.stop()
    assert int(out) == nbytes, (out, nbytes)
    return result


async def _console_read(work: str, nbytes: int, _ops: int) -> tuple[float, float]:
    import tty

    from bench_console import WRITER_C, _compile
    from sigpoll import tty as stty

    writer_exe = _compile(work, "writer", WRITER_C)
    master, slave = os.openpty()
    tty.setraw(slave)
    tty.setraw(master)
    reader, _ = await stty.open_console(slave, close_fds=False, limit=1 << 20)
    span = _Span()
    span.start()
    peer = subprocess.Popen([writer_exe, str(nbytes)], stdout=master)
    got = 0
    while got < nbytes:
        got += len(await reader.read(1 << 20))
    result = span.stop()
    await asyncio.get_running_loop().run_in_executor(None, peer.wait)
    os.close(master)
    os.close(slave)
    return result


async def _virtio(work: str, nbytes: int, _ops: int) -> tuple[float, float]:
    from sigpoll.virtio import ConsoleDevice, VhostUserBackend
    from support.virtio import serving

    path = os.path.join(work, "vu.sock")
    device = ConsoleDevice()
    done: asyncio.Future[tuple[float, float]] = asyncio.get_running_loop().create_future()
    span = _Span()
    got = 0

    class Sink(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            nonlocal got
            got += len(data)
            if got >= nbytes and not done.done():
                done.set_result(span.stop())

    async with serving(VhostUserBackend(device), path):
        device.ports[0].connect(Sink)
        peer = subprocess.Popen([sys.executable, __file__, "--virtio-frontend", path, str(nbytes)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert peer.stdin is not None and peer.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, peer.stdout.readline)
        assert line.strip() == b"ready", line
        span.start()
        peer.stdin.write(b"go\n")
        peer.stdin.flush()
        result = await asyncio.wait_for(done, 300)
        await asyncio.get_running_loop().run_in_executor(None, peer.wait)
    return result


def _virtio_frontend(path: str, nbytes: int) -> None:
    """The guest side of the virtio bench (its own process): push bytes guest-to-host."""
    from support.vhost_frontend import Frontend

    fe = Frontend(path, reply_ack=True, mem_size=16 << 20)
    fe.handshake()
    for i in (0, 1):
        fe.setup_ring(i, num=64)
        fe.set_kick(i)
        fe.enable(i)
    keep = fe._brk
    payload = bytes(range(256)) * (VIRTIO_BUF // 256)
    print("ready", flush=True)
    sys.stdin.readline()  # the host's clock starts
    sent = inflight = 0
    while sent < nbytes or inflight:
        while inflight < VIRTIO_INFLIGHT and sent < nbytes:
            n = min(VIRTIO_BUF, nbytes - sent)
            fe.add(1, out=payload[:n])
            sent += n
            inflight += 1
        fe.kick(1)
        inflight -= len(fe.wait_used(1, 1, timeout=60))
        if not inflight:
            fe.reset_allocator(keep)
        elif fe._brk > (12 << 20):  # let the ring drain before reusing memory
            inflight -= len(fe.wait_used(1, inflight, timeout=60))
            fe.reset_allocator(keep)
    fe.close()


async def _ninep(work: str, nbytes: int, ops: int, which: str) -> tuple[float, float]:
    from sigpoll.ninep import NinepServer

    export = os.path.join(work, "export")
    os.makedirs(os.path.join(export, "sub", "deep"), exist_ok=True)
    with open(os.path.join(export, "sub", "deep", "f"), "wb") as f:
        f.write(b"x")
    with open(os.path.join(export, "big"), "wb") as f:
        f.write(os.urandom(nbytes))
    path = os.path.join(work, "9p.sock")
    server = NinepServer(export, msize=65536)
    await server.start_unix(path)
    try:
        # The client reports the seconds of its workload alone; this process's CPU is read
        # around the client's whole life (its start-up costs the server nothing).
        peer = subprocess.Popen([sys.executable, __file__, "--ninep-client", path, which,
                                 str(nbytes), str(ops)], stdout=subprocess.PIPE)
        cpu0 = time.process_time()
        out, _ = await asyncio.get_running_loop().run_in_executor(None, peer.communicate)
        return float(out), time.process_time() - cpu0
    finally:
        await server.close()


async def _ninep_client(path: str, which: str, nbytes: int, ops: int) -> float:
    """The 9P client of the bench (its own process, sigpoll's loop); returns seconds."""
    from sigpoll.ninep import Client
    from sigpoll.ninep import _codec as c

    cl = await Client.connect_unix(path, msize=65536)
    t0 = time.perf_counter()
    if which == "read":
        fid = await cl.walk("big")
        await cl.rpc(c.Tlopen(fid, 0))
        chunk = cl.msize - 24
        sem = asyncio.Semaphore(8)

        async def one(off: int) -> int:
            async with sem:
                return len((await cl.rpc(c.Tread(fid, off, chunk))).data)

        got = sum(await asyncio.gather(*(one(o) for o in range(0, nbytes, chunk))))
        assert got == nbytes, (got, nbytes)
    else:
        sem = asyncio.Semaphore(16)

        async def small() -> None:
            async with sem:
                fid = await cl.walk(["sub", "deep", "f"])
                await cl.rpc(c.Tgetattr(fid, c.GETATTR_BASIC))
                await cl.clunk(fid)

        await asyncio.gather(*(small() for _ in range(ops)))
    dt = time.perf_counter() - t0
    await cl.close()
    return dt


_RUNNERS: dict[str, Callable[[str, int, int], Awaitable[tuple[float, float]]]] = {
    "console_write": _console_write,
    "console_read": _console_read,
    "virtio": _virtio,
    "ninep_read": lambda w, n, o: _ninep(w, n, o, "read"),
    "ninep_small": lambda w, n, o: _ninep(w, n, o, "small"),
}


def run_one(backend: str, host: str, nbytes: int, ops: int) -> dict[str, Any]:
    """One measurement, in this process: seconds, CPU seconds, the attached poller's counters."""
    loop = new_host(host)
    counters: dict[str, int] | None = None

    async def main() -> tuple[float, float]:
        nonlocal counters
        with tempfile.TemporaryDirectory() as work:
            if host == "sigpoll":
                return await _RUNNERS[backend](work, nbytes, ops)
            with sigpoll.attach() as attached:
                result = await _RUNNERS[backend](work, nbytes, ops)
                counters = attached.poller_counters().as_dict()
                return result

    try:
        seconds, cpu = loop.run_until_complete(main())
    finally:
        loop.close()
    return {"seconds": seconds, "cpu": cpu, "attached": counters}


# -- the driver -------------------------------------------------------------------------------


def _measure(backend: str, host: str, args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--one", backend, host, "--mib", str(args.mib),
                           "--ops", str(args.ops)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{backend} on {host} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=32, help="MiB per bulk transfer (default 32)")
    ap.add_argument("--ops", type=int, default=2000, help="9P small-op rounds (default 2000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--quick", action="store_true", help="1 round of 4 MiB and 300 ops")
    ap.add_argument("--json", metavar="PATH", help="write the raw numbers here too")
    ap.add_argument("--one", nargs=2, metavar=("BACKEND", "HOST"), help=argparse.SUPPRESS)
    ap.add_argument("--virtio-frontend", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--ninep-client", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.virtio_frontend:
        _virtio_frontend(args.virtio_frontend[0], int(args.virtio_frontend[1]))
        return 0
    if args.ninep_client:
        path, which, n, o = args.ninep_client
        print(sigpoll.run(_ninep_client(path, which, int(n), int(o))))
        return 0
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.mib << 20, args.ops)))
        return 0
    if args.quick:
        args.mib, args.ops, args.rounds = 4, 300, 1
    backends = args.backends.split(",")
    hosts = list(HOSTS)
    try:
        import uvloop  # noqa: F401
    except ImportError:
        print("uvloop is not installed: uvloop+attach skipped", file=sys.stderr)
        hosts.remove("uvloop+attach")

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {b: {h: [] for h in hosts} for b in backends}
    for rnd in range(args.rounds):
        for backend in backends:
            order = hosts[rnd % len(hosts):] + hosts[: rnd % len(hosts)]
            for host in order:
                runs[backend][host].append(_measure(backend, host, args))
    print(f"sigpoll's backends on three hosts, python {sys.version.split()[0]}, "
          f"median of {args.rounds} round(s), {args.mib} MiB / {args.ops} ops")
    print(f"  {'backend':14s} {'host':15s} {'rate':>14s} {'cpu':>14s}  {'rate/sigpoll':>12s} "
          f"{'cpu/sigpoll':>11s}")
    table: dict[str, dict[str, dict[str, float]]] = {}
    for backend in backends:
        unit, per = ("ops/s", args.ops) if backend == "ninep_small" else ("MB/s", (args.mib << 20) / 1e6)
        cpu_unit = "ms/kop" if backend == "ninep_small" else "ms/MB"
        table[backend] = {}
        for host in hosts:
            rs = runs[backend][host]
            seconds = statistics.median(r["seconds"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            rate = per / seconds
            cpu_per = cpu / per * 1e3 * (1000 if backend == "ninep_small" else 1)
            table[backend][host] = {"rate": rate, "cpu_per": cpu_per}
        base = table[backend]["sigpoll"]
        for host in hosts:
            row = table[backend][host]
            row["rate_ratio"] = row["rate"] / base["rate"]
            row["cpu_ratio"] = row["cpu_per"] / base["cpu_per"]
            print(f"  {backend:14s} {host:15s} {row['rate']:9.1f} {unit:5s}"
                  f"{row['cpu_per']:9.2f} {cpu_unit:6s} {row['rate_ratio']:11.2f}x {row['cpu_ratio']:10.2f}x")
    attached = {b: {h: runs[b][h][-1]["attached"] for h in hosts if h != "sigpoll"} for b in backends}
    if args.json:
        Path(args.json).write_text(json.dumps({"python": sys.version.split()[0], "args": vars(args),
                                               "table": table, "runs": runs,
                                               "attached_counters": attached}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
