"""``python -m sigpoll.stress xxd``: reproduce UML's stalling console, and show the fix.

The tool writes the xxd dump of an endless zero stream into a tty the way UML's console
does, through the chosen poller, and a watchdog counts the stalls: moments the tty was
writable but the writer sat idle past a threshold.  ``--compare`` runs every mode in turn.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

from .._cli import EXIT_FAILURE, Parser, add_verbosity_options, real, setup_logging, signal_status, size
from ._report import ModeResult, header_line, json_report, progress_line, summary_table
from ._watchdog import Watchdog
from ._writers import MODES, Target, Writer, make_writer, open_pty, open_terminal, uvloop_missing

__all__ = ["build_parser", "main"]

DEFAULT_SECONDS = 10.0
DEFAULT_STALL_MS = 200.0
#: The pty reader's pace, like a terminal emulator that can only draw so fast.  Far below
#: what every writer sustains (50-85 MB/s unpaced on the project's 2-core machines), so
#: writers that never stall all deliver exactly this and keep doing so when other load
#: takes CPU time; unpaced, run-to-run noise (+-10%) swamps any difference between modes.
DEFAULT_READER_MBPS = 10.0
# How often the main thread looks at the writer (SIGINT, progress line).
_TICK = 0.1
_PROGRESS_EVERY = 0.25


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``python -m sigpoll.stress xxd [options]``."""
    parser = Parser("sigpoll.stress", description="Stress tools and reproducers for sigpoll.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    xxd = commands.add_parser(
        "xxd",
        help="write `xxd /dev/zero` into a tty like UML's console and count stalls",
        description=(
            "Write the xxd dump of an endless zero stream into a tty through the chosen "
            "poller, against a reader slow enough to force EAGAIN, and count stalls (the tty "
            "writable, the writer idle past --stall-ms).  Writes into this terminal when "
            "stdout is one (and --json is not given), otherwise into a fresh pty."
        ),
        epilog="Exit status: 0; 1 if the sigpoll mode stalled or a mode failed to run; 2 for bad "
               "options; 130 or 143 when stopped by SIGINT or SIGTERM (after the summary so far).",
    )
    which = xxd.add_mutually_exclusive_group()
    which.add_argument("--mode", choices=MODES, default=None, help="the writer's poller (default: sigpoll)")
    which.add_argument("--compare", action="store_true", help="run every mode, one after another")
    xxd.add_argument(
        "--seconds",
        type=real(0, above=True, what="a number of seconds"),
        default=None,
        help=f"run time per mode (default: {DEFAULT_SECONDS:g}, or no limit when --bytes is given)",
    )
    xxd.add_argument("--bytes", type=size(1), default=None, metavar="SIZE",
                     help="stop each mode after this many bytes written (64K, 100M...)")
    xxd.add_argument("--json", action="store_true", help="print one JSON object keyed by mode on stdout, nothing else")
    xxd.add_argument(
        "--stall-ms", type=real(0, above=True, what="a number of milliseconds"), default=DEFAULT_STALL_MS,
        help="stall threshold in ms"
    )
    xxd.add_argument(
        "--reader-mbps",
        type=real(0, what="a number of MB/s"),
        default=DEFAULT_READER_MBPS,
        help="pace of the pty reader in MB/s; 0 reads as fast as it can",
    )
    xxd.add_argument("--pty", action="store_true", help="use a fresh pty even when stdout is a terminal")
    add_verbosity_options(xxd)
    return parser


class _Run:
    """State shared between the main thread's loop and the SIGINT handler."""

    def __init__(self) -> None:
        self.interrupted = threading.Event()
        self.signum: int | None = None  #: the first stop signal, for the exit status
        self.writer: Writer | None = None

    def on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: set a flag and wake the writer.
        # Raising KeyboardInterrupt instead could cut short the restoring of the tty.
        if self.signum is None:
            self.signum = signum
        self.interrupted.set()
        writer = self.writer
        if writer is not None:
            writer.stop()


def _same_tty(fd_a: int, fd_b: int) -> bool:
    try:
        return os.path.samestat(os.fstat(fd_a), os.fstat(fd_b))
    except OSError:
        return False


