"""9P2000.L: our server against diod, with the same client (ours), in one run.

    python bench/bench_ninep.py [--mib 64] [--ops 2000] [--rounds 3] [--busy-poll-us 500]
                                [--baseline CHECKOUT] [--quick] [--json]

Three servers run as separate processes on loopback TCP (ours via
``python -m sigpoll.ninep serve``, ours again with ``--busy-poll-us`` as ``ours_poll``,
diod via ``diod -f -n -S -U root``; with ``--baseline CHECKOUT``, also the server of
another checkout of this project, as ``base``, to see what a change costs) exporting the
same temporary directory, so none
competes with the client for this process's GIL.  All are asked for msize 65536 (diod's largest), so every Tread/Twrite carries the same
payload.  Workloads, each run ``--rounds`` times with the servers interleaved (median
reported):

- ``read``: one file of ``--mib`` MiB read front to back, 8 Treads in flight.
- ``write``: the same amount written to a new file, 8 Twrites in flight.
- ``small ops``: ``--ops`` rounds of Twalk + Tgetattr + Tclunk on a file two levels deep,
  one round at a time (latency-bound), and the same with 16 rounds in flight.

The table ends with ratios ours / diod and ours_poll / diod (above 1: ours is faster),
and ours / base with ``--baseline``,
each with the lowest and highest per-round ratio beside the median (the spread shows how
noisy the machine was).  A second table gives each server's CPU time per operation (user +
system, all threads, read with ``clock_getcpuclockid`` on the server's pid; a polling
server's spinning counts), and the ratios diod / ours (above 1: ours spends less): steadier than rates on a shared machine, since it does not count
the time a server waited for the CPU.  Nothing is asserted; the exit status is 0 unless
the benchmark itself breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from sigpoll.ninep import Client
from sigpoll.ninep import _codec as c
from sigpoll.ninep._testing import DiodProcess, find_diod_tool, free_port, wait_listening

MSIZE = 65536


_libc = ctypes.CDLL(None, use_errno=True)


def cpu_clock(pid: int) -> int:
    """A clock id that reads the CPU time of process ``pid`` (all its threads)."""
    cid = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(cid)) != 0:
        raise OSError(ctypes.get_errno(), f"clock_getcpuclockid({pid})")
    return cid.value


class OurServer:
    """``python -m sigpoll.ninep serve`` in a process; ``tree``: a checkout whose sigpoll
    (its C core built in place) to run instead of the installed one."""

    def __init__(self, export: str, busy_poll_us: float = 0, tree: str | None = None) -> None:
        self.port = free_port()
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = os.path.abspath(tree)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sigpoll.ninep", "serve", export, "-q",
             "--listen", f"127.0.0.1:{self.port}", "--busy-poll-us", str(busy_poll_us)],
            env=env, cwd=tree)
        if not wait_listening(self.port, self.proc):
            raise RuntimeError("our server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _read(cl: Client, size: int) -> float:
    fid = await cl.walk("big")
    await cl.rpc(c.Tlopen(fid, 0))
    chunk = cl.msize - 24
    offsets = list(range(0, size, chunk))
    t0 = time.perf_counter()
    got = 0
    sem = asyncio.Semaphore(8)

    async def one(off: int) -> int:
        async with sem:
            return len((await cl.rpc(c.Tread(fid, off, chunk))).data)

    got = sum(await asyncio.gather(*(one(o) for o in offsets)))
    dt = time.perf_counter() - t0
    await cl.clunk(fid)
    assert got == size, (got, size)
    return size / dt / 1e6


async def _write(cl: Client, size: int, name: str) -> float:
    d = await cl.walk("")
    await cl.rpc(c.Tlcreate(d, name, 1 | 0o100 | 0o1000, 0o644, 0))
    chunk = cl.msize - 24
    payload = os.urandom(chunk)
    sem = asyncio.Semaphore(8)

    async def one(off: int) -> int:
        async with sem:
            n = min(chunk, size - off)
            return (await cl.rpc(c.Twrite(d, off, payload[:n]))).count

    t0 = time.perf_counter()
    done = sum(await asyncio.gather(*(one(o) for o in range(0, size, chunk))))
    dt = time.perf_counter() - t0
    await cl.clunk(d)
    assert done == size
    return size / dt / 1e6


async def _small(cl: Client, ops: int, inflight: int) -> float:
    sem = asyncio.Semaphore(inflight)

    async def one() -> None:
        async with sem:
            fid = await cl.walk(["sub", "deep", "f"])
            await cl.rpc(c.Tgetattr(fid, c.GETATTR_BASIC))
            await cl.clunk(fid)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(ops)))
    return ops / (time.perf_counter() - t0)


async def _measure(port: int, pid: int, export: str, args: argparse.Namespace,
                   tag: str) -> tuple[dict[str, float], dict[str, float]]:
    """Rates, and the server's CPU µs per operation (per Tread/Twrite for bulk I/O, per
    walk+getattr+clunk round for small ops)."""
    cl = await Client.connect_tcp("127.0.0.1", port, aname=export, msize=MSIZE)
    size = args.mib * 1024 * 1024
    clock = cpu_clock(pid)
    nio = -(-size // (MSIZE - 24))
    jobs = [
        ("read_MBps", lambda: _read(cl, size), nio),
        ("write_MBps", lambda: _write(cl, size, f"w-{tag}"), nio),
        ("small_ops_per_s", lambda: _small(cl, args.ops, 1), args.ops),
        ("small_ops_16_per_s", lambda: _small(cl, args.ops, 16), args.ops),
    ]
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for name, job, nops in jobs:
        c0 = time.clock_gettime(clock)
        rates[name] = await job()
        cpu[name] = (time.clock_gettime(clock) - c0) / nops * 1e6
    await cl.close()
    os.unlink(os.path.join(export, f"w-{tag}"))
    return rates, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--busy-poll-us", type=float, default=500,
                    help="busy-polling ceiling of the ours_poll server (default 500)")
    ap.add_argument("--baseline", metavar="CHECKOUT",
                    help="also run the server of this checkout (its C core built), as base")
    args = ap.parse_args()
    if args.quick:
        args.mib, args.ops, args.rounds = 8, 300, 1
    if find_diod_tool("diod") is None:
        print("diod is not installed (apt-get install diod)", file=sys.stderr)
        return 1
    export = tempfile.mkdtemp(prefix="bench9p-")
    try:
        with open(os.path.join(export, "big"), "wb") as f:
            f.write(os.urandom(args.mib * 1024 * 1024))
        os.makedirs(os.path.join(export, "sub", "deep"))
        open(os.path.join(export, "sub", "deep", "f"), "wb").close()
        servers: dict[str, OurServer | DiodProcess] = {}
        try:
            servers["ours"] = OurServer(export)
            servers["ours_poll"] = OurServer(export, busy_poll_us=args.busy_poll_us)
            if args.baseline:
                servers["base"] = OurServer(export, tree=args.baseline)
            servers["diod"] = DiodProcess(export)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            cpu: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for r in range(args.rounds):
                order = list(servers.items())
                if r % 2:
                    order.reverse()
                for name, server in order:
                    rates, used = asyncio.run(
                        _measure(server.port, server.proc.pid, export, args, name))
                    results[name].append(rates)
                    cpu[name].append(used)
        finally:
            for server in servers.values():
                server.stop()
    finally:
        shutil.rmtree(export, ignore_errors=True)

    def median(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
        return {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]}
                for name, rs in runs.items()}

    med, cpu_med = median(results), median(cpu)
    keys = list(med["diod"])
    ours_names = ("ours", "ours_poll")
    ratios = {o: {k: med[o][k] / med["diod"][k] for k in keys} for o in ours_names}
    # Per round (the servers ran back to back in each): how far the ratio moved.
    spread = {o: {k: [a[k] / b[k] for a, b in zip(results[o], results["diod"])] for k in keys}
              for o in ours_names}
    cpu_ratios = {o: {k: cpu_med["diod"][k] / cpu_med[o][k] for k in keys} for o in ours_names}
    base: dict[str, dict[str, object]] = {}
    if "base" in med:
        base = {k: {"ratio": med["ours"][k] / med["base"][k],
                    "per_round": [a[k] / b[k] for a, b in zip(results["ours"], results["base"])],
                    "cpu_ratio": cpu_med["base"][k] / cpu_med["ours"][k]} for k in keys}
    if args.json:
        print(json.dumps({"median": med, "ratio_over_diod": ratios,
                          "ratio_per_round": spread, "cpu_us_per_op": cpu_med,
                          "cpu_ratio_diod_over": cpu_ratios, "busy_poll_us": args.busy_poll_us,
                          "ours_over_base": base, "baseline": args.baseline,
                          "mib": args.mib, "ops": args.ops, "rounds": args.rounds}))
        return 0
    print(f"9P2000.L over loopback TCP, msize {MSIZE}, {args.mib} MiB, {args.ops} ops, "
          f"median of {args.rounds}; ours_poll: --busy-poll-us {args.busy_poll_us:g}")
    print(f"{'metric':<20}{'ours':>9}{'ours_poll':>11}{'diod':>9}"
          f"{'ours/diod':>11}{'min..max':>12}{'poll/diod':>11}{'min..max':>12}")
    for k in keys:
        cells = "".join(f"{ratios[o][k]:>11.2f}{min(spread[o][k]):>7.2f}..{max(spread[o][k]):.2f}"
                        for o in ours_names)
        print(f"{k:<20}{med['ours'][k]:>9.1f}{med['ours_poll'][k]:>11.1f}{med['diod'][k]:>9.1f}"
              + cells)
    print()
    print("server CPU per operation (µs; bulk: per 64 KiB request, small: per round)")
    print(f"{'metric':<20}{'ours':>9}{'ours_poll':>11}{'diod':>9}{'diod/ours':>11}"
          f"{'diod/poll':>11}")
    for k in keys:
        print(f"{k:<20}{cpu_med['ours'][k]:>9.1f}{cpu_med['ours_poll'][k]:>11.1f}"
              f"{cpu_med['diod'][k]:>9.1f}{cpu_ratios['ours'][k]:>11.2f}"
              f"{cpu_ratios['ours_poll'][k]:>11.2f}")
    if base:
        print()
        print(f"ours against base ({args.baseline}): rate ours/base (min..max per round), "
              "CPU per operation base/ours (above 1: ours is faster / spends less)")
        for k in keys:
            rounds = base[k]["per_round"]
            assert isinstance(rounds, list)
            print(f"{k:<20}{med['base'][k]:>9.1f}{base[k]['ratio']:>11.2f}"
                  f"{min(rounds):>7.2f}..{max(rounds):.2f}{base[k]['cpu_ratio']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
