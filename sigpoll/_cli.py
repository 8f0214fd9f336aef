"""Command-line pieces the ``python -m sigpoll...`` servers share."""

from __future__ import annotations

import argparse

from ._poller import _MAX_BUSY_POLL_US

__all__ = ["add_busy_poll_option"]


def _busy_poll_us(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= _MAX_BUSY_POLL_US:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"must be a number of microseconds from 0 to {_MAX_BUSY_POLL_US}, got {text!r}")
    return value


def add_busy_poll_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--busy-poll-us N``: the loop's adaptive busy-polling ceiling (0, off, by default)."""
    parser.add_argument(
        "--busy-poll-us", type=_busy_poll_us, default=0.0, metavar="N",
        help="before sleeping, poll for events for up to N microseconds (adaptive): "
             "lower latency per request for a spinning CPU (default 0: off)")
