"""Shared test configuration."""

from __future__ import annotations

import signal

import sigpoll

# Tests create pollers in the main thread, which blocks the poller's signals there; every
# thread pytest or a test starts afterwards inherits that.  Blocking up front as well keeps
# the order of tests from mattering.
signal.pthread_sigmask(signal.SIG_BLOCK, {sigpoll.DEFAULT_SIGNAL, signal.SIGIO})

# A shell without job control (a CI script, `cmd &` in a script) starts its background jobs
# with SIGINT ignored, and an ignored signal stays ignored across exec: every program a test
# starts would then shrug off the Ctrl-C the test sends it (Python leaves SIGINT alone when
# it starts ignored), and the Ctrl-C tests would hang.  Tests run as if from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import asyncio
import os
import tty
from collections.abc import Callable, Iterator

import pytest

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _loop_factories() -> list[tuple[str, LoopFactory]]:
    """Every loop a test body runs on: stock asyncio and sigpoll's.

    One body, several loops (uvloop's way): any difference in behaviour shows up as a
    test that passes on one and fails on the other.
    """
    return [("asyncio", asyncio.new_event_loop), ("sigpoll", sigpoll.new_event_loop)]


@pytest.fixture(params=[name for name, _ in _loop_factories()])
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    return dict(_loop_factories())[request.param]


@pytest.fixture
def run(loop_factory: LoopFactory) -> Callable[..., object]:
    """run(coro) on a fresh loop of the parametrised kind."""

    def runner(coro: object, timeout: float = 60) -> object:
        loop = loop_factory()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return runner


def _close_unless_closed(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass  # the test closed it


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """(read end, write end) of a pipe, closed afterwards unless the test closed them."""
    r, w = os.pipe()
    yield r, w
    _close_unless_closed(r, w)


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    """(master, slave) of a raw pty; the master is the "device" a loop or poller watches."""
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, slave
    _close_unless_closed(master, slave)


def _host_loop_names() -> list[str]:
    """The loops sigpoll.attach() is tried in (and sigpoll's own): uvloop where installed."""
    names = ["asyncio", "sigpoll"]
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return names
    return names + ["uvloop"]


def _new_host_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    if name == "sigpoll":
        return sigpoll.new_event_loop()
    return asyncio.SelectorEventLoop()


@pytest.fixture(params=_host_loop_names())
def host_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh loop of each kind a backend or attach() may run on; closed afterwards."""
    loop = _new_host_loop(request.param)
    yield loop
    loop.close()


@pytest.fixture(params=[n for n in _host_loop_names() if n != "sigpoll"])
def foreign_loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that is not sigpoll's: its backends need attach() for race-free devices."""
    loop = _new_host_loop(request.param)
    yield loop
    loop.close()
