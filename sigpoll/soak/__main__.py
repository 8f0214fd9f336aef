"""``python -m sigpoll.soak --minutes N`` (``sigpoll-soak``): run the soak and print its report.

Exits 0 when nothing was lost, corrupted or stalled, 1 otherwise (or when the guest cannot
run), 2 for a usage error, 130/143 when stopped by SIGINT/SIGTERM (after the report so far).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from .._cli import (
    EXIT_FAILURE,
    Parser,
    Progress,
    add_verbosity_options,
    format_size,
    real,
    run_command,
    setup_logging,
    size,
)
from ._soak import SoakReport, soak

__all__ = ["main", "progress_line", "render"]

log = logging.getLogger("sigpoll.soak")


def render(report: SoakReport, *, interrupted: bool = False) -> str:
    """The report as a table a person reads."""
    lines = [f"{'stream':<18} {'items':>9} {'MB':>9} {'bad':>4} {'lost':>5} {'longest gap':>12} {'stalls':>6}"]
    for name, s in report.streams.items():
        lost = f"{s.lost:>5}" if report.settled else f"{'?':>5}"
        lines.append(
            f"{name:<18} {s.items:>9} {s.bytes / 1e6:>9.1f} {s.bad:>4} {lost} {s.longest_gap:>11.2f}s {s.stalls:>6}"
        )
    rss, fds = report.rss_kib, report.fds
    if rss:
        lines.append(f"host RSS: first {rss[0] / 1024:.1f} MiB, peak {max(rss) / 1024:.1f} MiB, last {rss[-1] / 1024:.1f} MiB")
    if fds:
        lines.append(f"host fds: first {fds[0]}, peak {max(fds)}, last {fds[-1]}")
    lines.append(f"signals: {report.signals_sent} sent in bursts, {report.signals_handled} handler runs")
    if report.poller:
        lines.append("poller: " + ", ".join(f"{k}={v}" for k, v in report.poller.items()))
    lines += [f"error: {e}" for e in report.errors]
    if interrupted:
        lines.append(f"INTERRUPTED after {report.seconds:.0f}s: the counts so far (what was lost is "
                     "settled only at the end of a full run)")
    elif report.ok:
        lines.append(f"OK: {report.seconds:.0f}s, nothing lost")
    else:
        lines.append(f"FAILED after {report.seconds:.0f}s")
    return "\n".join(lines)


def progress_line(report: SoakReport, total: float) -> str:
    """The live line: time, what each stream moved, what went wrong so far, RSS."""
    if not report.rss_kib:  # the first sample is taken once the traffic starts
        return f"soak: starting the guest ({report.seconds:.0f}s)"
    # The host->guest streams are counted by the guest, which says so at the end.
    moved = "  ".join(f"{name} {s.bytes / 1e6:.1f}MB" for name, s in report.streams.items()
                      if report.settled or "host->guest" not in name)
    bad = sum(s.bad for s in report.streams.values())
    stalls = sum(s.stalls for s in report.streams.values())
    rss = f"RSS {report.rss_kib[-1] / 1024:.0f}MiB" if report.rss_kib else "RSS ?"
    return f"soak {report.seconds:.0f}/{total:.0f}s  {moved}  bad {bad}  stalls {stalls}  {rss}"


def _parser() -> Parser:
    parser = Parser(
        "sigpoll.soak",
        description="Run console, 9P and virtio traffic against one UML guest under a signal storm, "
        "checking every byte; report what moved, what was lost and peak RSS/fds.",
    )
    parser.add_argument("--minutes", type=real(0, 24 * 60, above=True, what="a number of minutes"),
                        default=1.0, help="how long to run")
    parser.add_argument("--kernel", help="UML kernel (default: linux.uml on PATH)")
    parser.add_argument("--mem", type=size(64 << 20), default=256 << 20, metavar="SIZE", help="guest memory")
    parser.add_argument("--interval", type=real(0, 3600, above=True, what="a number of seconds"),
                        default=5.0, help="seconds between RSS/fd samples")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    add_verbosity_options(parser)
    return parser


async def _run(args: argparse.Namespace, report: SoakReport, bar: Progress) -> int | None:
    """The soak's status; None when the guest could not run (said in one error line)."""
    from ..guest import GuestError

    seconds = args.minutes * 60
    try:
        await soak(seconds, kernel=args.kernel, mem=format_size(args.mem), interval=args.interval,
                   status=log.info, report=report,
                   progress=lambda r: bar.update(progress_line(r, seconds)))
    except (GuestError, OSError) as exc:
        log.error("cannot run the guest: %s", exc)
        return None
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    args = _parser().parse_args(argv)
    setup_logging(args, own="sigpoll.soak")
    report = SoakReport()
    with Progress(enabled=None if not args.quiet else False) as bar:
        ran: list[int | None] = []

        async def run() -> int:
            ran.append(await _run(args, report, bar))
            return ran[-1] or 0

        status = run_command(run(), logger=log)
    if ran == [None]:
        return EXIT_FAILURE
    interrupted = status >= 128
    if interrupted:
        log.info("interrupted after %.0fs; the guest was cleaned up", report.seconds)
    if args.json:
        print(json.dumps({**report.as_dict(), "interrupted": interrupted}, indent=2))
    else:
        print(render(report, interrupted=interrupted))
    return status


if __name__ == "__main__":
    sys.exit(main())
