"""sigpoll: host guests' devices without losing events.

The public surface is re-exported here; everything else lives in private modules.
"""

from ._attach import AttachedPoller, attach
from ._devices import DeviceWatcher, device_watcher
from ._errors import PollerClosedError, SignalMaskWarning, WriteBufferFullError
from ._loop import EventLoopPolicy, Loop, install, new_event_loop, run
from ._poller import ERROR, HANGUP, READABLE, WRITABLE, Counters, FileLike, Poller
from ._signals import DEFAULT_SIGNAL, threads_not_blocking

__all__ = [
    "AttachedPoller",
    "DEFAULT_SIGNAL",
    "ERROR",
    "HANGUP",
    "READABLE",
    "WRITABLE",
    "Counters",
    "DeviceWatcher",
    "EventLoopPolicy",
    "FileLike",
    "Loop",
    "Poller",
    "PollerClosedError",
    "SignalMaskWarning",
    "WriteBufferFullError",
    "attach",
    "device_watcher",
    "install",
    "new_event_loop",
    "run",
    "threads_not_blocking",
]

__version__ = "0.1.0"
