"""``python -m sigpoll.stress xxd``: in a real terminal, as JSON, with bad options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from sigpoll.stress._watchdog import Watchdog
from sigpoll.stress._writers import MODES, WriterStats
from sigpoll.stress.xxd import zero_chunk

__all__: list[str] = []

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed")

try:
    import uvloop  # noqa: F401

    HAVE_UVLOOP = True
except ImportError:
    HAVE_UVLOOP = False

JSON_KEYS = {"bytes", "mb_per_s", "sigios", "hints", "recovered", "stalls", "longest_stall_ms"}
TOOL = [sys.executable, "-m", "sigpoll.stress", "xxd"]
DUMP_LINE = re.compile(rb"^[0-9a-f]{8,}: 0000 0000 0000 0000 0000 0000 0000 0000  \.{16}$", re.M)


def run_tool(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the tool with pipes (so it writes into a fresh pty of its own)."""
    return subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class TerminalRun:
    """What came out of a run in a pexpect terminal."""

    output: bytes  # all of it, with the terminal's \r\n turned back into \n
    exitstatus: int | None
    elapsed: float


def run_in_terminal(argv: Sequence[str], *, interrupt_after: float | None = None, timeout: float = 30) -> TerminalRun:
    """Run ``argv`` in a pexpect pty, reading everything it writes until it exits.

    The tool floods its terminal, so the output must be drained all the time or it
    would simply block; only the text is kept (a few hundred MB at most).
    """
    child = pexpect.spawn(argv[0], list(argv[1:]), timeout=timeout, echo=False)
    chunks: list[bytes] = []
    start = time.monotonic()
    interrupted = False
    while True:
        if interrupt_after is not None and not interrupted and time.monotonic() - start > interrupt_after:
            child.sendintr()
            interrupted = True
        try:
            chunks.append(child.read_nonblocking(1 << 16, timeout=timeout))
        except pexpect.TIMEOUT:
            continue
        except pexpect.EOF:
            break
        if time.monotonic() - start > timeout:
            child.terminate(force=True)
            pytest.fail("the tool did not finish in time")
    child.close()
    elapsed = time.monotonic() - start
    return TerminalRun(b"".join(chunks).replace(b"\r\n", b"\n"), child.exitstatus, elapsed)


def summary_of(output: bytes) -> str:
    """The summary table at the end of a terminal run."""
    at = output.rfind(b"xxd /dev/zero into")
    assert at >= 0, output[-2000:]
    return output[at:].decode()


# Prints whether the terminal's (shared) file description was left non-blocking or async.
FLAGS_PROBE = textwrap.dedent(
    """
    import fcntl, os
    fl = fcntl.fcntl(1, fcntl.F_GETFL)
    print(f"flags-after nonblock={int(bool(fl & os.O_NONBLOCK))} async={int(bool(fl & os.O_ASYNC))}")
    """
)


# -- in a real terminal ------------------------------------------------------------------


def test_terminal_run_prints_the_dump_and_a_summary() -> None:
    """With stdout a terminal, the dump goes into that terminal; flags come back intact."""
    script = (
        f"{' '.join(TOOL)} --seconds 3; echo \"tool-status=$?\"; {sys.executable} -c '{FLAGS_PROBE}'"
    )
    run = run_in_terminal(["/bin/sh", "-c", script], timeout=30)
    out = run.output
    assert run.exitstatus == 0
    assert len(DUMP_LINE.findall(out[:200_000])) > 1000, out[:500]
    header, _, out = out.partition(b"\n")  # what the run does, said before it starts
    assert header.startswith(b"xxd /dev/zero into this terminal; each mode stops after 3 s")
    assert out.startswith(zero_chunk(0, 1 << 16)[:100_000])
    summary = summary_of(out)
    assert "into this terminal" in summary
    row = re.search(r"^sigpoll\s+([\d,]+)\s+([\d.]+)\s", summary, re.M)
    assert row, summary
    assert int(row.group(1).replace(",", "")) > 1_000_000
    assert "sigpoll: no stalls" in summary
    assert "tool-status=0" in summary
    assert "flags-after nonblock=0 async=0" in summary


