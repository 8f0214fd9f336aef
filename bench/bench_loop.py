"""Event loop benchmarks: sigpoll's loop against stock asyncio and uvloop, in one run.

Two kinds of measurement, each reported as absolute rates and as ratios:

* echo (uvloop's method): a protocol echo server (``data_received`` writes the data back)
  runs on the loop under test in its own process; one fixed load generator,
  ``bench/echo_client.py``, runs in another process with 8 connections and 1 KiB or
  64 KiB messages.  Rounds alternate between loops so drift hits them all alike; the
  median round is reported.
* micro: ``call_soon`` throughput (1 chain: per-iteration cost; 1000 chains: per-callback
  cost) and timer throughput (1000 chains of ``call_later``), each loop in a fresh process.

    python bench/bench_loop.py                     # everything, default sizes
    python bench/bench_loop.py --quick             # short rounds, for a smoke check
    python bench/bench_loop.py --json out.json     # also write the raw numbers
    python bench/bench_loop.py --check             # exit 1 if sigpoll is slower than asyncio

``sigpoll+sig`` is sigpoll's loop with ordinary sockets registered with O_ASYNC signals as
well (not the default): it measures what a signal per readiness change costs a socket.
uvloop is skipped if it is not installed.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["LOOPS", "main", "make_loop"]

HERE = Path(__file__).resolve().parent
CLIENT = HERE / "echo_client.py"
# Measure the checkout this bench belongs to, even if another copy of sigpoll is installed.
if (HERE.parent / "sigpoll" / "__init__.py").exists():
    sys.path.insert(0, str(HERE.parent))

#: Loops in the order they are measured and printed.
LOOPS = ("sigpoll", "asyncio", "uvloop", "sigpoll+sig")


def make_loop(name: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the named kind."""
    if name == "asyncio":
        return asyncio.SelectorEventLoop()
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if name in ("sigpoll", "sigpoll+sig"):
        from sigpoll._loop import new_event_loop

        loop = new_event_loop()
        if name == "sigpoll+sig":
            loop._selector._signals_for_all = True  # type: ignore[union-attr]
        return loop
    raise ValueError(f"unknown loop {name!r}")


def available_loops(wanted: list[str]) -> list[str]:
    result = []
    for name in wanted:
        if name == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                print("uvloop is not installed: skipped", file=sys.stderr)
                continue
        result.append(name)
    return result


# -- the echo server (runs in a child process) -----------------------------------------------