def _run_mode(mode: str, opts: argparse.Namespace, state: _Run, in_terminal: bool, seconds: float | None) -> ModeResult:
    """Run one mode into a fresh target and return its result."""
    result = ModeResult(mode)
    try:
        target: Target = open_terminal() if in_terminal else open_pty(opts.reader_mbps)
    except (OSError, RuntimeError) as exc:
        result.error = f"cannot open the tty: {exc}"
        return result
    writer: Writer | None = None
    thread: threading.Thread | None = None
    watchdog: Watchdog | None = None
    progress: TextIO | None = None
    # A progress line in the terminal we are flooding would be lost in the stream, and
    # that terminal's file is non-blocking while we run: only show it elsewhere.
    if sys.stderr.isatty() and not getattr(opts, "quiet", False) and not (in_terminal and _same_tty(2, target.fd)):
        progress = sys.stderr
    try:
        writer = make_writer(mode, target.fd, seconds=seconds, limit=opts.bytes)
        # The poller first, the threads after: they inherit the signal mask it sets up.
        writer.prepare()
        watchdog = Watchdog(target.fd, writer.stats, opts.stall_ms / 1000.0)
        thread = threading.Thread(target=writer.run, name=f"sigpoll-stress-{mode}", daemon=True)
        state.writer = writer
        thread.start()
        watchdog.start()
        if state.interrupted.is_set():
            writer.stop()
        shown = 0.0
        while thread.is_alive():
            thread.join(_TICK)
            now = time.monotonic()
            if progress is not None and now - shown >= _PROGRESS_EVERY:
                shown = now
                h = writer.hint_counts()
                line = progress_line(
                    mode, writer.stats.elapsed, writer.stats.bytes, h.sigios, h.hints, h.recovered,
                    watchdog.snapshot().stalls,
                )
                progress.write("\r" + line + "\x1b[K")
                progress.flush()
        stalls = watchdog.stop()
        state.writer = None
        writer.close()
        h = writer.hint_counts()
        st = writer.stats
        result = ModeResult(
            mode,
            bytes=st.bytes,
            seconds=st.elapsed,
            sigios=h.sigios,
            hints=h.hints,
            recovered=h.recovered,
            stalls=stalls.stalls,
            longest_stall_ms=stalls.longest_ms,
            writes=st.writes,
            eagains=st.eagains,
            nudges=st.nudges,
            interrupted=state.interrupted.is_set(),
            error=writer.error,
        )
    except (OSError, RuntimeError, ValueError) as exc:
        # Setting up the poller or loop failed: one line in the summary, not a traceback.
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        state.writer = None
        # On the error paths the writer may still be running: stop it before its poller
        # goes away.  Everything here is idempotent.
        if writer is not None:
            writer.stop()
            if thread is not None and thread.ident is not None:
                thread.join()
            if watchdog is not None:
                watchdog.stop()
            writer.close()
        if progress is not None:
            progress.write("\r\x1b[K")
            progress.flush()
        if in_terminal and writer is not None and not writer.stats.ends_with_newline:
            # Start the summary (or the next mode) on a line of its own.
            os.write(target.fd, b"\n")
        target.close()
    return result


def run(opts: argparse.Namespace) -> int:
    """Run the xxd stress as parsed; return the exit status."""
    modes = list(MODES) if opts.compare else [opts.mode or "sigpoll"]
    seconds: float | None = opts.seconds
    if seconds is None and opts.bytes is None:
        seconds = DEFAULT_SECONDS
    # --json owns stdout, so the stream cannot go there.
    in_terminal = not opts.json and not opts.pty and os.isatty(1)
    state = _Run()
    on_main = threading.current_thread() is threading.main_thread()
    # SIGTERM too: a plain kill must not leave the user's terminal non-blocking either.
    stop_signals = (signal.SIGINT, signal.SIGTERM) if on_main else ()
    old_handlers = {signo: signal.signal(signo, state.on_stop_signal) for signo in stop_signals}
    results: list[ModeResult] = []
    target = "this terminal" if in_terminal else (
        f"a pty (reader process paced at {opts.reader_mbps:g} MB/s)" if opts.reader_mbps > 0
        else "a pty (reader process unpaced)"
    )
    if not getattr(opts, "quiet", False):
        # What is about to happen, before it does (the summary repeats it at the end).
        sys.stderr.write(header_line(target=target, seconds=seconds, limit=opts.bytes,
                                     stall_ms=opts.stall_ms) + "\n")
        sys.stderr.flush()
    try:
        sys.stdout.flush()
        for mode in modes:
            if state.interrupted.is_set():
                results.append(ModeResult(mode, skipped="interrupted before it ran"))
                continue
            if mode == "uvloop":
                missing = uvloop_missing()
                if missing:
                    results.append(ModeResult(mode, skipped=missing))
                    continue
            results.append(_run_mode(mode, opts, state, in_terminal, seconds))
    finally:
        for signo, handler in old_handlers.items():
            signal.signal(signo, handler)
    table = summary_table(results, target=target, seconds=seconds, limit=opts.bytes, stall_ms=opts.stall_ms)
    if opts.json:
        sys.stderr.write(table + "\n")
        sys.stderr.flush()
        sys.stdout.write(json_report(results) + "\n")
    else:
        sys.stdout.write(table + "\n")
    sys.stdout.flush()
    # The point of the tool: the sigpoll mode must never stall.  A run that broke down
    # measured nothing, so it must not pass either.
    failed = any((r.mode == "sigpoll" and r.stalls) or r.error for r in results)
    if state.signum is not None:
        return signal_status(state.signum)
    return EXIT_FAILURE if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and run; return the status."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    setup_logging(opts, own="sigpoll.stress")
    if opts.mode == "uvloop":
        missing = uvloop_missing()
        if missing:
            parser.error(f"--mode uvloop: {missing}")
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
