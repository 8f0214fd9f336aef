"""``python -m sigpoll.soak``: every backend under load at once, checked end to end.

:func:`soak` boots one User-Mode Linux guest and keeps its console, a 9P share and a
virtio-console port busy with checked traffic for the given time while signals hit the host
process in bursts; the :class:`SoakReport` says what moved, what was lost (it must be nothing),
the longest stall of each stream and the host's RSS and open fds over the run.
"""

from ._soak import STALL_SECONDS, SoakReport, soak

__all__ = ["STALL_SECONDS", "SoakReport", "soak"]
