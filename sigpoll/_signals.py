"""Choosing the poller's real-time signal and checking that threads block it."""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["DEFAULT_SIGNAL", "check_signal_free", "threads_not_blocking"]

#: The default hint signal.  Libraries that need one real-time signal tend to take
#: SIGRTMIN or the first few above it, or count down from SIGRTMAX; SIGRTMIN + 8 sits
#: clear of both ends.  Pass ``signal=`` to Poller to choose another.
DEFAULT_SIGNAL: int = signal.SIGRTMIN + 8


def check_signal_free(signo: int) -> None:
    """Raise ValueError if ``signo`` is not a real-time signal or already has a handler.

    Sharing the signal with a handler would send the hints to that handler (or send its
    signals into the poller), so a collision is refused up front rather than debugged later.
    """
    if not signal.SIGRTMIN <= signo <= signal.SIGRTMAX:
        raise ValueError(
            f"signal {signo} is not a real-time signal "
            f"(choose one from {int(signal.SIGRTMIN)} to {int(signal.SIGRTMAX)})"
        )
    handler = signal.getsignal(signo)
    if handler is not signal.SIG_DFL:  # None too: a handler installed outside Python
        raise ValueError(
            f"signal {signo} already has a handler ({handler!r}); "
            "pass another real-time signal as Poller(signal=...)"
        )


def _blocked_mask(status_path: str) -> int | None:
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("SigBlk:"):
                    return int(line.split()[1], 16)
    except OSError:
        return None  # the thread exited while we looked
    return None


def threads_not_blocking(*signals: int) -> list[int]:
    """Thread ids of this process (other than the caller) that do not block all ``signals``.

    Read from /proc/self/task/*/status, so it also sees threads started by C libraries.
    """
    own = threading.get_native_id()
    need = 0
    for signo in signals:
        need |= 1 << (int(signo) - 1)
    result = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    for name in tids:
        tid = int(name)
        if tid == own:
            continue
        mask = _blocked_mask(f"/proc/self/task/{name}/status")
        if mask is not None and mask & need != need:
            result.append(tid)
    return sorted(result)
