"""Leaks: open fds and RSS across a million callbacks and 100k connections, per loop.

    python bench/bench_leaks.py [--callbacks 1000000] [--connections 100000] [--json]

For each loop (sigpoll, asyncio, uvloop) in one run:

- ``callbacks``: a chain of ``call_soon`` callbacks (each schedules the next), plus a timer
  every 100th step;
- ``connections``: a protocol echo server on 127.0.0.1 and a client on the same loop that
  opens, uses (one 64-byte echo) and closes connections, 50 at a time.  The client closes
  with SO_LINGER 0 so 100k connections do not pile up in TIME_WAIT.

It samples the process's open fd count and VmRSS after a warm-up tenth of the work and at
the end.  "Flat" means the fd count did not grow and RSS grew by less than 5 MiB after the
warm-up.  Prints a table; exits 0 whatever it finds (read the table).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import struct
import sys
from collections.abc import Callable

from sigpoll.soak._soak import rss_kib

__all__ = ["main"]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _sample() -> tuple[int, int]:
    gc.collect()
    return _fds(), rss_kib()


async def _callbacks(n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    loop = asyncio.get_running_loop()
    warm = n // 10
    done = loop.create_future()
    marks: list[tuple[int, int]] = []
    count = 0

    def step() -> None:
        nonlocal count
        count += 1
        if count == warm:
            marks.append(_sample())
        if count >= n:
            done.set_result(None)
            return
        if count % 100 == 0:
            loop.call_later(0, step)
        else:
            loop.call_soon(step)

    loop.call_soon(step)
    await done
    return marks[0], _sample()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _connections(n: int, parallel: int = 50) -> tuple[tuple[int, int], tuple[int, int]]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    payload = b"x" * 64
    linger = struct.pack("ii", 1, 0)

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.write(payload)
        await reader.readexactly(len(payload))
        writer.close()
        await writer.wait_closed()

    warm_mark: tuple[int, int] | None = None
    done = 0
    while done < n:
        batch = min(parallel, n - done)
        await asyncio.gather(*(one() for _ in range(batch)))
        done += batch
        if warm_mark is None and done >= n // 10:
            await asyncio.sleep(0.1)  # let the server side finish closing
            warm_mark = _sample()
    await asyncio.sleep(0.2)
    end = _sample()
    server.close()
    await server.wait_closed()
    assert warm_mark is not None
    return warm_mark, end


def _loops() -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    import sigpoll

    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "sigpoll": sigpoll.new_event_loop,
        "asyncio": asyncio.new_event_loop,
    }
    try:
        import uvloop

        loops["uvloop"] = uvloop.new_event_loop
    except ImportError:
        print("uvloop not installed: skipped", file=sys.stderr)
    return loops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callbacks", type=int, default=1_000_000)
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from sigpoll._cli import Progress

    results: dict[str, dict[str, object]] = {}
    progress = Progress()  # a live line on a terminal, nothing otherwise
    for name, factory in _loops().items():
        row: dict[str, object] = {}
        for what, work in (
            ("callbacks", lambda: _callbacks(args.callbacks)),
            ("connections", lambda: _connections(args.connections)),
        ):
            progress.update(f"{name}: {what}", force=True)
            loop = factory()
            try:
                (fd0, rss0), (fd1, rss1) = loop.run_until_complete(work())
            finally:
                loop.close()
            row[what] = {
                "fds_after_warmup": fd0, "fds_at_end": fd1,
                "rss_kib_after_warmup": rss0, "rss_kib_at_end": rss1,
                "flat": fd1 <= fd0 and rss1 - rss0 < 5 * 1024,
            }
        results[name] = row
    progress.close()
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.callbacks:,} callbacks and {args.connections:,} connections per loop")
    print(f"{'loop':8s} {'work':12s} {'fds warm→end':>14s} {'RSS MiB warm→end':>18s}  flat")
    for name, row in results.items():
        for what, r in row.items():
            assert isinstance(r, dict)
            print(
                f"{name:8s} {what:12s} {r['fds_after_warmup']:>6} → {r['fds_at_end']:<5}"
                f" {r['rss_kib_after_warmup'] / 1024:>8.1f} → {r['rss_kib_at_end'] / 1024:<7.1f}  {r['flat']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
