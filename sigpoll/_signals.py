"""Choosing the poller's real-time signal and checking that threads block it."""

from __future__ import annotations

import collections
import os
import signal
import threading
import weakref

__all__ = [
    "DEFAULT_SIGNAL",
    "check_signal_free",
    "claim_signal",
    "pick_signal",
    "signals_in_use",
    "threads_not_blocking",
]

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


# -- signals in use by this process's pollers --------------------------------------------------
#
# A poller aims its fds' hints at one thread (F_OWNER_TID), so pollers in different threads
# may share a signal; two pollers read in the same thread (a loop and a poller attached to
# it) must not, or whichever drains the signalfd first takes the other's hints.  The table
# below lets a new poller that has no signal of its own pick one nobody here uses.

_in_use: collections.Counter[int] = collections.Counter()
_in_use_lock = threading.Lock()


def _release(signo: int) -> None:
    with _in_use_lock:
        _in_use[signo] -= 1
        if _in_use[signo] <= 0:
            del _in_use[signo]


def claim_signal(owner: object, signo: int) -> weakref.finalize:  # type: ignore[type-arg]
    """Count ``signo`` as used by ``owner`` (a poller) until the returned finalizer runs.

    Call the finalizer when the owner closes; it also runs when the owner is collected.
    """
    with _in_use_lock:
        _in_use[signo] += 1
    return weakref.finalize(owner, _release, signo)


def signals_in_use() -> frozenset[int]:
    """The real-time signals that live pollers of this process use."""
    with _in_use_lock:
        return frozenset(_in_use)


def pick_signal(avoid: frozenset[int] = frozenset()) -> int:
    """A real-time signal for a new poller: :data:`DEFAULT_SIGNAL` unless it is taken.

    Taken means used by a live poller of this process, in ``avoid``, or given a handler.
    Otherwise the next free one above it is chosen (then below it, towards SIGRTMIN).
    Raises ValueError if every real-time signal is taken.
    """
    taken = signals_in_use() | avoid
    low, high = int(signal.SIGRTMIN), int(signal.SIGRTMAX)
    order = list(range(DEFAULT_SIGNAL, high + 1)) + list(range(DEFAULT_SIGNAL - 1, low - 1, -1))
    for signo in order:
        if signo not in taken and signal.getsignal(signo) is signal.SIG_DFL:
            return signo
    raise ValueError("every real-time signal is in use by a poller or has a handler; "
                     "close a poller or pass signal= explicitly")


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
