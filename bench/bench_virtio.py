"""Throughput of sigpoll's virtio console against UML's own fd console, on the same guest.

One run boots User-Mode Linux twice:
  1. virtio: the guest's virtio_console on sigpoll's vhost-user backend; guest-to-host is
     ``cat FILE > /dev/vport0p1``, host-to-guest ``head -c N /dev/vport0p2 > /dev/null``.
  2. baseline: UML's own console (con0=fd:0,fd:1) on a pty served by sigpoll.tty, the
     same two transfers through /dev/console in raw mode.  UML's console path stalls on its
     own side now and then; sigpoll._uml.SigioNudger un-stalls it so the run completes.
Guest-to-host is timed on the host (first byte to last), host-to-guest in the guest
(around ``head``).  Prints MB/s (10^6 bytes/s) and the virtio/baseline ratios.

``--against TREE`` compares two versions of the backend instead: the same guest transfers
through ``python -m sigpoll.virtio console`` run from this checkout and from TREE (another
checkout with its core built, e.g. /work/main), in turns, ``--rounds`` boots each, in one
run.  Both backends run as their own process, the way users run them.

    python bench/bench_virtio.py [--virtio-mib 64] [--baseline-mib 2]
    python bench/bench_virtio.py --against ../main [--virtio-mib 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sigpoll  # noqa: E402
from sigpoll import _uml  # noqa: E402
from sigpoll import tty as stty  # noqa: E402
from sigpoll.virtio import ConsoleDevice, VhostUserBackend, open_port  # noqa: E402

VIRTIO_INIT = """\
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
insmod {module}
while [ ! -e /dev/vport0p2 ] || [ ! -e /dev/hvc0 ]; do sleep 0.1; done
exec </dev/hvc0 >/dev/hvc0 2>&1
stty raw -echo
echo "@@G2H@@"
cat {file} > /dev/vport0p1
echo "@@READY-H2G@@"
t0=$(date +%s%N); head -c {n} /dev/vport0p2 > /dev/null; t1=$(date +%s%N)
echo "@@H2G $((t1 - t0))@@"
echo o > /proc/sysrq-trigger; sleep 30
"""

BASELINE_INIT = """\
#!/bin/sh
mount -t proc proc /proc
stty raw -echo
echo "@@G2H@@"
cat {file}
echo "@@READY-H2G@@"
t0=$(date +%s%N); head -c {n} > /dev/null; t1=$(date +%s%N)
echo "@@H2G $((t1 - t0))@@"
echo o > /proc/sysrq-trigger; sleep 30
"""


async def _marker(reader: asyncio.StreamReader, name: str, timeout: float = 300) -> bytes:
    await asyncio.wait_for(reader.readuntil(f"@@{name}".encode()), timeout)
    return (await asyncio.wait_for(reader.readuntil(b"@@"), timeout))[:-2].strip()


def _virtio_init(tmp: str, n: int) -> str:
    """The guest's init script for the virtio transfers, and the n random bytes it sends."""
    data = os.path.join(tmp, "v.bin")
    if not os.path.exists(data) or os.path.getsize(data) != n:
        with open(data, "wb") as f:
            f.write(os.urandom(n))
    init = os.path.join(tmp, "v.sh")
    module = os.path.join(_uml.modules_dir() or "", "kernel/drivers/char/virtio_console.ko")
    with open(init, "w") as f:
        f.write(VIRTIO_INIT.format(module=module, file=data, n=n))
    os.chmod(init, 0o755)
    return init