class EchoProtocol(asyncio.Protocol):
    """uvloop's --proto echo server: write back whatever arrives."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def serve(loop_name: str) -> None:
    """Serve echo on 127.0.0.1, print the port, and stop when stdin closes."""
    loop = make_loop(loop_name)
    asyncio.set_event_loop(loop)
    server = loop.run_until_complete(loop.create_server(EchoProtocol, "127.0.0.1", 0, backlog=128))
    port = server.sockets[0].getsockname()[1]
    done = loop.create_future()
    # The parent closes our stdin to stop us: a reader on it needs no signals.

    def stop() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stop)
    print(port, flush=True)
    loop.run_until_complete(done)
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()


def echo_round(loop_name: str, msize: int, conns: int, duration: float) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, __file__, "_serve", loop_name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        out = subprocess.run(
            [
                sys.executable, str(CLIENT), "--addr", f"127.0.0.1:{port}",
                "--msize", str(msize), "--conns", str(conns), "--duration", str(duration),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=duration + 60,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- micro benchmarks (each in a fresh child process) ------------------------------------------


def _chains(loop: asyncio.AbstractEventLoop, schedule: Callable[..., Any], chains: int, total: int) -> float:
    """Rate of ``total`` callbacks run as ``chains`` self-rescheduling chains."""
    left = total
    done = loop.create_future()

    def step() -> None:
        nonlocal left
        left -= 1
        if left > 0:
            schedule(step)
        elif not done.done():
            done.set_result(None)

    start = time.perf_counter()
    for _ in range(chains):
        schedule(step)
    loop.run_until_complete(done)
    return total / (time.perf_counter() - start)


def micro(loop_name: str, total: int) -> dict[str, float]:
    loop = make_loop(loop_name)
    try:
        later = lambda cb: loop.call_later(0.0, cb)  # noqa: E731
        # A short warm-up so lazily built things (the first poll, caches) are not timed.
        _chains(loop, loop.call_soon, 10, 10_000)
        return {
            "call_soon_1": _chains(loop, loop.call_soon, 1, total),
            "call_soon_1000": _chains(loop, loop.call_soon, 1000, total),
            "timers_1000": _chains(loop, later, 1000, total),
        }
    finally:
        loop.close()


def micro_round(loop_name: str, total: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "_micro", loop_name, str(total)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rates: dict[str, float] = json.loads(out.stdout)
    return rates


# -- reporting ------------------------------------------------------------------------------


def _table(title: str, unit: str, results: dict[str, dict[str, float]], loops: list[str]) -> list[str]:
    lines = [f"{title} ({unit}, median of rounds)"]
    header = f"  {'benchmark':<16}" + "".join(f"{name:>14}" for name in loops)
    ratios = [r for r in ("asyncio", "uvloop") if r in loops]
    header += "".join(f"{'sigpoll/' + r:>18}" for r in ratios)
    lines.append(header)
    for bench, by_loop in results.items():
        row = f"  {bench:<16}" + "".join(f"{by_loop.get(name, float('nan')):>14,.0f}" for name in loops)
        row += "".join(f"{by_loop['sigpoll'] / by_loop[r]:>18.2f}" for r in ratios)
        lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_serve":
        serve(argv[1])
        return 0
    if argv and argv[0] == "_micro":
        json.dump(micro(argv[1], int(argv[2])), sys.stdout)
        return 0

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loops", default=",".join(LOOPS), help="comma-separated, from: " + ", ".join(LOOPS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per echo round")
    ap.add_argument("--conns", type=int, default=8)
    ap.add_argument("--sizes", default="1024,65536", help="echo message sizes in bytes")
    ap.add_argument("--callbacks", type=int, default=500_000, help="callbacks per micro benchmark")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s, fewer callbacks")
    ap.add_argument("--no-echo", action="store_true")
    ap.add_argument("--no-micro", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="write the raw numbers here too")
    ap.add_argument("--check", action="store_true", help="exit 1 if sigpoll is below --tolerance x asyncio")
    ap.add_argument("--tolerance", type=float, default=0.97)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.callbacks = 1, 1.0, 100_000
    loops = available_loops([name.strip() for name in args.loops.split(",") if name.strip()])
    sizes = [int(s) for s in args.sizes.split(",") if s]

    raw: dict[str, Any] = {"python": sys.version, "cpus": os.cpu_count(), "echo": {}, "micro": {}}
    echo: dict[str, dict[str, float]] = {}
    if not args.no_echo:
        for msize in sizes:
            bench = f"echo {msize // 1024} KiB"
            rounds: dict[str, list[float]] = {name: [] for name in loops}
            for r in range(args.rounds):
                # Rotate who goes first, so warm-up and drift do not favour one loop.
                for name in loops[r % len(loops) :] + loops[: r % len(loops)]:
                    rounds[name].append(echo_round(name, msize, args.conns, args.duration)["messages_per_s"])
            echo[bench] = {name: statistics.median(v) for name, v in rounds.items()}
            raw["echo"][bench] = rounds
    micro_res: dict[str, dict[str, float]] = {}
    if not args.no_micro:
        per: dict[str, dict[str, list[float]]] = {}
        for r in range(args.rounds):
            for name in loops[r % len(loops) :] + loops[: r % len(loops)]:
                for bench, rate in micro_round(name, args.callbacks).items():
                    per.setdefault(bench, {}).setdefault(name, []).append(rate)
        micro_res = {b: {n: statistics.median(v) for n, v in d.items()} for b, d in per.items()}
        raw["micro"] = per

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, {args.conns} connections")
    if echo:
        print("\n".join(_table("echo", "messages/s", echo, loops)))
    if micro_res:
        print("\n".join(_table("micro", "callbacks/s", micro_res, loops)))
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))
    if args.check and "asyncio" in loops:
        slow = [
            f"{bench}: {by['sigpoll'] / by['asyncio']:.2f}"
            for bench, by in {**echo, **micro_res}.items()
            if by["sigpoll"] < args.tolerance * by["asyncio"]
        ]
        if slow:
            print("sigpoll slower than asyncio: " + ", ".join(slow), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
