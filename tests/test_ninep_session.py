"""The 9P session rules (sigpoll.ninep._session), driven directly: no socket, no thread.

Each rule of flush(5) and version(5) as the session keeps it, one test each; the fuzzer
(fuzz/ninep_session.py) plays random programs against the same rules.
"""

from __future__ import annotations

import errno

import pytest

from sigpoll.ninep import _codec as c
from sigpoll.ninep._session import (ABORTED, DONE, QUEUED, RUNNING, Abort, Close, FidTable,
                                    Request, Session)


class FakeFid:
    def __init__(self) -> None:
        self.refs = 0
        self.clunked = False
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def _session() -> Session[FakeFid]:
    s: Session[FakeFid] = Session(8192, 4)
    assert s.receive(c.Tversion(8192, c.VERSION_9P2000L, tag=c.NOTAG)) is None
    [rv] = s.take()
    assert isinstance(rv, c.Rversion) and rv.msize == 8192
    return s


def _request(s: Session[FakeFid], tag: int) -> Request:
    req = s.receive(c.Tgetattr(0, c.GETATTR_BASIC, tag=tag))
    assert req is not None and req.state is QUEUED
    return req


def _tags(actions: list[object]) -> list[tuple[str, int]]:
    out = []
    for a in actions:
        if isinstance(a, Abort):
            out.append(("abort", a.request.tag))
        elif isinstance(a, Close):
            out.append(("close", -1))
        else:
            assert isinstance(a, c.Message)
            out.append((type(a).__name__, a.tag))
    return out


def test_flush_of_a_queued_request_aborts_it_silently() -> None:
    s = _session()
    req = _request(s, 10)
    s.receive(c.Tflush(10, tag=11))
    assert _tags(s.take()) == [("abort", 10), ("Rflush", 11)]
    assert req.state is ABORTED and not s.start(req)
    assert not s.pending


def test_flush_of_a_running_request_waits_for_its_reply() -> None:
    s = _session()
    req = _request(s, 10)
    assert s.start(req) and req.state is RUNNING
    s.receive(c.Tflush(10, tag=11))
    s.receive(c.Tflush(10, tag=12))
    s.receive(c.Tflush(11, tag=13))  # a flush of a waiting flush
    assert s.take() == []
    s.complete(req, c.Rlerror(5, tag=10))
    # The reply, then each Rflush in arrival order, a flush of a flush right after it.
    assert _tags(s.take()) == [("Rlerror", 10), ("Rflush", 11), ("Rflush", 13), ("Rflush", 12)]
    assert not s.pending


def test_flush_of_nothing_pending_is_answered_at_once() -> None:
    s = _session()
    for msg in (c.Tflush(20, tag=20), c.Tflush(999, tag=21), c.Tflush(c.NOTAG, tag=22)):
        s.receive(msg)
        assert _tags(s.take()) == [("Rflush", msg.tag)]


def test_a_chain_of_3000_flushes_is_answered_without_recursion() -> None:
    s = _session()
    req = _request(s, 0)
    s.start(req)
    for tag in range(1, 3001):
        s.receive(c.Tflush(tag - 1, tag=tag))
    assert s.take() == []
    s.complete(req, c.Rlerror(5, tag=0))  # would overflow the stack if done recursively
    got = _tags(s.take())
    assert got == [("Rlerror", 0)] + [("Rflush", t) for t in range(1, 3001)]
    assert not s.pending


@pytest.mark.parametrize("kind", ["request", "flush", "bad frame"])
def test_a_tag_reused_while_in_flight_closes_instead_of_answering(kind: str) -> None:
    """Any reply under a tag in flight would be taken as the first request's answer."""
    s = _session()
    first = _request(s, 10)
    if kind == "request":
        assert s.receive(c.Tclunk(1, tag=10)) is None
    elif kind == "flush":
        s.receive(c.Tflush(3, tag=10))
    else:
        s.reject(10, errno.EPROTO)
    assert _tags(s.take()) == [("close", -1), ("abort", 10)]
    assert first.state is ABORTED and s.closed
    assert s.receive(c.Tgetattr(0, 0, tag=11)) is None and s.take() == []


def test_tversion_silences_the_old_sessions_requests_and_flushes() -> None:
    s = _session()
    running = _request(s, 10)
    s.start(running)
    queued = _request(s, 11)
    s.receive(c.Tflush(10, tag=12))
    old_fids = s.fids
    s.receive(c.Tversion(8192, c.VERSION_9P2000L, tag=c.NOTAG))
    assert _tags(s.take()) == [("abort", 11), ("Rversion", c.NOTAG)]
    assert queued.state is ABORTED
    # The new session reuses tag 10; the old request finishing late says nothing.
    new = _request(s, 10)
    s.complete(running, c.Rlerror(5, tag=10))
    assert s.take() == []
    assert s.pending == {10: new}
    # And the old request's fid table is closed: it cannot create a fid in the new one.
    assert old_fids is running.fids and old_fids.closed and s.fids is not old_fids
    with pytest.raises(OSError) as err:
        running.fids.install(5, FakeFid())
    assert err.value.errno == errno.EBADF


def test_requests_before_tversion_and_r_messages_get_errors() -> None:
    s: Session[FakeFid] = Session(8192, 4)
    s.receive(c.Tgetattr(0, 0, tag=1))
    s.receive(c.Rclunk(tag=2))
    s.receive(c.Tversion(100, c.VERSION_9P2000L, tag=3))  # msize too small
    s.receive(c.Tversion(8192, "9P2000.u", tag=4))
    got = s.take()
    assert [(type(m).__name__, getattr(m, "ecode", None), getattr(m, "version", None))
            for m in got] == [("Rlerror", errno.EPROTO, None), ("Rlerror", errno.EOPNOTSUPP, None),
                              ("Rversion", None, "unknown"), ("Rversion", None, "unknown")]
    assert not s.versioned


def test_may_answer_is_the_inline_path() -> None:
    """A request answered before the next message is looked at needs no registration; the
    rules still apply to it (a tag in flight, no session, a closed connection)."""
    s = _session()
    msg = c.Tgetattr(0, 0, tag=7)
    assert s.may_answer(msg) and not s.pending and s.take() == []
    _request(s, 8)
    assert not s.may_answer(c.Tgetattr(0, 0, tag=8))  # in flight: closed instead
    assert _tags(s.take()) == [("close", -1), ("abort", 8)]
    assert not s.may_answer(c.Tgetattr(0, 0, tag=9)) and s.take() == []


def test_fid_table_borrow_clunk_and_limits() -> None:
    t: FidTable[FakeFid] = FidTable(2)
    a, b = FakeFid(), FakeFid()
    t.install(1, a)
    with t.borrowed(1) as f:
        assert f is a and a.refs == 1
        t.drop(1)  # clunked while borrowed: closed when given back
        assert a.closed == 0 and 1 not in t
    assert a.closed == 1
    t.install(1, b)
    t.install(2, FakeFid())
    with pytest.raises(OSError) as err:
        t.install(3, c3 := FakeFid())
    assert err.value.errno == errno.EMFILE and c3.closed == 1
    with pytest.raises(OSError) as err:
        t.check_new(c.NOFID)
    assert err.value.errno == errno.EBADF
    t.close_all()
    assert b.closed == 1 and len(t) == 0
    with pytest.raises(OSError):
        t.borrow(1)
