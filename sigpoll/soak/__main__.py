"""``python -m sigpoll.soak --minutes N``: run the soak and print its report.

Exits 0 when nothing was lost, corrupted or stalled, 1 otherwise, 2 for a usage error or a
guest that cannot boot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from ._soak import SoakReport, soak

__all__ = ["main"]


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of minutes: {text!r}") from None
    if not 0 < value <= 24 * 60:
        raise argparse.ArgumentTypeError(f"minutes must be in (0, 1440], not {text}")
    return value


def _say(message: str) -> None:
    print(f"[sigpoll.soak] {message}", file=sys.stderr, flush=True)


def render(report: SoakReport) -> str:
    """The report as a table a person reads."""
    lines = [f"{'stream':<18} {'items':>9} {'MB':>9} {'bad':>4} {'lost':>5} {'longest gap':>12} {'stalls':>6}"]
    for name, s in report.streams.items():
        lines.append(
            f"{name:<18} {s.items:>9} {s.bytes / 1e6:>9.1f} {s.bad:>4} {s.lost:>5} {s.longest_gap:>11.2f}s {s.stalls:>6}"
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
    lines.append(f"{'OK' if report.ok else 'FAILED'}: {report.seconds:.0f}s, nothing lost" if report.ok
                 else f"FAILED after {report.seconds:.0f}s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sigpoll.soak",
        description="Run console, 9P and virtio traffic against one UML guest under a signal storm, "
        "checking every byte; report what moved, what was lost and peak RSS/fds.",
    )
    parser.add_argument("--minutes", type=_minutes, default=1.0, help="how long to run (default 1)")
    parser.add_argument("--kernel", help="UML kernel (default: linux.uml on PATH)")
    parser.add_argument("--mem", default="256M", help="guest memory (default 256M)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS/fd samples")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    args = parser.parse_args(argv)

    import sigpoll
    from ..guest import GuestError

    try:
        report = sigpoll.run(soak(args.minutes * 60, kernel=args.kernel, mem=args.mem,
                                  interval=args.interval, status=_say))
    except GuestError as exc:
        _say(f"cannot run the guest: {exc}")
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        _say("interrupted; the guest was cleaned up")
        return 130
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
