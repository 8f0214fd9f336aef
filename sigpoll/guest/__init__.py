"""The guest runtime: User-Mode Linux guests whose devices are backed by sigpoll.

``python -m sigpoll.guest run`` boots a guest on your terminal; :class:`Guest` does the same
from Python::

    async with sigpoll.guest.Guest() as g:
        result = await g.run("uname -a")
"""

from ._guest import BootError, CommandResult, Guest, GuestError

__all__ = ["BootError", "CommandResult", "Guest", "GuestError"]
