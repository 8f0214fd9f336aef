"""Poller wake latency and throughput on a raw pty: sigpoll against select.epoll and uvloop.

    python bench/bench_poller.py [--samples 2000] [--mib 64] [--rounds 3] [--quick] [--json]

Every rival runs the same three workloads on a raw pty, with a peer process on the master
so that the peer's work never competes for this process's GIL:

- ``latency``: the peer writes one 8-byte record, the CLOCK_MONOTONIC time of the write,
  at random intervals of 200-1000 us; this process waits for the slave to become readable
  and subtracts the payload from the clock when its wait returned (for the event loops:
  when the add_reader callback ran).  Median, p99 and max over ``--samples`` records.
  The rivals take turns on one pty and one peer, SLICE samples at a time.
- ``write`` (a fresh pty and peer per run): this process writes ``--mib`` MiB into the slave as fast as it can (write
  until EAGAIN, then wait for WRITABLE) while the peer drains the master.  MB/s is taken
  from the moment the peer is told to start to the peer's clock at its last byte.
- ``read``: the peer floods the master with blocking writes; this process drains the
  slave (read until EAGAIN, then wait for READABLE).

Both throughput directions also report wake-ups per MB and this process's CPU time per MB
(the peer's excluded), which moves far less than MB/s when the machine is busy.

Rivals: ``sigpoll`` (a :class:`sigpoll.Poller` fd with signals on, the default),
``sigpoll signals=False`` (the same C path with O_ASYNC off: the cost of the signals),
``select.epoll`` (Python's own), ``uvloop`` (``loop.add_reader``/``add_writer``) and
``asyncio`` (stock selector loop, for context).  The waiting rivals register the pty
edge-triggered for the throughput runs, as the write-until-EAGAIN pattern expects; the
event loops are level-triggered by design.

Latency slices and throughput rounds are interleaved with the order rotated each time, so
drift in machine load hits every rival alike.  The table ends with ratios sigpoll / rival from this one run.  Nothing
here asserts a timing; the exit status is 0 unless the benchmark itself breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import select
import struct
import subprocess
import sys
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "LatencyRun",
    "LatencyStats",
    "Rival",
    "RivalResult",
    "ThroughputRun",
    "main",
    "make_rivals",
]

CHUNK = 64 * 1024
RECORD = struct.Struct("<q")  # the latency payload: the peer's CLOCK_MONOTONIC in ns
SLICE = 50  # latency samples a rival takes in one turn before the next rival's turn
SLICE_WARMUP = 2  # dropped per turn: the first wake-ups after setting up pay cold caches
GAP_US = (200, 1000)  # the peer's random pause before each latency record
TIMEOUT_S = 30.0  # a rival that stalls this long is a broken benchmark, not a slow one
MB = 1e6

REFERENCE = "sigpoll"
RATIO_AGAINST = ("select.epoll", "uvloop", "sigpoll signals=False")

# clock_gettime(CLOCK_MONOTONIC) in ns on both sides; CLOCK_MONOTONIC is system-wide,
# so the peer's stamp and ours are comparable.
_now_ns = time.monotonic_ns


# -- the peer (runs in its own process) ------------------------------------------------------


def _peer(kind: str, master: int, ctl: int, res: int, total: int, seed: int) -> int:
    """The far side of the pty: one of ``latency``, ``drain`` or ``flood``.

    Protocol on the two pipes: the peer writes one byte on ``res`` once it is running (so
    interpreter start-up is never timed), waits for one byte on ``ctl`` ("go"), does its
    work, and for ``drain`` reports its clock at the last byte on ``res``.  It keeps the
    master open until ``ctl`` reaches EOF, so the slave never sees a hang-up mid-run.
    The ``latency`` peer serves many short slices: ``total`` records per "go", until EOF.
    """
    os.write(res, b"r")
    if kind == "latency":
        rng = random.Random(seed)
        lo, hi = GAP_US
        while os.read(ctl, 1) == b"g":
            for _ in range(total):
                time.sleep(rng.uniform(lo, hi) / 1e6)
                os.write(master, RECORD.pack(_now_ns()))
        return 0
    if os.read(ctl, 1) != b"g":
        return 1
    if kind == "flood":
        data = memoryview(bytes(range(256)) * (CHUNK // 256))
        left = total
        while left > 0:
            left -= os.write(master, data if left >= CHUNK else data[:left])
    elif kind == "drain":
        buf = bytearray(CHUNK)
        got = 0
        while got < total:
            n = os.readv(master, [buf])
            if n <= 0:
                return 1
            got += n
        os.write(res, RECORD.pack(_now_ns()))
    else:
        return 2
    while os.read(ctl, 1):  # hold the master until the parent is done with the slave
        pass
    return 0


class _Peer:
    """A fresh raw pty with a peer process on its master; this process keeps the slave."""

    def __init__(self, kind: str, total: int, seed: int = 0) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self.slave)
        os.set_blocking(self.slave, False)
        ctl_r, self._ctl = os.pipe()
        self._res, res_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--peer", kind,
             str(self.master), str(ctl_r), str(res_w), str(total), str(seed)],
            pass_fds=(self.master, ctl_r, res_w),
        )
        os.close(ctl_r)
        os.close(res_w)
        if os.read(self._res, 1) != b"r":
            raise RuntimeError(f"{kind} peer did not start")

    def go(self) -> None:
        os.write(self._ctl, b"g")

    def result_ns(self) -> int:
        """The drain peer's clock when it read the last byte."""
        data = b""
        while len(data) < RECORD.size:
            chunk = os.read(self._res, RECORD.size - len(data))
            if not chunk:
                raise RuntimeError("peer exited without a result")
            data += chunk
        return RECORD.unpack(data)[0]

    def close(self) -> None:
        os.close(self._ctl)  # EOF: the peer lets go of the master and exits
        try:
            self.proc.wait(timeout=TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for fd in (self._res, self.slave, self.master):
                os.close(fd)


class _Decoder:
    """Turns bytes read from the slave into latency samples.

    A record split across two reads is charged to the wake-up that brought its first
    byte, since that is when the waiter learned data had arrived.
    """

    __slots__ = ("pending", "first_ns", "samples")

    def __init__(self) -> None:
        self.pending = bytearray()
        self.first_ns = 0
        self.samples: list[int] = []

    def feed(self, data: bytes, woke_ns: int) -> None:
        if not self.pending:
            self.first_ns = woke_ns
        self.pending += data
        while len(self.pending) >= RECORD.size:
            (sent_ns,) = RECORD.unpack_from(self.pending)
            del self.pending[: RECORD.size]
            self.samples.append(self.first_ns - sent_ns)
            self.first_ns = woke_ns


# -- rivals --------------------------------------------------------------------------------


@dataclass
class ThroughputRun:
    """One throughput run: bytes moved, seconds taken, and wake-ups spent doing it."""

    nbytes: int
    seconds: float
    wakeups: int
    counters: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # this process's user+system time, filled in by _measure

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / MB

    @property
    def wakeups_per_mb(self) -> float:
        return self.wakeups / (self.nbytes / MB)

    @property
    def cpu_us_per_mb(self) -> float:
        return self.cpu_seconds * 1e6 / (self.nbytes / MB)


@dataclass
class LatencyRun:
    """One latency run: a sample per record (ns), and the wake-ups it took to get them."""

    samples: list[int]
    wakeups: int
    counters: dict[str, int] = field(default_factory=dict)


class Rival(Protocol):
    """One way of waiting for a pty; each method runs one workload on a fresh peer."""

    name: str

    def latency(self, peer: _Peer, records: int) -> LatencyRun: ...

    def write(self, peer: _Peer, nbytes: int) -> ThroughputRun: ...

    def read(self, peer: _Peer, nbytes: int) -> ThroughputRun: ...


class _Waiter(Protocol):
    """The slice of a poller the waiting loops use."""

    def wait(self) -> list[Any]: ...

    def counters(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class _SigpollWaiter:
    def __init__(self, fd: int, events: int, edge: bool, signals: bool) -> None:
        import sigpoll

        self.poller = sigpoll.Poller()
        self.poller.register(fd, events, edge=edge, signals=signals)
        # Bound once so the hot loop calls Poller.wait with no adapter in between.
        self.wait: Callable[[], list[Any]] = lambda w=self.poller.wait: w(TIMEOUT_S)

    def counters(self) -> dict[str, int]:
        return self.poller.counters.as_dict()

    def close(self) -> None:
        self.poller.close()


class _EpollWaiter:
    def __init__(self, fd: int, events: int, edge: bool) -> None:
        self.ep = select.epoll()
        self.ep.register(fd, events | (select.EPOLLET if edge else 0))
        self.wait: Callable[[], list[Any]] = lambda w=self.ep.poll: w(TIMEOUT_S)

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.ep.close()


class _WaitingRival:
    """A rival that blocks in a wait call: sigpoll.Poller or select.epoll."""

    def __init__(self, name: str, make: Callable[[int, int, bool], _Waiter]) -> None:
        self.name = name
        self._make = make

    def latency(self, peer: _Peer, records: int) -> LatencyRun:
        fd = peer.slave
        # Level-triggered, as a reader that takes one read per wake-up would register it.
        waiter = self._make(fd, select.EPOLLIN, False)
        try:
            wait, read, now, dec = waiter.wait, os.read, _now_ns, _Decoder()
            wakeups = 0
            peer.go()
            while len(dec.samples) < records:
                if not wait():
                    raise RuntimeError(f"{self.name}: no readiness within {TIMEOUT_S} s")
                woke = now()
                wakeups += 1
                try:
                    data = read(fd, 4096)
                except BlockingIOError:
                    continue  # a wake-up with nothing to read costs its time, no sample
                dec.feed(data, woke)
            return LatencyRun(dec.samples, wakeups, waiter.counters())
        finally:
            waiter.close()

    def write(self, peer: _Peer, nbytes: int) -> ThroughputRun:
        fd = peer.slave
        waiter = self._make(fd, select.EPOLLOUT, True)
        try:
            wait, write = waiter.wait, os.write
            data = memoryview(bytes(range(256)) * (CHUNK // 256))
            sent = wakeups = 0
            peer.go()
            t0 = _now_ns()
            while True:
                try:
                    while sent < nbytes:
                        left = nbytes - sent
                        sent += write(fd, data if left >= CHUNK else data[:left])
                except BlockingIOError:
                    pass
                if sent >= nbytes:
                    break
                if not wait():
                    raise RuntimeError(f"{self.name}: pty not writable within {TIMEOUT_S} s")
                wakeups += 1
            t1 = peer.result_ns()
            return ThroughputRun(nbytes, (t1 - t0) / 1e9, wakeups, waiter.counters())
        finally:
            waiter.close()

    def read(self, peer: _Peer, nbytes: int) -> ThroughputRun:
        fd = peer.slave
        waiter = self._make(fd, select.EPOLLIN, True)
        try:
            wait, readv = waiter.wait, os.readv
            bufs = [bytearray(CHUNK)]
            got = wakeups = 0
            t0 = _now_ns()
            peer.go()
            while got < nbytes:
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    if not wait():
                        raise RuntimeError(f"{self.name}: no data within {TIMEOUT_S} s") from None
                    wakeups += 1
                    continue
                if n <= 0:
                    raise RuntimeError(f"{self.name}: pty closed after {got} bytes")
                got += n
            t1 = _now_ns()
            return ThroughputRun(nbytes, (t1 - t0) / 1e9, wakeups, waiter.counters())
        finally:
            waiter.close()


class _LoopRival:
    """A rival that is an asyncio event loop: callbacks from add_reader / add_writer."""

    def __init__(self, name: str, new_loop: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.name = name
        self._new_loop = new_loop

    def _run(self, setup: Callable[[asyncio.AbstractEventLoop, asyncio.Future[None]], None],
             go: Callable[[], None]) -> None:
        loop = self._new_loop()
        try:
            done: asyncio.Future[None] = loop.create_future()
            setup(loop, done)
            loop.call_soon(go)  # once the loop runs, so the first event finds it waiting
            loop.run_until_complete(asyncio.wait_for(done, TIMEOUT_S * 4))
        finally:
            loop.close()

    def latency(self, peer: _Peer, records: int) -> LatencyRun:
        fd, read, now, dec = peer.slave, os.read, _now_ns, _Decoder()
        wakeups = 0

        def setup(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
            def on_readable() -> None:
                nonlocal wakeups
                woke = now()
                wakeups += 1
                try:
                    data = read(fd, 4096)
                except BlockingIOError:
                    return
                dec.feed(data, woke)
                if len(dec.samples) >= records:
                    loop.remove_reader(fd)
                    done.set_result(None)

            loop.add_reader(fd, on_readable)

        self._run(setup, peer.go)
        return LatencyRun(dec.samples, wakeups)

    def write(self, peer: _Peer, nbytes: int) -> ThroughputRun:
        fd, write = peer.slave, os.write
        data = memoryview(bytes(range(256)) * (CHUNK // 256))
        state = {"sent": 0, "wakeups": 0}
        t0 = 0

        def setup(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
            def on_writable() -> None:
                state["wakeups"] += 1
                sent = state["sent"]
                try:
                    while sent < nbytes:
                        left = nbytes - sent
                        sent += write(fd, data if left >= CHUNK else data[:left])
                except BlockingIOError:
                    pass
                state["sent"] = sent
                if sent >= nbytes:
                    loop.remove_writer(fd)
                    done.set_result(None)

            loop.add_writer(fd, on_writable)

        def go() -> None:
            nonlocal t0
            peer.go()
            t0 = _now_ns()

        self._run(setup, go)
        t1 = peer.result_ns()
        # The first callback fires on a pty that is writable from the start; the waiting
        # rivals write before their first wait, so it is not counted as a wake-up.
        return ThroughputRun(nbytes, (t1 - t0) / 1e9, state["wakeups"] - 1)

    def read(self, peer: _Peer, nbytes: int) -> ThroughputRun:
        fd, readv = peer.slave, os.readv
        bufs = [bytearray(CHUNK)]
        state = {"got": 0, "wakeups": 0, "t1": 0}
        t0 = 0

        def setup(loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
            def on_readable() -> None:
                state["wakeups"] += 1
                got = state["got"]
                try:
                    while got < nbytes:
                        n = readv(fd, bufs)
                        if n <= 0:
                            raise RuntimeError(f"{self.name}: pty closed after {got} bytes")
                        got += n
                except BlockingIOError:
                    pass
                state["got"] = got
                if got >= nbytes:
                    state["t1"] = _now_ns()
                    loop.remove_reader(fd)
                    done.set_result(None)

            loop.add_reader(fd, on_readable)

        def go() -> None:
            nonlocal t0
            t0 = _now_ns()
            peer.go()

        self._run(setup, go)
        return ThroughputRun(nbytes, (state["t1"] - t0) / 1e9, state["wakeups"])


def make_rivals() -> tuple[list[Rival], list[str]]:
    """The rivals available here, and a note for each one that had to be skipped."""
    rivals: list[Rival] = [
        _WaitingRival(
            "sigpoll", lambda fd, ev, edge: _SigpollWaiter(fd, ev, edge, signals=True)),
        _WaitingRival(
            "sigpoll signals=False",
            lambda fd, ev, edge: _SigpollWaiter(fd, ev, edge, signals=False)),
        _WaitingRival("select.epoll", lambda fd, ev, edge: _EpollWaiter(fd, ev, edge)),
    ]
    skipped: list[str] = []
    try:
        import uvloop
    except ImportError:
        skipped.append("uvloop is not installed: its column is missing (pip install uvloop)")
    else:
        rivals.append(_LoopRival("uvloop", uvloop.new_event_loop))
    rivals.append(_LoopRival("asyncio", asyncio.new_event_loop))
    return rivals, skipped


# -- statistics and the run ------------------------------------------------------------------


@dataclass
class LatencyStats:
    """Wake-latency summary in microseconds."""

    samples: int
    median: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, ns: list[int]) -> LatencyStats:
        s = sorted(ns)

        def rank(q: float) -> float:  # nearest-rank percentile: always a measured value
            return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))] / 1e3

        return cls(len(s), rank(0.5), rank(0.9), rank(0.99), s[-1] / 1e3, sum(s) / len(s) / 1e3)


@dataclass
class RivalResult:
    """Everything measured for one rival across all rounds."""

    name: str
    latency: list[LatencyRun] = field(default_factory=list)
    writes: list[ThroughputRun] = field(default_factory=list)
    reads: list[ThroughputRun] = field(default_factory=list)

    @property
    def latency_ns(self) -> list[int]:
        return [ns for run in self.latency for ns in run.samples]

    def metrics(self) -> dict[str, float]:
        """The headline numbers; throughput is the median run, so one outlier cannot win."""
        lat = LatencyStats.of(self.latency_ns)
        w = _median(self.writes, lambda r: r.seconds)
        r = _median(self.reads, lambda r: r.seconds)
        return {
            "latency_median_us": lat.median,
            "latency_p99_us": lat.p99,
            "latency_max_us": lat.max,
            "write_mb_per_s": w.mb_per_s,
            "write_wakeups_per_mb": w.wakeups_per_mb,
            "write_cpu_us_per_mb": _median(self.writes, lambda r: r.cpu_us_per_mb).cpu_us_per_mb,
            "read_mb_per_s": r.mb_per_s,
            "read_wakeups_per_mb": r.wakeups_per_mb,
            "read_cpu_us_per_mb": _median(self.reads, lambda r: r.cpu_us_per_mb).cpu_us_per_mb,
        }


# Which way is better for each metric; the ratios are sigpoll / rival either way.
BETTER = {
    "latency_median_us": "lower",
    "latency_p99_us": "lower",
    "latency_max_us": "lower",
    "write_mb_per_s": "higher",
    "write_wakeups_per_mb": "lower",
    "write_cpu_us_per_mb": "lower",
    "read_mb_per_s": "higher",
    "read_wakeups_per_mb": "lower",
    "read_cpu_us_per_mb": "lower",
}
_COLUMNS = [  # (heading, unit) per BETTER key, for the table
    ("lat med", "us"), ("lat p99", "us"), ("lat max", "us"),
    ("write", "MB/s"), ("wake", "per MB"), ("cpu", "us/MB"),
    ("read", "MB/s"), ("wake", "per MB"), ("cpu", "us/MB"),
]


def _median(runs: list[ThroughputRun], key: Callable[[ThroughputRun], float]) -> ThroughputRun:
    return sorted(runs, key=key)[len(runs) // 2]


def _measure(fn: Callable[[], Any]) -> Any:
    """Run one workload with the collector off, and charge it the CPU time it used.

    The collector would land its pauses on whichever rival happens to be running.  CPU
    time (this process only, not the peer) is kept beside the wall clock because it is
    what the poller itself costs, and it moves far less than MB/s on a loaded machine.
    """
    gc.collect()
    gc.disable()
    t0 = time.process_time_ns()  # CLOCK_PROCESS_CPUTIME_ID: ns, unlike os.times()' ticks
    try:
        result = fn()
    finally:
        t1 = time.process_time_ns()
        gc.enable()
    if isinstance(result, ThroughputRun):
        result.cpu_seconds = (t1 - t0) / 1e9
    return result


def _rotated(rivals: list[Rival], k: int) -> list[Rival]:
    k %= len(rivals)
    return rivals[k:] + rivals[:k]


def run(rivals: list[Rival], samples: int, nbytes: int, rounds: int, seed: int,
        progress: Callable[[str], None]) -> dict[str, RivalResult]:
    """Run every workload for every rival, interleaved, rotating the order each time.

    Latency goes first, in slices of SLICE samples that take turns on one pty and one
    peer, so a burst of outside load lands on every rival alike instead of on whichever
    one happened to be running.  Throughput follows in ``rounds`` rounds.
    """
    results = {r.name: RivalResult(r.name) for r in rivals}
    slices = -(-samples // SLICE)
    peer = _Peer("latency", SLICE + SLICE_WARMUP, seed)
    try:
        for i in range(slices):
            progress(f"latency slice {i + 1}/{slices}")
            for rival in _rotated(rivals, i):
                lat = _measure(lambda: rival.latency(peer, SLICE + SLICE_WARMUP))
                lat.samples = lat.samples[SLICE_WARMUP:]
                results[rival.name].latency.append(lat)
    finally:
        peer.close()
    for rnd in range(rounds):
        for rival in _rotated(rivals, rnd):
            progress(f"throughput round {rnd + 1}/{rounds}: {rival.name}")
            res = results[rival.name]
            peer = _Peer("drain", nbytes)
            try:
                res.writes.append(_measure(lambda: rival.write(peer, nbytes)))
            finally:
                peer.close()
            peer = _Peer("flood", nbytes)
            try:
                res.reads.append(_measure(lambda: rival.read(peer, nbytes)))
            finally:
                peer.close()
    return results


def ratios(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """sigpoll / rival for every metric, against each rival in RATIO_AGAINST present."""
    ref = metrics[REFERENCE]
    out: dict[str, dict[str, float | None]] = {}
    for rival in RATIO_AGAINST:
        if rival in metrics:
            out[rival] = {k: (ref[k] / v if v else None) for k, v in metrics[rival].items()}
    return out


def _fmt(v: float | None, width: int, digits: int = 1, suffix: str = "") -> str:
    if v is None:
        return "n/a".rjust(width)
    return f"{v:.{digits}f}{suffix}".rjust(width)


def render(metrics: dict[str, dict[str, float]], rat: dict[str, dict[str, float | None]],
           samples: int, mib: float, rounds: int) -> str:
    """One table: absolute numbers per rival, then the sigpoll / rival ratio rows."""
    keys = list(BETTER)
    w0, w = 30, 9
    rule = "-" * (w0 + w * len(keys))
    lines = [
        f"poller on a raw pty: wake latency over {samples} samples per rival; "
        f"{mib:g} MiB per throughput run, median of {rounds}",
        "",
        "".ljust(w0) + "".join(h.rjust(w) for h, _ in _COLUMNS),
        "".ljust(w0) + "".join(u.rjust(w) for _, u in _COLUMNS),
        "better is".ljust(w0) + "".join(BETTER[k].rjust(w) for k in keys),
        rule,
    ]
    for name, m in metrics.items():
        lines.append(name.ljust(w0) + "".join(_fmt(m[k], w) for k in keys))
    lines.append(rule)
    for rival, r in rat.items():
        label = f"{REFERENCE} / {rival.replace('sigpoll ', '')}"
        lines.append(label.ljust(w0) + "".join(_fmt(r[k], w, 2, "x") for k in keys))
    lines += [
        "",
        "Ratios are sigpoll (signals on) / rival, from this run: in a 'lower' column below",
        "1.00x means sigpoll is better, in a 'higher' column above 1.00x does.  'wake' counts",
        "returns from the wait (add_reader/add_writer callbacks for the event loops) per",
        "10^6 bytes; 'cpu' is this process's user+system time per 10^6 bytes, peer excluded.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer"]:
        kind, *nums = argv[1:]
        master, ctl, res, total, seed = map(int, nums)
        return _peer(kind, master, ctl, res, total, seed)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000,
                        help="latency samples per rival, all rounds together (default 2000)")
    parser.add_argument("--mib", type=float, default=64,
                        help="MiB moved per throughput run (default 64)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; throughput reports the median run (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the peer's pauses")
    parser.add_argument("--quick", action="store_true",
                        help="a short run for CI: 300 samples, 8 MiB, 1 round")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.mib, args.rounds = 300, 8, 1
    if args.samples < 1 or args.mib <= 0 or args.rounds < 1:
        parser.error("--samples, --mib and --rounds must be positive")
    nbytes = int(args.mib * 1024 * 1024)

    rivals, skipped = make_rivals()
    for note in skipped:
        print(note, file=sys.stderr)

    def progress(msg: str) -> None:
        if not args.json and sys.stderr.isatty():
            print(f"\r{msg:<60}", end="", file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    started = time.monotonic()
    results = run(rivals, args.samples, nbytes, args.rounds, args.seed, progress)
    progress("")
    if not args.json and sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)
    metrics = {name: r.metrics() for name, r in results.items()}
    rat = ratios(metrics)

    if args.json:
        doc = {
            "config": {"samples": args.samples, "mib": args.mib, "rounds": args.rounds,
                       "seed": args.seed, "gap_us": list(GAP_US), "chunk": CHUNK},
            "system": _system(),
            "seconds": round(time.monotonic() - started, 2),
            "load_average_before": load_before,
            "skipped": skipped,
            "better": BETTER,
            "reference": REFERENCE,
            "rivals": {name: _rival_json(r, metrics[name]) for name, r in results.items()},
            "ratios": rat,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(render(metrics, rat, args.samples, args.mib, args.rounds))
        print(f"\n({time.monotonic() - started:.1f} s; {_system()['summary']}; "
              f"load average {load_before:.2f} before the run)")
        if load_before > (os.cpu_count() or 1) / 2:
            # The ratios stay meaningful (every rival shared the same interference, rounds
            # interleaved), but absolute numbers and tails are not this machine's best.
            print("note: other work was running; absolute numbers and tails are noisy, "
                  "compare the ratios, or rerun on an idle machine")
    return 0


def _rival_json(r: RivalResult, metrics: dict[str, float]) -> dict[str, Any]:
    def runs(rs: list[ThroughputRun]) -> list[dict[str, Any]]:
        return [{"mb_per_s": x.mb_per_s, "seconds": x.seconds, "wakeups": x.wakeups,
                 "cpu_seconds": x.cpu_seconds,
                 **({"counters": x.counters} if x.counters else {})} for x in rs]

    return {
        "metrics": metrics,
        "latency_us": vars(LatencyStats.of(r.latency_ns)),
        "latency_runs": [{"samples": len(x.samples), "wakeups": x.wakeups,
                          **({"counters": x.counters} if x.counters else {})}
                         for x in r.latency],
        "write_runs": runs(r.writes),
        "read_runs": runs(r.reads),
    }


def _system() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for mod in ("sigpoll", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }
    info["summary"] = (f"Linux {info['kernel']}, {info['cpus']} CPUs, Python "
                       f"{versions['python']}, sigpoll {versions['sigpoll']}, "
                       f"uvloop {versions['uvloop']}")
    return info


if __name__ == "__main__":
    sys.exit(main())
