"""Adaptive busy polling: it answers waits without sleeping when events come quickly, sleeps
at once when they do not, keeps timeouts, and never lets a signal wait for the next event."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import sigpoll
from sigpoll import READABLE, Poller


Polling = Callable[[float], Poller]


@pytest.fixture
def polling(pipe: tuple[int, int]) -> Iterator[Callable[[float], Poller]]:
    """polling(ceiling_us): a poller watching the read end of ``pipe``, closed afterwards."""
    made: list[Poller] = []

    def make(ceiling_us: float) -> Poller:
        p = Poller(busy_poll_us=ceiling_us)
        made.append(p)
        p.register(pipe[0], READABLE)
        return p

    yield make
    for p in made:
        p.close()


def ping(poller: Poller, r: int, w: int, times: int, gap: float) -> None:
    """A peer that writes one byte ``gap`` seconds after each read: request/reply traffic."""
    def peer() -> None:
        for _ in range(times):
            time.sleep(gap)
            os.write(w, b"x")

    t = threading.Thread(target=peer)
    t.start()
    try:
        for _ in range(times):
            assert poller.wait(5) == [(r, READABLE)]
            os.read(r, 1)
    finally:
        t.join()


@pytest.mark.parametrize("bad", [-1, 1_000_001, math.nan, math.inf, "10", True, None])
def test_bad_ceiling_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        Poller(busy_poll_us=bad)  # type: ignore[arg-type]
    p = Poller()
    with pytest.raises(ValueError, match="busy_poll_us"):
        p.busy_poll_us = bad  # type: ignore[assignment]
    assert p.busy_poll_us == 0  # unchanged
    p.close()


def test_off_by_default_and_settable(pipe: tuple[int, int], polling: Polling) -> None:
    p = polling(0)
    ping(p, *pipe, 20, 0.001)
    assert p.counters.polled == 0
    p.busy_poll_us = 250.5
    assert p.busy_poll_us == 250.5
    assert Poller().busy_poll_us == 0


def test_quick_replies_are_seen_without_sleeping(pipe: tuple[int, int], polling: Polling) -> None:
    # A ceiling far above the 2 ms gap: the budget grows past the gap within a dozen
    # waits, after which the waits are answered while polling.
    p = polling(200_000)
    ping(p, *pipe, 40, 0.002)
    assert p.counters.polled >= 10, p.counters


def test_slow_peers_and_idle_pollers_sleep(pipe: tuple[int, int], polling: Polling) -> None:
    # Gaps of 20 ms against a 1 ms ceiling: the budget never grows, nothing is polled.
    p = polling(1000)
    ping(p, *pipe, 5, 0.02)
    assert p.counters.polled == 0
    # And a wait with nothing to come sleeps: it costs next to no CPU.
    cpu = time.thread_time()
    assert p.wait(0.3) == []
    assert time.thread_time() - cpu < 0.1


def test_timeout_bounds_the_polling(pipe: tuple[int, int], polling: Polling) -> None:
    p = polling(1_000_000)
    ping(p, *pipe, 30, 0.005)  # the budget is now well above 50 ms
    t0 = time.monotonic()
    assert p.wait(0.05) == []
    assert time.monotonic() - t0 < 0.5


def test_loop_takes_and_changes_the_ceiling() -> None:
    loop = sigpoll.new_event_loop(busy_poll_us=75)
    try:
        assert isinstance(loop, sigpoll.Loop) and loop.busy_poll_us == 75
        loop.busy_poll_us = 0
        assert loop.busy_poll_us == 0
        with pytest.raises(ValueError):
            loop.busy_poll_us = -5
    finally:
        loop.close()
    assert sigpoll.run(_ceiling(), busy_poll_us=33) == 33


async def _ceiling() -> float:
    import asyncio

    loop = asyncio.get_running_loop()
    assert isinstance(loop, sigpoll.Loop)
    return loop.busy_poll_us


_CTRL_C = textwrap.dedent("""
    import asyncio, os, socket, sys, threading, time
    import sigpoll

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        got = asyncio.Queue()
        loop.add_reader(a, lambda: got.put_nowait(a.recv(1)))

        def peer():
            for _ in range(25):
                time.sleep(0.03)
                b.send(b"x")

        threading.Thread(target=peer, daemon=True).start()
        for _ in range(25):
            await got.get()
        # The budget has grown past the 30 ms gap: the next wait polls for a while,
        # then sleeps with nothing left to wake it but the signal.
        print("quiet", loop.poller_counters().polled, flush=True)
        await asyncio.Event().wait()

    sigpoll.run(main(), busy_poll_us=1_000_000)
""")


def test_ctrl_c_while_polling_is_not_held_back() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _CTRL_C], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[:1] == ["quiet"] and int(line[1]) > 0, line
        time.sleep(0.01)  # inside the polling window
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert "KeyboardInterrupt" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
