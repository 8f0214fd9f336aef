"""sigpoll: host guests' devices without losing events.

The public surface is re-exported here; everything else lives in private modules.
"""

from ._errors import PollerClosedError, SignalMaskWarning
from ._poller import ERROR, HANGUP, READABLE, WRITABLE, Counters, FileLike, Poller
from ._signals import DEFAULT_SIGNAL, threads_not_blocking

__all__ = [
    "DEFAULT_SIGNAL",
    "ERROR",
    "HANGUP",
    "READABLE",
    "WRITABLE",
    "Counters",
    "FileLike",
    "Poller",
    "PollerClosedError",
    "SignalMaskWarning",
    "threads_not_blocking",
]

__version__ = "0.1.0"
