"""Shared test configuration."""

from __future__ import annotations

import signal

import sigpoll

# Tests create pollers in the main thread, which blocks the poller's signals there; every
# thread pytest or a test starts afterwards inherits that.  Blocking up front as well keeps
# the order of tests from mattering.
signal.pthread_sigmask(signal.SIG_BLOCK, {sigpoll.DEFAULT_SIGNAL, signal.SIGIO})

import asyncio
import os
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


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """(read end, write end) of a pipe, closed afterwards unless the test closed them."""
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass
