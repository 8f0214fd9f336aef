"""The host's half of the soak: one guest, every backend busy at once, every byte checked.

One User-Mode Linux guest runs :mod:`sigpoll.soak._worker`.  Its console output (on a sigpoll
console), a 9P share (sigpoll's server) and a virtio-console port (sigpoll's vhost-user
backend) all carry checked traffic at the same time, while a thread hits this process with
bursts of signals.  The host checks what arrives, watches each stream for stalls, and samples
its own RSS and open fds; :class:`SoakReport` says what moved, what was lost and the peaks.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _worker

__all__ = ["STALL_SECONDS", "SoakReport", "rss_kib", "soak"]

#: A stream that moves nothing for this long, while it should, counts as a stall.
STALL_SECONDS = 5.0
# How long an interrupted soak gives its guest to power off before it is killed.
_STOP_WHEN_CANCELLED = 1.0


@dataclass
class Stream:
    """What one stream moved, as the receiving side checked it."""

    items: int = 0  #: lines, files or blocks received and checked
    bytes: int = 0
    bad: int = 0  #: received but wrong: corrupted, out of order, repeated
    lost: int = 0  #: sent (by the sender's own count) but never received
    longest_gap: float = 0.0  #: seconds, the longest time without progress
    stalls: int = 0  #: gaps longer than STALL_SECONDS
    _last: float = field(default=0.0, repr=False)

    def progress(self, now: float) -> None:
        if self._last:
            gap = now - self._last
            self.longest_gap = max(self.longest_gap, gap)
            if gap > STALL_SECONDS:
                self.stalls += 1
        self._last = now


@dataclass
class SoakReport:
    """The outcome of a soak; :attr:`ok` is true when nothing was lost, bad or stalled."""

    seconds: float = 0.0
    streams: dict[str, Stream] = field(default_factory=dict)
    signals_sent: int = 0
    signals_handled: int = 0
    rss_kib: list[int] = field(default_factory=list)  #: samples, one per interval
    fds: list[int] = field(default_factory=list)
    poller: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Whether the counts are settled against the guest's own (at the end of a full run):
    #: before that, ``lost`` is not known yet.
    settled: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and all(
            s.lost == 0 and s.bad == 0 and s.stalls == 0 for s in self.streams.values()
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for stream in out["streams"].values():
            stream.pop("_last", None)
        out["ok"] = self.ok
        return out


def _virtio_state(guest: Any) -> str:
    """Where a stalled port stands: each ring's indices and the ports' flow-control state."""
    backend = getattr(guest, "_backend", None)
    conn = getattr(backend, "connection", None)
    if conn is None:
        return "no vhost-user frontend connected"
    parts = []
    for i, r in enumerate(conn.rings):
        q = r.queue
        if not q.active:
            continue
        used_event = int.from_bytes(q._avail[4 + 2 * q.num : 6 + 2 * q.num], "little") if q.event_idx else -1
        parts.append(
            f"q{i}: avail={q.avail_idx()} last_avail={q.last_avail} used={q.used_idx} "
            f"used_event={used_event} kicks={r.kicks} irqs={r.interrupts} watching={r.watching}"
        )
    for port in conn.device.ports:
        t = port.transport
        parts.append(
            f"port {port.id}: open={port.guest_open} to_guest={port.to_guest_len} "
            f"backlog={len(port._backlog)} reading={t.is_reading() if t else None} "
            f"paused={t._writing_paused if t else None}"
        )
    return "; ".join(parts)


def rss_kib() -> int:
    """This process's resident memory in KiB (0 where /proc does not say)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class _SignalStorm:
    """Bursts of SIGUSR1 at this process, handled on the loop, until stopped."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sent = self.handled = 0
        self._stop = threading.Event()
        self._loop = loop
        loop.add_signal_handler(signal.SIGUSR1, self._handled)
        self._thread = threading.Thread(target=self._run, name="soak-signals", daemon=True)
        self._thread.start()

    def _handled(self) -> None:
        self.handled += 1

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for _ in range(20):
                os.kill(os.getpid(), signal.SIGUSR1)
                self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._loop.remove_signal_handler(signal.SIGUSR1)


class _ConsoleCheck:
    """Checks the guest's console lines as they stream in."""

    _END = re.compile(rb"END (\w+) (.*)")

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.next = 0
        self.pending = b""
        self.summaries: dict[str, dict[str, int]] = {}
        self.errors: list[str] = []

    def feed(self, data: bytes) -> None:
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        now = time.monotonic()
        for raw in lines:
            line = raw.rstrip(b"\r")
            if line.startswith(b"C "):
                number = int(line.split(b" ", 2)[1]) if line.count(b" ") >= 2 else -1
                if number != self.next or line != _worker.console_line(number):
                    self.stream.bad += 1
                self.next = number + 1
                self.stream.items += 1
                self.stream.bytes += len(raw) + 1
                self.stream.progress(now)
            elif m := self._END.match(line):
                self.summaries[m.group(1).decode()] = {
                    k: int(v) for k, v in (kv.split("=") for kv in m.group(2).decode().split())
                }
            elif line.startswith(b"ERROR "):
                self.errors.append(line[6:].decode(errors="replace"))
            elif line.strip():
                self.errors.append(f"unexpected console line: {line[:80]!r}")


