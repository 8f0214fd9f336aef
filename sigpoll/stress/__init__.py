"""Reproducers and stress tools for sigpoll.

``python -m sigpoll.stress xxd`` plays User-Mode Linux's console: it writes the xxd dump
of an endless zero stream into a tty through a chosen poller and counts the stalls that
the SIGIO/epoll race causes.  The pure formatter lives in :mod:`sigpoll.stress.xxd`.
"""

from __future__ import annotations

from .xxd import ZeroStream, format_lines, zero_chunk

__all__ = ["ZeroStream", "format_lines", "zero_chunk"]
