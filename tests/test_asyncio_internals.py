"""Every private asyncio detail sigpoll's loop relies on, pinned.

sigpoll's Loop subclasses asyncio's selector loop and its private transport classes, and
re-implements a few private steps for speed (sigpoll/_loop.py).  A Python release that
changes one of those must fail here, loudly and by name, not somewhere downstream.  Two
kinds of pin:

* fingerprints: the source of each asyncio function sigpoll replaces or copies the logic
  of, hashed.  A new hash means asyncio changed the code sigpoll's override mirrors:
  read the change, update the override if needed, then add the hash with the version.
* behaviour: the private names, fields, constants and call paths the loop uses exist
  and work the way the overrides assume.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import heapq
import inspect
import socket
import sys
import textwrap
from asyncio import base_events, events, format_helpers, selector_events, unix_events
from collections.abc import Iterator
from typing import Any, cast

import pytest

import sigpoll
from sigpoll import _loop
from sigpoll._selector import PollerSelector

__all__: list[str] = []

pytestmark = pytest.mark.timeout(30)

CHECKED = "3.11.7, 3.12.1, 3.13.0"

#: asyncio function -> {source fingerprint: the CPython versions that have it}.
FINGERPRINTS: dict[str, dict[str, str]] = {
    # Replaced by _SocketTransport._read_ready__data_received (reads into a shared buffer).
    "selector_events._SelectorSocketTransport._read_ready__data_received": {
        "daf733a5390a9300": "3.11.7 3.12.1 3.13.0"},
    # Replaced by _DatagramTransport._read_ready.
    "selector_events._SelectorDatagramTransport._read_ready": {
        "a2f9ad3e2df1a4d0": "3.11.7 3.12.1 3.13.0"},
    # Replaced by _ReadPipeTransport._read_ready.
    "unix_events._UnixReadPipeTransport._read_ready": {
        "f4288eaf18527c46": "3.11.7 3.12.1 3.13.0"},
    # Re-implemented by Loop._run_once (3.13 only rewrote the timeout clamp).
    "base_events.BaseEventLoop._run_once": {
        "a3f9b8ef0d7972dd": "3.11.7 3.12.1", "0f8c86fc6f39b457": "3.13.0"},
    # Folded into Loop.call_soon / call_at / call_later's fast paths.
    "base_events.BaseEventLoop.call_soon": {"3e9b3908c580fd07": "3.11.7 3.12.1 3.13.0"},
    "base_events.BaseEventLoop._call_soon": {"111e973dcf354c65": "3.11.7 3.12.1 3.13.0"},
    "base_events.BaseEventLoop.call_at": {"7ef9a8bd57662f05": "3.11.7 3.12.1 3.13.0"},
    "base_events.BaseEventLoop.call_later": {"912fe4699c822437": "3.11.7 3.12.1 3.13.0"},
    # Loop.run_forever makes its refusals before claiming the wake-up fd (3.13 split it).
    "base_events.BaseEventLoop.run_forever": {
        "c4809c0dd79b591d": "3.11.7 3.12.1", "dae051b79b3c3273": "3.13.0"},
    # Inlined in Loop._run_once, its error report in Loop._callback_failed (3.13 added
    # debug= to the callback's formatting: arguments are only shown in debug mode).
    "events.Handle._run": {"d906a4dd8f6e3009": "3.11.7 3.12.1", "e90812abd50f875e": "3.13.0"},
    # Replaced by Loop._make_*_transport (3.12 added the _ensure_fd_no_transport check).
    "selector_events.BaseSelectorEventLoop._make_socket_transport": {
        "40389a6175cf4b33": "3.11.7", "5e0fb8ecfe81276b": "3.12.1 3.13.0"},
    "selector_events.BaseSelectorEventLoop._make_datagram_transport": {
        "f53001e27e816683": "3.11.7", "d132e100c187de91": "3.12.1 3.13.0"},
    "unix_events._UnixSelectorEventLoop._make_read_pipe_transport": {
        "1166e352d229492f": "3.11.7 3.12.1 3.13.0"},
    # Loop._write_to_self wakes the poller's eventfd instead; _read_from_self and
    # _process_self_data carry signal dispatch from a set instead of the pipe's bytes.
    "selector_events.BaseSelectorEventLoop._write_to_self": {
        "6df474394baa6f12": "3.11.7 3.12.1 3.13.0"},
    "selector_events.BaseSelectorEventLoop._read_from_self": {
        "a3bc3b56ab3e35ff": "3.11.7 3.12.1 3.13.0"},
    "unix_events._UnixSelectorEventLoop._process_self_data": {
        "c2ec01c24b00b74b": "3.11.7 3.12.1 3.13.0"},
    # Loop.add_signal_handler calls it, then replaces the Python-level handler it set.
    "unix_events._UnixSelectorEventLoop.add_signal_handler": {
        "8d305ef952557e4b": "3.11.7 3.12.1 3.13.0"},
}

_MODULES = {"base_events": base_events, "events": events, "selector_events": selector_events,
            "unix_events": unix_events}


def _fingerprint(dotted: str) -> str:
    module, *path = dotted.split(".")
    obj: Any = _MODULES[module]
    for name in path:
        obj = getattr(obj, name)
    source = textwrap.dedent(inspect.getsource(obj))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@pytest.mark.parametrize("dotted", sorted(FINGERPRINTS))
def test_asyncio_code_sigpoll_mirrors_is_unchanged(dotted: str) -> None:
    seen = _fingerprint(dotted)
    known = FINGERPRINTS[dotted]
    assert seen in known, (
        f"asyncio.{dotted} on Python {sys.version.split()[0]} is not the code sigpoll's "
        f"override was checked against ({', '.join(sorted(set(' '.join(known.values()).split())))}): "
        f"read the change, update sigpoll/_loop.py if needed, then add {seen!r} here"
    )


# -- behaviour ----------------------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[sigpoll.Loop]:
    lp = sigpoll.new_event_loop()
    yield lp
    lp.close()


def test_the_loop_state_run_once_reads(loop: sigpoll.Loop) -> None:
    assert isinstance(loop._ready, collections.deque)
    assert isinstance(loop._scheduled, list)
    assert loop._timer_cancelled_count == 0
    assert isinstance(loop._clock_resolution, float)
    assert loop._stopping is False and loop._debug is False and loop._closed is False
    assert isinstance(loop._selector, PollerSelector)
    assert isinstance(loop._csock, socket.socket)
    assert isinstance(loop._signal_handlers, dict)


def test_timer_housekeeping_constants_match_asyncio() -> None:
    assert _loop._MIN_SCHEDULED_TIMER_HANDLES == base_events._MIN_SCHEDULED_TIMER_HANDLES  # type: ignore[attr-defined]
    assert (_loop._MIN_CANCELLED_TIMER_HANDLES_FRACTION
            == base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION)  # type: ignore[attr-defined]
    assert _loop._MAXIMUM_SELECT_TIMEOUT == base_events.MAXIMUM_SELECT_TIMEOUT  # type: ignore[attr-defined]


def test_handle_fields_the_loop_reads_and_writes(loop: sigpoll.Loop) -> None:
    h = cast(Any, loop.call_soon(print, "x"))
    assert h.__class__ is asyncio.Handle
    assert (h._callback, h._args, h._cancelled, h._loop) == (print, ("x",), False, loop)
    assert h._context is not None and h._source_traceback is None
    t = cast(Any, loop.call_later(10, print))
    assert t.__class__ is asyncio.TimerHandle and t._scheduled is True
    assert loop._scheduled == [t] and t._when == t.when()
    # Cancelling a scheduled timer counts it (base_events' _timer_handle_cancelled), which
    # Loop._run_once's heap rebuild depends on.
    t.cancel()
    assert t._cancelled and loop._timer_cancelled_count == 1
    heapq.heappop(loop._scheduled)
    h.cancel()


def test_run_forever_goes_through_the_loops_run_once(loop: sigpoll.Loop,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = sigpoll.Loop._run_once

    def counting(self: sigpoll.Loop) -> None:
        calls.append(1)
        real(self)

    monkeypatch.setattr(sigpoll.Loop, "_run_once", counting)
    loop.run_until_complete(asyncio.sleep(0))
    assert calls


def test_the_checks_run_forever_makes_itself(loop: sigpoll.Loop) -> None:
    async def nested() -> None:
        with pytest.raises(RuntimeError, match="already running"):
            loop._check_running()

    loop.run_until_complete(nested())
    loop._check_running()  # not running: no error
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop._check_closed()


def test_transports_are_sigpolls_and_reach_the_overrides(loop: sigpoll.Loop) -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        transport: Any
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        assert type(transport) is _loop._SocketTransport
        # The base _read_ready dispatches through _read_ready_cb, set by set_protocol to
        # the plain-protocol reader: the override.
        assert transport._read_ready_cb.__func__ is _loop._SocketTransport._read_ready__data_received
        for name in ("_conn_lost", "max_size", "_sock", "_protocol", "_loop"):
            assert hasattr(transport, name), name
        assert callable(transport._fatal_error) and callable(transport._read_ready__on_eof)
        transport.close()
        b.close()

        d: Any
        d, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                   local_addr=("127.0.0.1", 0))
        assert type(d) is _loop._DatagramTransport
        for name in ("_conn_lost", "max_size", "_sock", "_protocol"):
            assert hasattr(d, name), name
        d.close()

        import os

        r, w = os.pipe()
        p: Any
        p, _ = await loop.connect_read_pipe(asyncio.Protocol, open(r, "rb", buffering=0))
        assert type(p) is _loop._ReadPipeTransport
        for name in ("max_size", "_fileno", "_closing", "_protocol", "_loop"):
            assert hasattr(p, name), name
        assert callable(p._call_connection_lost)
        p.close()
        os.close(w)
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert hasattr(unix_events, "logger")


def test_callback_error_report_matches_asyncios(loop_factory: Any) -> None:
    # Loop._callback_failed builds the report Handle._run makes; one body on both loops.
    lp = loop_factory()
    contexts: list[dict[str, Any]] = []
    lp.set_exception_handler(lambda _lp, ctx: contexts.append(ctx))

    def fail(secret: str) -> None:
        raise ValueError(secret)

    lp.call_soon(fail, "argument")
    lp.run_until_complete(asyncio.sleep(0.01))
    lp.close()
    (ctx,) = contexts
    expected = format_helpers._format_callback_source(
        fail, ("argument",))
    assert ctx["message"] == f"Exception in callback {expected}"
    assert set(ctx) == {"message", "exception", "handle"}


def test_private_loop_helpers_exist_with_the_signatures_used() -> None:
    base = unix_events._UnixSelectorEventLoop
    for name in ("_check_closed", "_check_running", "_check_signal", "_handle_signal",
                 "_ensure_fd_no_transport", "_add_reader", "_add_writer", "_remove_reader",
                 "_remove_writer", "_read_from_self", "_process_self_data", "_write_to_self"):
        assert callable(getattr(base, name, None)), name
    for name, params in (
        ("_make_socket_transport", ["self", "sock", "protocol", "waiter", "extra", "server"]),
        ("_make_datagram_transport", ["self", "sock", "protocol", "address", "waiter", "extra"]),
        ("_make_read_pipe_transport", ["self", "pipe", "protocol", "waiter", "extra"]),
    ):
        assert list(inspect.signature(getattr(base, name)).parameters) == params, name
        assert list(inspect.signature(getattr(sigpoll.Loop, name)).parameters) == params, name
    source = inspect.signature(format_helpers._format_callback_source)
    assert list(source.parameters)[:2] == ["func", "args"]


def test_the_policy_base_and_its_loop_factory_hook() -> None:
    import warnings

    assert _loop._policy_base() is unix_events._UnixDefaultEventLoopPolicy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = sigpoll.EventLoopPolicy()
    lp = policy.new_event_loop()  # BaseDefaultEventLoopPolicy calls self._loop_factory()
    assert type(lp) is sigpoll.Loop
    lp.close()
