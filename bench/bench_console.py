"""Console throughput through a pty: sigpoll's console against the limit and against uvloop.

    python bench/bench_console.py [--mib 64] [--rounds 3] [--json]

Every contender writes the same bytes into the slave side of a fresh raw pty while one fixed
reader (a small C program, in its own process) drains the master as fast as it can:

- ``c-loop``: a plain blocking C write loop on the slave; the limit of the pty itself.
- ``sigpoll``: :class:`sigpoll.tty.ConsoleTransport` on sigpoll's loop (stock asyncio if the
  loop is not available), writing in 64 KiB pieces and awaiting drain like a real console.
- ``asyncio``: the same console transport on stock asyncio.
- ``uvloop``: uvloop's own pipe transport (``connect_write_pipe``) on the slave.

The best of ``--rounds`` runs is reported, with ratios to the C loop and to uvloop.
Goal (issue 4): sigpoll >= 0.9 of the C loop and ahead of uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Callable

__all__ = ["main"]

CHUNK = 64 * 1024

READER_C = r"""
#include <stdlib.h>
#include <unistd.h>
/* Drain fd 0 until EOF/EIO; print the byte count. */
int main(void) {
    static char buf[1 << 16];
    long long total = 0;
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0) break;
        total += n;
    }
    char out[32];
    int len = 0;
    long long t = total;
    char tmp[32];
    do { tmp[len++] = '0' + t % 10; t /= 10; } while (t);
    for (int i = 0; i < len; i++) out[i] = tmp[len - 1 - i];
    out[len++] = '\n';
    write(1, out, len);
    return 0;
}
"""

WRITER_C = r"""
#include <stdlib.h>
#include <unistd.h>
/* Write argv[1] bytes to fd 1 with plain blocking writes of 64 KiB. */
int main(int argc, char **argv) {
    static char buf[1 << 16];
    long long left = atoll(argv[1]);
    for (int i = 0; i < (int)sizeof buf; i++) buf[i] = (char)i;
    while (left > 0) {
        ssize_t n = write(1, buf, left < (long long)sizeof buf ? (size_t)left : sizeof buf);
        if (n < 0) return 1;
        left -= n;
    }
    return 0;
}
"""


def _compile(workdir: str, name: str, source: str) -> str:
    src = os.path.join(workdir, name + ".c")
    exe = os.path.join(workdir, name)
    with open(src, "w") as f:
        f.write(source)
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    return exe


class Pty:
    """A raw pty with the fixed reader on its master."""

    def __init__(self, reader_exe: str) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        tty.setraw(self.master)
        self.reader = subprocess.Popen([reader_exe], stdin=self.master, stdout=subprocess.PIPE)
        os.close(self.master)

    def finish(self) -> int:
        os.close(self.slave)
        out, _ = self.reader.communicate(timeout=60)
        return int(out)


def run_c_loop(nbytes: int, reader: str, writer: str) -> float:
    pty = Pty(reader)
    t0 = time.perf_counter()
    subprocess.run([writer, str(nbytes)], stdout=pty.slave, check=True)
    got = pty.finish()
    elapsed = time.perf_counter() - t0
    assert got == nbytes, (got, nbytes)
    return elapsed


def _run_on_loop(make_loop: Callable[[], asyncio.AbstractEventLoop], coro_fn: Callable[[int, int], object], nbytes: int, reader: str) -> float:
    pty = Pty(reader)
    loop = make_loop()
    try:
        t0 = time.perf_counter()
        loop.run_until_complete(coro_fn(pty.slave, nbytes))  # type: ignore[arg-type]
        got = pty.finish()
        elapsed = time.perf_counter() - t0
    finally:
        loop.close()
    assert got == nbytes, (got, nbytes)
    return elapsed


async def _write_all(writer: asyncio.StreamWriter, nbytes: int) -> None:
    """The same workload for every contender: 64 KiB writes, each followed by drain()."""
    data = bytes(range(256)) * (CHUNK // 256)
    left = nbytes
    while left > 0:
        writer.write(data[: min(left, CHUNK)])
        left -= min(left, CHUNK)
        await writer.drain()


async def _console_writer(fd: int, nbytes: int) -> None:
    from sigpoll import tty as stty

    # The pty's fd stays ours (close_fds=False) so the reader sees EOF only when we close.
    _, writer = await stty.open_console(fd, close_fds=False)
    await _write_all(writer, nbytes)
    writer.close()
    await writer.wait_closed()


async def _pipe_writer(fd: int, nbytes: int) -> None:
    loop = asyncio.get_running_loop()
    f = os.fdopen(os.dup(fd), "wb", buffering=0)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, f)
    await _write_all(asyncio.StreamWriter(transport, protocol, None, loop), nbytes)
    transport.close()
    await asyncio.sleep(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB written per run (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per contender; best is kept")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    nbytes = args.mib * 1024 * 1024

    import sigpoll

    contenders: dict[str, Callable[[], float]] = {}
    with tempfile.TemporaryDirectory() as work:
        reader = _compile(work, "reader", READER_C)
        writer = _compile(work, "writer", WRITER_C)
        contenders["c-loop"] = lambda: run_c_loop(nbytes, reader, writer)
        contenders["sigpoll"] = lambda: _run_on_loop(sigpoll.new_event_loop, _console_writer, nbytes, reader)
        contenders["asyncio"] = lambda: _run_on_loop(asyncio.new_event_loop, _console_writer, nbytes, reader)
        try:
            import uvloop

            contenders["uvloop"] = lambda: _run_on_loop(uvloop.new_event_loop, _pipe_writer, nbytes, reader)
        except ImportError:
            print("uvloop not installed: skipped", file=sys.stderr)

        from sigpoll._cli import Progress

        best: dict[str, float] = {}
        with Progress() as progress:  # a live line on a terminal, nothing otherwise
            for rnd in range(args.rounds):  # interleaved, so drift in machine load hits all alike
                for name, fn in contenders.items():
                    progress.update(f"round {rnd + 1}/{args.rounds}: {name}", force=True)
                    t = fn()
                    best[name] = min(best.get(name, t), t)

    mbps = {name: nbytes / t / 1e6 for name, t in best.items()}
    result = {
        "mib": args.mib,
        "mb_per_s": mbps,
        "sigpoll_vs_c_loop": mbps["sigpoll"] / mbps["c-loop"],
        "sigpoll_vs_uvloop": mbps["sigpoll"] / mbps["uvloop"] if "uvloop" in mbps else None,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"console throughput, {args.mib} MiB through a raw pty, best of {args.rounds} (higher is better)")
    for name, v in mbps.items():
        print(f"  {name:8s} {v:9.1f} MB/s   {v / mbps['c-loop']:.2f} of the C loop")
    if result["sigpoll_vs_uvloop"] is not None:
        print(f"  sigpoll / uvloop = {result['sigpoll_vs_uvloop']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
