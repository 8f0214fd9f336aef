"""Reporting for the stress tool: the live progress line, the summary table, the JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["ModeResult", "header_line", "json_report", "progress_line", "summary_table"]


@dataclasses.dataclass
class ModeResult:
    """The outcome of one mode's run (or why it did not run)."""

    mode: str
    skipped: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    sigios: int = 0
    hints: int = 0
    recovered: int = 0
    stalls: int = 0
    longest_stall_ms: float = 0.0
    writes: int = 0
    eagains: int = 0
    nudges: int = 0
    interrupted: bool = False
    error: str | None = None

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10**6 bytes)."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """The JSON object for this mode: the documented keys first, then extras.

        A skipped mode keeps every key (numbers as null) so consumers need no special
        case beyond checking ``skipped``.
        """
        ran = self.skipped is None
        return {
            "bytes": self.bytes if ran else None,
            # To 0.1 MB/s: with a paced reader every writer that keeps up delivers the same
            # rate to within a few reads (~1e-4); more digits would rank ties at random.
            "mb_per_s": round(self.mb_per_s, 1) if ran else None,
            "sigios": self.sigios if ran else None,
            "hints": self.hints if ran else None,
            "recovered": self.recovered if ran else None,
            "stalls": self.stalls if ran else None,
            "longest_stall_ms": self.longest_stall_ms if ran else None,
            "seconds": round(self.seconds, 3) if ran else None,
            "writes": self.writes if ran else None,
            "eagains": self.eagains if ran else None,
            "nudges": self.nudges if ran else None,
            "interrupted": self.interrupted,
            "error": self.error,
            "skipped": self.skipped,
        }


def json_report(results: Sequence[ModeResult]) -> str:
    """Exactly one JSON object, keyed by mode."""
    return json.dumps({r.mode: r.as_json() for r in results}, indent=2)


def progress_line(
    mode: str, elapsed: float, nbytes: int, sigios: int, hints: int, recovered: int, stalls: int
) -> str:
    """One status line for stderr (no newline; the caller rewrites it in place)."""
    rate = nbytes / elapsed / 1e6 if elapsed > 0 else 0.0
    return (
        f"{mode:>7}  {elapsed:6.1f} s  {nbytes / 1e6:9.1f} MB  {rate:7.1f} MB/s  "
        f"SIGIOs {sigios:,}  hints {hints:,}  recovered {recovered:,}  stalls {stalls}"
    )


_COLUMNS = (
    ("mode", "<"),
    ("bytes", ">"),
    ("MB/s", ">"),
    ("SIGIOs", ">"),
    ("hints", ">"),
    ("recovered", ">"),
    ("EAGAINs", ">"),
    ("stalls", ">"),
    ("longest stall", ">"),
)


def _row(r: ModeResult) -> list[str]:
    return [
        r.mode,
        f"{r.bytes:,}",
        f"{r.mb_per_s:.1f}",
        f"{r.sigios:,}",
        f"{r.hints:,}",
        f"{r.recovered:,}",
        f"{r.eagains:,}",
        f"{r.stalls:,}",
        f"{r.longest_stall_ms:,.0f} ms",
    ]


def header_line(*, target: str, seconds: float | None, limit: int | None, stall_ms: float) -> str:
    """What the run does: shown when it starts, and again above the summary."""
    stop = []
    if seconds is not None:
        stop.append(f"{seconds:g} s")
    if limit is not None:
        stop.append(f"{limit:,} bytes")
    return (f"xxd /dev/zero into {target}; each mode stops after {' or '.join(stop)}; "
            f"a stall is > {stall_ms:g} ms writable but idle")


def summary_table(
    results: Sequence[ModeResult], *, target: str, seconds: float | None, limit: int | None, stall_ms: float
) -> str:
    """The end-of-run summary: one header line, one row per mode, one verdict per mode."""
    lines = [header_line(target=target, seconds=seconds, limit=limit, stall_ms=stall_ms), ""]
    rows = [[name for name, _ in _COLUMNS]]
    rows += [_row(r) for r in results if r.skipped is None]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    for row in rows:
        cells = [f"{cell:{align}{w}}" for cell, (_, align), w in zip(row, _COLUMNS, widths)]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    for r in results:
        lines.append(_verdict(r))
    return "\n".join(lines)


def _verdict(r: ModeResult) -> str:
    if r.skipped is not None:
        return f"{r.mode}: skipped: {r.skipped}"
    notes = []
    if r.error:
        notes.append(f"error: {r.error}")
    if r.interrupted:
        notes.append("interrupted")
    if r.stalls:
        what = f"{r.stalls} stall{'s' if r.stalls != 1 else ''}, longest {r.longest_stall_ms:,.0f} ms"
        if r.nudges:
            what += f" ({r.nudges} un-stalled only by the 1 s 'keypress')"
        notes.insert(0, what)
    else:
        notes.insert(0, "no stalls")
    return f"{r.mode}: " + "; ".join(notes)