def test_bytes_in_terminal_writes_exactly_that_much_dump() -> None:
    nbytes = 123_457
    run = run_in_terminal([*TOOL, "--bytes", str(nbytes)])
    assert run.exitstatus == 0
    dump = zero_chunk(0, (nbytes // 68 + 2) * 16)[:nbytes]
    header, _, output = run.output.partition(b"\n")
    assert header.startswith(b"xxd /dev/zero into this terminal")
    assert output.startswith(dump)
    # The dump stopped mid-line, so the summary starts on a fresh line after it.
    assert output[nbytes : nbytes + 20] == b"\nxxd /dev/zero into "
    assert f"sigpoll  {nbytes:,}" in summary_of(run.output)


def test_sigint_stops_cleanly_with_the_summary_so_far() -> None:
    # The shell is in the terminal's foreground group too: a trap keeps it going (its
    # children still get the default SIGINT disposition, which the tool replaces).
    script = (
        f"trap : INT; {' '.join(TOOL)} --seconds 60; echo \"tool-status=$?\"; "
        f"{sys.executable} -c '{FLAGS_PROBE}'"
    )
    run = run_in_terminal(["/bin/sh", "-c", script], interrupt_after=1.5, timeout=30)
    assert run.elapsed < 15
    summary = summary_of(run.output)
    assert "Traceback" not in run.output.decode(errors="replace")
    assert "sigpoll: no stalls; interrupted" in summary
    assert "tool-status=130" in summary  # the convention for a command stopped by ^C
    assert "flags-after nonblock=0 async=0" in summary


# -- JSON --------------------------------------------------------------------------------


def test_json_compare_structure() -> None:
    proc = run_tool("--compare", "--seconds", "1.5", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing but the one object on stdout
    assert list(report) == list(MODES)
    for mode, entry in report.items():
        assert JSON_KEYS <= set(entry), mode
        if mode == "uvloop" and not HAVE_UVLOOP:
            assert entry["skipped"]
            continue
        assert entry["skipped"] is None
        assert entry["bytes"] > 0
        # bytes > 0 says it moved; the rate is rounded, and a naive run that stalls at once rounds to 0.0.
        assert isinstance(entry["mb_per_s"], (int, float)) and entry["mb_per_s"] >= 0
        assert entry["stalls"] >= 0 and entry["longest_stall_ms"] >= 0
    sp = report["sigpoll"]
    assert sp["stalls"] == 0 and sp["longest_stall_ms"] == 0
    assert sp["sigios"] > 0 and sp["hints"] > 0
    # The reader is slow enough that writes keep hitting EAGAIN.
    assert sp["eagains"] > 100
    for mode in ("asyncio", "uvloop"):
        if report[mode]["skipped"] is None:
            assert report[mode]["sigios"] == report[mode]["hints"] == report[mode]["recovered"] == 0
    # The summary table went to stderr.
    assert "sigpoll: no stalls" in proc.stderr


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the SIGIO/epoll race needs a second CPU")
def test_naive_mode_reproduces_the_stall() -> None:
    """UML's scheme loses a wakeup within seconds; the sigpoll mode did not (see above)."""
    proc = run_tool("--mode", "naive", "--seconds", "5", "--json")
    assert proc.returncode == 0, proc.stderr  # naive stalls do not fail the run
    naive = json.loads(proc.stdout)["naive"]
    assert naive["stalls"] > 0
    assert naive["longest_stall_ms"] > 200


@pytest.mark.parametrize("mode", ["sigpoll", "naive", "asyncio"])
def test_bytes_stops_at_the_byte_count(mode: str) -> None:
    proc = run_tool("--mode", mode, "--bytes", "250001", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[mode]["bytes"] == 250_001


@pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
def test_uvloop_mode() -> None:
    proc = run_tool("--mode", "uvloop", "--seconds", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["uvloop"]
    assert entry["bytes"] > 0 and entry["stalls"] == 0


def test_missing_uvloop_is_reported() -> None:
    """Without uvloop, --compare marks it skipped and --mode uvloop is a bad option."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["uvloop"] = None  # makes `import uvloop` fail
        from sigpoll.stress.__main__ import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "xxd", "--compare", "--bytes", "20000", "--json"],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    entry = json.loads(proc.stdout)["uvloop"]
    assert "uvloop" in entry["skipped"] and entry["bytes"] is None
    proc = subprocess.run(
        [sys.executable, "-c", code, "xxd", "--mode", "uvloop"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "uvloop" in proc.stderr


# -- bad options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["xxd", "--mode", "bogus"],
        ["xxd", "--seconds", "-1"],
        ["xxd", "--seconds", "soon"],
        ["xxd", "--bytes", "0"],
        ["xxd", "--stall-ms", "0"],
        ["xxd", "--frobnicate"],
        ["xxd", "--mode", "naive", "--compare"],
        ["hexdump"],
    ],
)
def test_bad_options_exit_2_with_one_line(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sigpoll.stress", *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "error:" in proc.stderr


# -- the watchdog alone ------------------------------------------------------------------


def test_watchdog_counts_an_idle_writer_on_a_writable_fd() -> None:
    r, w = os.pipe()  # an empty pipe's write end is always writable
    try:
        stats = WriterStats()
        dog = Watchdog(w, stats, threshold_s=0.1)
        stats.begin()
        dog.start()
        # Busy for 0.3 s (writes every 10 ms), then idle for 0.35 s, then busy again.
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            stats.last_write = time.monotonic()
            time.sleep(0.01)
        time.sleep(0.35)
        stats.last_write = time.monotonic()
        time.sleep(0.05)
        stats.finish()
        report = dog.stop()
    finally:
        os.close(r)
        os.close(w)
    assert report.stalls == 1
    assert 300 <= report.longest_ms < 1000


def test_watchdog_ignores_a_waiting_writer_on_a_full_fd() -> None:
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        while True:  # fill the pipe: not writable, so waiting is right
            try:
                os.write(w, b"x" * 65536)
            except BlockingIOError:
                break
        stats = WriterStats()
        dog = Watchdog(w, stats, threshold_s=0.05)
        stats.begin()
        dog.start()
        time.sleep(0.3)
        stats.finish()
        report = dog.stop()
    finally:
        os.close(r)
        os.close(w)
    assert report.stalls == 0 and report.longest_ms == 0


def test_threads_start_after_the_poller() -> None:
    """The watchdog and writer threads block the poller's signals (inherited)."""
    import signal

    import sigpoll
    from sigpoll.stress._writers import make_writer

    master, slave = os.openpty()
    try:
        writer = make_writer("sigpoll", slave, seconds=0.2, limit=None)
        writer.prepare()
        seen: list[set[int]] = []
        t = threading.Thread(target=lambda: seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        t.start()
        t.join()
        writer.close()
    finally:
        os.close(master)
        os.close(slave)
    assert sigpoll.DEFAULT_SIGNAL in seen[0]
    assert signal.SIGIO in seen[0]
