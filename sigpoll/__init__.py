"""sigpoll: host guests' devices without losing events.

The public surface is re-exported here; everything else lives in private modules.
"""

import sys as _sys

from ._attach import AttachedPoller, attach
from ._devices import DeviceWatcher, device_watcher
from ._errors import PollerClosedError, SignalMaskWarning, WriteBufferFullError
from ._loop import Loop, new_event_loop, run
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
    "FileLike",
    "Loop",
    "Poller",
    "PollerClosedError",
    "SignalMaskWarning",
    "WriteBufferFullError",
    "attach",
    "device_watcher",
    "new_event_loop",
    "run",
    "threads_not_blocking",
]

if _sys.version_info < (3, 16):
    # Deprecated with asyncio's policies (they warn from 3.12); gone where policies are.
    from ._loop import EventLoopPolicy, install

    __all__ += ["EventLoopPolicy", "install"]

__version__ = "0.1.0"