def _share_pass(share: str, up: Stream, written: int, write: bool) -> int:
    """One look at the share: check and remove the guest's finished files, and (if
    ``write``) top up the host's files for the guest.  Returns the host's new file count."""
    now = time.monotonic()
    names = os.listdir(share)
    for name in names:
        if name.startswith("g") and name.endswith(".dat"):
            data = _read_and_remove(os.path.join(share, name))
            if data != _worker.file_content("g", int(name[1:-4])):
                up.bad += 1
            up.items += 1
            up.bytes += len(data)
            up.progress(now)
    if write and sum(1 for name in names if name.startswith("h")) < 4:
        _write_into_place(share, f"h{written}", _worker.file_content("h", written))
        written += 1
    return written


async def _check_share(share: str, up: Stream, deadline: float, stop: asyncio.Event) -> int:
    """Check the guest's files as they appear and keep a few of the host's waiting for it
    until the deadline.  Returns how many files the host wrote."""
    written = 0
    while not stop.is_set():
        written = await asyncio.to_thread(_share_pass, share, up, written, time.monotonic() < deadline)
        await asyncio.sleep(0.05)
    return written


def _read_and_remove(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


def _write_into_place(share: str, stem: str, data: bytes) -> None:
    # Written aside and renamed, so the guest never reads a file half written.
    tmp = os.path.join(share, stem + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(share, stem + ".dat"))


async def _port_traffic(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        up: Stream, stop_sending: asyncio.Event) -> int:
    """Send the host's block stream until the guest's stream ends; check the guest's.
    Returns how many blocks the host sent."""
    expect = 0

    async def receive() -> None:
        nonlocal expect
        while True:
            head = await reader.readexactly(8)
            n, size = _worker._HEAD.unpack(head)
            if size == 0:
                return
            payload = await reader.readexactly(size)
            if n != expect or payload != _worker.block("up", n):
                up.bad += 1
            expect = n + 1
            up.items += 1
            up.bytes += size
            up.progress(time.monotonic())

    receiver = asyncio.ensure_future(receive())
    sent = 0
    try:
        while not receiver.done() and not stop_sending.is_set():
            writer.write(_worker.frame(sent, _worker.block("down", sent)))
            sent += 1
            await writer.drain()
        writer.write(_worker.frame(sent, b""))
        await writer.drain()
        await receiver
    finally:
        if not receiver.done():
            receiver.cancel()
        # Retrieved here, so a receiver that failed is reported by the awaiting caller
        # (through the exception above), never as "exception was never retrieved".
        await asyncio.gather(receiver, return_exceptions=True)
    return sent


async def soak(
    seconds: float,
    *,
    kernel: str | None = None,
    mem: str = "256M",
    interval: float = 5.0,
    status: Callable[[str], None] | None = None,
    progress: Callable[[SoakReport], None] | None = None,
    report: SoakReport | None = None,
) -> SoakReport:
    """Run every backend under load for ``seconds`` against one UML guest and report.

    ``status`` gets a line for each event worth saying (boot, a stream that stops moving);
    ``progress`` gets the report as it fills, twice a second.  Pass your own ``report`` to
    keep what was counted if the soak is cancelled (it is then not :attr:`~SoakReport.settled`).
    """
    from ..guest import Guest

    say = status or (lambda message: None)
    report = report if report is not None else SoakReport()
    names = ("console", "9p guest->host", "9p host->guest", "port guest->host", "port host->guest")
    streams = {name: Stream() for name in names}
    report.streams = streams
    share = tempfile.mkdtemp(prefix="sigpoll-soak-")
    via = "net" if os.geteuid() == 0 else "virtio"
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    async def tick() -> None:
        while True:
            report.seconds = time.monotonic() - started
            if progress is not None:
                progress(report)
            await asyncio.sleep(0.5)

    ticker = asyncio.ensure_future(tick())
    try:
        async with Guest(kernel=kernel, mem=mem, shares=[f"{share}:soak"], share_via=via,
                         ports=["soak"], status=say) as guest:
            say(f"soak: {seconds:.0f}s of console, 9P ({via}) and port traffic with a signal storm")
            reader, writer = await guest.open_port("soak")
            storm = _SignalStorm(loop)
            console = _ConsoleCheck(streams["console"])
            stop_share = asyncio.Event()
            stop_port = asyncio.Event()
            deadline = time.monotonic() + seconds

            async def sample() -> None:
                while True:
                    report.rss_kib.append(rss_kib())
                    report.fds.append(_fd_count())
                    for name, stream in streams.items():
                        if stream._last and time.monotonic() - stream._last > STALL_SECONDS:
                            say(f"soak: {name} has not moved for {time.monotonic() - stream._last:.0f}s")
                            if name.startswith("port"):
                                say("soak: " + _virtio_state(guest))
                    await asyncio.sleep(interval)

            sampler = asyncio.ensure_future(sample())
            share_task = asyncio.ensure_future(
                _check_share(share, streams["9p guest->host"], deadline, stop_share)
            )
            port_task = asyncio.ensure_future(
                _port_traffic(reader, writer, streams["port guest->host"], stop_port)
            )
            worker = guest.copy_in(_worker.__file__)  # the guest may not see the host's /tmp
            try:
                try:
                    result = await guest.run(
                        ["python3", worker, str(seconds), "/mnt/soak", "/dev/virtio-ports/soak"],
                        output=console.feed, timeout=seconds + 120,
                    )
                except asyncio.CancelledError:
                    # Interrupted: the worker owns the guest's console, so a polite power-off
                    # would wait for nothing; the guest holds nothing worth a clean shutdown.
                    await guest.stop(timeout=_STOP_WHEN_CANCELLED)
                    raise
                stop_port.set()
                host_blocks = await _outcome(port_task, "port traffic", report)
                stop_share.set()
                host_files = await _outcome(share_task, "9P checker", report)
                # A last look for files the guest finished after the checker's last pass.
                await asyncio.to_thread(_share_pass, share, streams["9p guest->host"], host_files, False)
            finally:
                storm.stop()
                sampler.cancel()
                for task in (share_task, port_task):
                    task.cancel()
                writer.close()
                # Kept when cancelled too: an interrupted soak reports what it saw.
                report.signals_sent, report.signals_handled = storm.sent, storm.handled
                report.rss_kib.append(rss_kib())
                report.fds.append(_fd_count())
                counters = getattr(loop, "poller_counters", None)
                if counters is not None:
                    report.poller = counters().as_dict()
            report.errors += console.errors
            if result.status != 0:
                report.errors.append(f"the guest's worker exited with status {result.status}")
            _settle(report, console.summaries, host_files, host_blocks, share)
    finally:
        ticker.cancel()
        shutil.rmtree(share, ignore_errors=True)
        report.seconds = time.monotonic() - started
    return report


async def _outcome(task: asyncio.Future[int], what: str, report: SoakReport) -> int:
    """The task's count, or -1 with the reason in the report's errors (never raises)."""
    try:
        return await asyncio.wait_for(task, 60)
    except asyncio.TimeoutError:
        report.errors.append(f"{what} did not finish within 60 s of the guest's worker")
    except Exception as exc:
        report.errors.append(f"{what} failed: {exc!r}")
    return -1


def _settle(report: SoakReport, guest: dict[str, dict[str, int]], host_files: int,
            host_blocks: int, share: str) -> None:
    """Compare what each sender says it sent with what its receiver checked."""
    s = report.streams
    missing = [name for name in ("console", "ninep", "port") if name not in guest]
    if host_files < 0 or host_blocks < 0:
        missing.append("the host's own counts")
    if missing:
        report.errors.append(f"cannot settle the counts, missing: {', '.join(missing)}")
        return
    report.settled = True
    s["console"].lost = guest["console"]["lines"] - s["console"].items
    left = {name for name in os.listdir(share) if name.startswith("h")}
    # The host's own files: read by the guest, or still waiting when it stopped.
    s["9p host->guest"].items = guest["ninep"]["read"]
    s["9p host->guest"].bytes = guest["ninep"]["rbytes"]
    s["9p host->guest"].lost = host_files - guest["ninep"]["read"] - len(left)
    s["9p guest->host"].lost = guest["ninep"]["wrote"] - s["9p guest->host"].items
    s["9p guest->host"].bad += guest["ninep"]["wbad"]
    s["9p host->guest"].bad += guest["ninep"]["rbad"]
    s["port guest->host"].lost = guest["port"]["sent"] - s["port guest->host"].items
    s["port host->guest"].items = guest["port"]["received"]
    s["port host->guest"].bytes = guest["port"]["received"] * _worker.BLOCK
    s["port host->guest"].bad = guest["port"]["bad"]
    s["port host->guest"].lost = host_blocks - guest["port"]["received"]