async def bench_virtio(tmp: str, n: int) -> tuple[float, float]:
    init = _virtio_init(tmp, n)
    sock = os.path.join(tmp, "vu.sock")
    device = ConsoleDevice(["g2h", "h2g"])
    backend = VhostUserBackend(device)
    backend.listen(sock)
    server = asyncio.ensure_future(backend.serve())
    con, con_w = await open_port(device.ports[0], limit=1 << 20)
    g2h, g2h_w = await open_port(device.ports[1], limit=1 << 22)
    h2g_r, h2g = await open_port(device.ports[2])
    proc = subprocess.Popen(_uml.kernel_command(init, console="null", extra=[f"virtio_uml.device={sock}:3"]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, **_uml.spawn_kwargs(tmpdir=tmp))
    try:
        await _marker(con, "G2H")
        got = 0
        first = await g2h.read(1 << 22)
        t0 = time.perf_counter()
        got = len(first)
        while chunk := await g2h.read(1 << 22):
            got += len(chunk)
        g2h_rate = got / (time.perf_counter() - t0)
        assert got == n, f"virtio g2h: {got} of {n} bytes"
        await _marker(con, "READY-H2G")
        await device.ports[2].wait_guest_open()
        block = os.urandom(1 << 20)
        for _ in range(n >> 20):
            h2g.write(block)
            await h2g.drain()
        ns = int(await _marker(con, "H2G"))
        assert await asyncio.to_thread(proc.wait, 120) == 0
        return g2h_rate, n / (ns / 1e9)
    finally:
        _uml.kill_group(proc)
        for w in (con_w, g2h_w, h2g):
            w.close()
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def bench_baseline(tmp: str, n: int) -> tuple[float, float, int]:
    data = os.path.join(tmp, "b.bin")
    with open(data, "wb") as f:
        f.write(os.urandom(n))
    init = os.path.join(tmp, "b.sh")
    with open(init, "w") as f:
        f.write(BASELINE_INIT.format(file=data, n=n))
    os.chmod(init, 0o755)
    master, path = stty.open_pty()
    slave = os.open(path, os.O_RDWR | os.O_NOCTTY)
    proc = subprocess.Popen(_uml.kernel_command(init), stdin=slave, stdout=slave, **_uml.spawn_kwargs(tmpdir=tmp))
    os.close(slave)
    reader, writer = await stty.open_console(master, limit=1 << 24)
    transport = writer.transport
    nudger = _uml.SigioNudger(asyncio.get_running_loop(), proc.pid,
                              lambda: transport.bytes_read + transport.bytes_written)  # type: ignore[attr-defined]
    nudger.start()
    try:
        await _marker(reader, "G2H")
        assert await reader.readexactly(1) == b"\n"  # end of the marker line (raw: no CR)
        await reader.readexactly(1)  # first data byte: the clock starts
        t0 = time.perf_counter()
        body = await asyncio.wait_for(reader.readexactly(n - 1), 600)
        g2h_rate = (n - 1) / (time.perf_counter() - t0)
        assert len(body) == n - 1
        await _marker(reader, "READY-H2G")
        payload = os.urandom(n)
        writer.write(payload)
        await writer.drain()
        ns = int(await _marker(reader, "H2G", 600))
        writer.write(b"x" * 64)  # in case head stopped short on a partial read (it does not)
        assert await asyncio.to_thread(proc.wait, 120) == 0
        return g2h_rate, n / (ns / 1e9), nudger.nudges
    finally:
        nudger.stop()
        _uml.kill_group(proc)
        writer.close()


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def _wait_path(path: str, proc: asyncio.subprocess.Process) -> None:
    while not os.path.exists(path):
        if proc.returncode is not None:
            raise RuntimeError(f"backend exited with {proc.returncode}")
        await asyncio.sleep(0.02)


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far (schedstat: nanoseconds, not ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


async def bench_backend_process(tmp: str, tree: str, n: int) -> tuple[float, float, float, float]:
    """The virtio transfers through ``python -m sigpoll.virtio console`` run from ``tree``:
    MB/s each way, and the backend's CPU time per MB each way (steadier on a busy machine)."""
    init = _virtio_init(tmp, n)
    sock, g2h_path, h2g_path = (os.path.join(tmp, name) for name in ("vu.sock", "g2h.sock", "h2g.sock"))
    env = dict(os.environ, PYTHONPATH=tree)
    backend = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sigpoll.virtio", "console", "--socket", sock,
        "--port", f"g2h=unix:{g2h_path}", "--port", f"h2g=unix:{h2g_path}",
        cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 20)
    proc = None
    try:
        for path in (sock, g2h_path, h2g_path):
            await _wait_path(path, backend)
        g2h, g2h_w = await asyncio.open_unix_connection(g2h_path, limit=1 << 22)
        h2g_r, h2g = await asyncio.open_unix_connection(h2g_path)
        proc = subprocess.Popen(_uml.kernel_command(init, console="null", extra=[f"virtio_uml.device={sock}:3"]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, **_uml.spawn_kwargs(tmpdir=tmp))
        assert backend.stdout is not None
        await _marker(backend.stdout, "G2H")
        got = len(await g2h.read(1 << 22))
        t0, cpu0 = time.perf_counter(), _cpu_ns(backend.pid)
        while got < n and (chunk := await g2h.read(1 << 22)):
            got += len(chunk)
        g2h_rate = got / (time.perf_counter() - t0)
        g2h_cpu = (_cpu_ns(backend.pid) - cpu0) / (got / 1e6)
        assert got == n, f"virtio g2h: {got} of {n} bytes"
        await _marker(backend.stdout, "READY-H2G")
        block = os.urandom(1 << 20)
        cpu0 = _cpu_ns(backend.pid)
        for _ in range(n >> 20):
            h2g.write(block)
            await h2g.drain()
        ns = int(await _marker(backend.stdout, "H2G"))
        h2g_cpu = (_cpu_ns(backend.pid) - cpu0) / (n / 1e6)
        assert await asyncio.to_thread(proc.wait, 120) == 0
        for w in (g2h_w, h2g):
            w.close()
        return g2h_rate, n / (ns / 1e9), g2h_cpu, h2g_cpu
    finally:
        if proc is not None:
            _uml.kill_group(proc)
        if backend.returncode is None:
            backend.terminate()
        await backend.wait()


async def compare_trees(args: argparse.Namespace) -> None:
    n = args.virtio_mib << 20
    trees = {"this tree": HERE, "against": os.path.abspath(args.against)}
    runs: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench-virtio-") as tmp:
        for rnd in range(args.rounds):
            # Alternate the order so drift in machine load hits both alike.
            order = list(trees) if rnd % 2 == 0 else list(reversed(trees))
            for name in order:
                runs[name].append(await bench_backend_process(tmp, trees[name], n))
    print(f"{'backend (median of ' + str(args.rounds) + ')':<28} {'guest->host':>12} {'host->guest':>12}"
          f" {'g->h CPU/MB':>12} {'h->g CPU/MB':>12}")
    med = {}
    for name, tree in trees.items():
        med[name] = [statistics.median(r[i] for r in runs[name]) for i in range(4)]
        g, h, gc, hc = med[name]
        print(f"{name + ' (' + os.path.basename(tree) + ')':<28} {g / 1e6:>7.1f} MB/s {h / 1e6:>7.1f} MB/s"
              f" {gc / 1e3:>9.0f} us {hc / 1e3:>9.0f} us")
    ours, theirs = med["this tree"], med["against"]
    print(f"{'ratio this / against':<28} {ours[0] / theirs[0]:>11.2f}x {ours[1] / theirs[1]:>11.2f}x"
          f" {ours[2] / theirs[2]:>11.2f}x {ours[3] / theirs[3]:>11.2f}x")
    for name in trees:
        print(f"  {name} rounds (MB/s g->h/h->g): " + ", ".join(f"{r[0] / 1e6:.0f}/{r[1] / 1e6:.0f}" for r in runs[name]))


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--virtio-mib", type=int, default=64)
    p.add_argument("--baseline-mib", type=int, default=2)
    p.add_argument("--against", metavar="TREE", help="compare this checkout's backend with TREE's")
    p.add_argument("--rounds", type=int, default=3, help="boots per backend with --against")
    args = p.parse_args()
    if args.against:
        await compare_trees(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-virtio-") as tmp:
        vg, vh = await bench_virtio(tmp, args.virtio_mib << 20)
        bg, bh, nudges = await bench_baseline(tmp, args.baseline_mib << 20)
    print(f"{'path':<40} {'guest->host':>12} {'host->guest':>12}")
    print(f"{'virtio console (sigpoll vhost-user)':<40} {vg / 1e6:>9.2f} MB/s {vh / 1e6:>9.2f} MB/s")
    print(f"{'UML fd console on a pty (baseline)':<40} {bg / 1e6:>9.2f} MB/s {bh / 1e6:>9.2f} MB/s")
    print(f"{'ratio virtio / baseline':<40} {vg / bg:>11.1f}x {vh / bh:>11.1f}x")
    print(f"(baseline needed {nudges} SIGIO nudges; virtio {args.virtio_mib} MiB, baseline {args.baseline_mib} MiB)")


if __name__ == "__main__":
    sigpoll.run(main())
