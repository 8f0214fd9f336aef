"""The test suite's own rigs: peers and helpers that are not part of sigpoll.

They live with the tests (the wheel ships none of them); tests import them as ``support``
(pytest puts tests/ on sys.path) and the benches add tests/ to theirs:

- ``support`` itself: :func:`until`, a wait for a state on the running loop, and
  :func:`started`, a command run for one test and never left behind;
- ``support.ninep``: a raw 9P wire client, a server subclass that holds chosen requests
  (the production server has no hook), diod as a real peer;
- ``support.vhost_frontend``: a vhost-user frontend and virtio console driver in Python;
- ``support.virtio``: a protocol that records what a port delivers, a backend runner;
- scripts the tests run as peers elsewhere: ``raw9p.py`` (a 9P client a guest runs against its
  share server), ``posix_checks.py`` (POSIX checks a guest's root runs on a share) and
  ``ninep_proc.py`` (the 9P command with injected faults, in its own process).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["started", "until"]


@contextlib.contextmanager
def started(argv: list[str], **popen: Any) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` started for a test (``popen`` as for :class:`subprocess.Popen`), killed and
    reaped if the test leaves it running."""
    proc = subprocess.Popen(argv, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` on the running loop until it holds; AssertionError after ``timeout``
    (tests wait for a state, never for a fixed time)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)
