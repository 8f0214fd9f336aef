"""Consoles for people: your terminal joined to a guest's console, and its command.

``python -m sigpoll.console`` (or ``sigpoll-console``) attaches your terminal to a tty or pty
slave (``attach PATH``) or runs a program on a new pty and attaches to it (``run -- CMD``).
:class:`Bridge` is the piece both use (the guest runtime's interactive shell too): it joins
the terminal and a console fd, filters what the console prints (see
:mod:`sigpoll._termfilter`), and on detach puts back the terminal modes the console changed.
The console library itself (transports, ptys, raw mode) is :mod:`sigpoll.tty`.
"""

from __future__ import annotations

from ._bridge import Bridge, parse_escape, show_escape

__all__ = ["Bridge", "parse_escape", "show_escape"]
