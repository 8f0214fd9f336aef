"""Fuzz target: the 9P session rules (``sigpoll.ninep._session``) driven directly.

No socket, thread or directory: each input is a program of events for one
:class:`~sigpoll.ninep._session.Session` -- a T-message arrives (a request, a Tflush of a
recent tag, a Tversion, an R-message, a frame that did not decode, under tags drawn from a
small set so that they collide), the connection starts a queued request, a running one
completes (with a reply the harness can tell apart from every other), a request is
answered inline at once, the connection closes.  At the end every queued request is
started and every running one completes, as a connection would.

What the client sees is checked against the rules, with an independent model of what is
outstanding from the client's side:

* a reply's tag names a request the client is still waiting for, in the current session:
  at most one reply per tag per request, no reply after that request's Rflush, nothing
  from before the last Tversion, nothing after the connection is closed;
* a reply made by the connection for a request is that request's own;
* a tag sent again while the client still waits under it closes the connection (nothing
  else may answer it), and nothing else closes it;
* a Tversion is answered at once, with an Rversion;
* an aborted request is never started, and only a queued one is aborted; a Tversion or the
  connection closing aborts every queued request;
* at the end, unless the connection was closed, every request got its reply or was
  dropped by a Tflush that got its Rflush, and every Tflush got its Rflush;
* the bytes the connection holds for each message come back exactly once, when the
  message is over (never more, never lost: its memory budget rests on that).

Run longer: ``python fuzz/ninep_session.py [workdir] [-max_total_time=600] ...``
"""

from __future__ import annotations

import errno
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (_HERE, os.path.dirname(_HERE)) if p not in sys.path]

from _fuzzcommon import ByteReader, fuzz_main, instrumentation  # noqa: E402

with instrumentation(__name__):
    from sigpoll.ninep import _codec as c
    from sigpoll.ninep._session import ABORTED, QUEUED, RUNNING, Abort, Close, Request, Session

__all__ = ["TARGET", "one_input", "run_program"]

TARGET = "ninep_session"

_TAGS = (1, 2, 3, 4, 5, c.NOTAG)
_MSIZE = 8192


class _Client:
    """What the client knows: which of its messages still wait for an answer."""

    def __init__(self) -> None:
        #: tag -> the message the client waits on under it (requests and Tflushes).
        self.waiting: dict[int, c.Message] = {}
        #: Tflush tag -> the tag it flushes, if that one was waited on when it was sent.
        self.flushing: dict[int, int] = {}
        self.closed = False
        self.expect_close = False
        self.versioned = False

    def sent(self, msg: c.Message) -> None:
        if self.closed:
            return
        if isinstance(msg, c.Tversion):
            self.waiting = {msg.tag: msg}  # a new session: nothing else is awaited
            self.flushing = {}
            return
        if msg.tag in self.waiting:
            self.expect_close = True  # the client broke the rule: only a close may follow
            return
        self.waiting[msg.tag] = msg
        if isinstance(msg, c.Tflush) and msg.oldtag in self.waiting:
            self.flushing[msg.tag] = msg.oldtag

    def got(self, reply: c.Message) -> c.Message:
        """The message ``reply`` answers (it must be one the client waits on)."""
        assert not self.closed, f"{reply!r} after the connection was closed"
        assert not self.expect_close, f"{reply!r} where only a close may come"
        asked = self.waiting.pop(reply.tag, None)
        assert asked is not None, f"{reply!r}: nothing is waiting under tag {reply.tag}"
        if isinstance(reply, c.Rflush):
            assert isinstance(asked, c.Tflush), f"{reply!r} answers {asked!r}"
            old = self.flushing.pop(reply.tag, None)
            if old is not None:
                # The flushed request is over: its reply came first, or it never will.
                self.waiting.pop(old, None)
        elif isinstance(reply, c.Rversion):
            assert isinstance(asked, c.Tversion), f"{reply!r} answers {asked!r}"
            self.versioned = reply.version == c.VERSION_9P2000L
        elif not isinstance(reply, c.Rlerror):
            raise AssertionError(f"unexpected {reply!r}")
        return asked


class _Run:
    def __init__(self) -> None:
        self.session: Session[_FakeFid] = Session(_MSIZE, 8)
        self.client = _Client()
        self.queued: list[Request] = []
        self.running: list[Request] = []
        self.aborted: set[Request] = set()
        #: errno code of a reply the harness made -> the message it was made for.
        self.made: dict[int, c.Message] = {}
        self.next_code = 1000
        #: Bytes handed in with messages and handed back (Session.receive's ``held``).
        self.held = 0
        self.freed = 0

    # ------------------------------------------------------------------ events

    def receive(self, msg: c.Message, at_once: bool = False) -> None:
        self.client.sent(msg)
        if at_once:
            # The inline path: answered before the next message is looked at.
            if self.session.may_answer(msg):
                self._replied([self._reply_for(msg)])
            self._check(self.session.take())
            return
        self.held += 3
        req = self.session.receive(msg, held=3)
        if req is not None:
            assert req.state is QUEUED and req.msg is msg
            self.queued.append(req)
        self._check(self.session.take())
        if isinstance(msg, c.Tversion) and not self.client.closed:
            assert msg.tag not in self.client.waiting, "a Tversion must be answered at once"
            self._all_queued_aborted("a Tversion")

    def reject(self, tag: int) -> None:
        # A frame that did not decode: for the client, a message under that tag.
        self.client.sent(c.Tstatfs(0, tag=tag))
        self.held += 5
        self.session.reject(tag, errno.EPROTO, held=5)
        self._check(self.session.take())

    def start(self, i: int) -> None:
        if not self.queued:
            return
        req = self.queued.pop(i % len(self.queued))
        ok = self.session.start(req)
        assert ok == (req not in self.aborted), f"start({req!r}) said {ok}"
        if ok:
            assert req.state is RUNNING
            self.running.append(req)
        self._check(self.session.take())

    def complete(self, i: int) -> None:
        if not self.running:
            return
        req = self.running.pop(i % len(self.running))
        self.session.complete(req, self._reply_for(req))
        self._check(self.session.take())

    def close(self) -> None:
        self.session.close()
        self._check(self.session.take())
        self.client.closed = True
        self._all_queued_aborted("the connection closing")

    def _all_queued_aborted(self, why: str) -> None:
        # Nothing of an old session may still be started.
        left = [r for r in self.queued if r not in self.aborted]
        assert not left, f"{left} not aborted by {why}"

    def drain(self) -> None:
        while self.queued or self.running:
            if self.queued:
                self.start(0)
            else:
                self.complete(0)
        if not self.client.closed:
            left = {t: m for t, m in self.client.waiting.items()}
            assert not left, f"never answered: {left}"
        self.freed += self.session.take_freed()
        assert self.freed == self.held, f"{self.freed} bytes handed back of {self.held}"

    # ------------------------------------------------------------------ checks

    def _reply_for(self, req: Request | c.Message) -> c.Message | bytes:
        code = self.next_code
        self.next_code += 1
        self.made[code] = req.msg if isinstance(req, Request) else req
        reply = c.Rlerror(code, tag=req.tag)
        return c.encode(reply) if code % 2 else reply

    def _check(self, actions: list[object]) -> None:
        self.freed += self.session.take_freed()
        assert self.freed <= self.held, f"{self.freed} bytes handed back of {self.held}"
        replies = []
        for action in actions:
            if isinstance(action, Abort):
                req = action.request
                assert req.state is ABORTED, f"Abort of {req!r}"
                assert req in self.queued, f"Abort of {req!r}, which is not queued"
                self.aborted.add(req)
            elif isinstance(action, Close):
                assert self.client.expect_close, f"closed without cause: {action.reason}"
                self.client.closed = True
            else:
                replies.append(action)
        self._replied(replies)

    def _replied(self, replies: list[object]) -> None:
        for raw in replies:
            reply = raw if isinstance(raw, c.Message) else c.decode(raw)  # type: ignore[arg-type]
            asked = self.client.got(reply)
            if isinstance(reply, c.Rlerror) and reply.ecode >= 1000:
                made = self.made.pop(reply.ecode)
                assert made is asked, f"{reply!r} was made for {made!r}, not {asked!r}"


class _FakeFid:
    refs = 0
    clunked = False

    def close(self) -> None:
        pass


def _message(r: ByteReader, recent: list[int]) -> c.Message:
    sel = r.u8() % 16
    tag = r.pick(_TAGS) if r.u8() % 8 else r.uint(2)
    if sel < 8:
        return c.Tgetattr(1, c.GETATTR_BASIC, tag=tag)
    if sel < 13:
        old = r.pick(recent) if recent and r.u8() % 4 else r.pick(_TAGS)
        return c.Tflush(old, tag=tag)
    if sel < 15:
        version = c.VERSION_9P2000L if r.u8() % 8 else "9P2000"
        return c.Tversion(_MSIZE, version, tag=tag)
    return c.Rgetattr(0, c.Qid(0, 0, 0), *([0] * 18), tag=tag)  # an R-message, to a server


def run_program(data: bytes) -> None:
    """Play one program (see the module docstring); any breach of the rules raises."""
    r = ByteReader(data)
    run = _Run()
    recent: list[int] = []
    run.receive(c.Tversion(_MSIZE, c.VERSION_9P2000L, tag=c.NOTAG))
    steps = 0
    while len(r) and steps < 200 and not run.client.closed:
        steps += 1
        op = r.u8() % 12
        if op < 5:
            msg = _message(r, recent)
            recent = (recent + [msg.tag])[-4:]
            run.receive(msg, at_once=op == 4 and not isinstance(msg, c.Tflush))
        elif op < 8:
            run.start(r.u8())
        elif op < 11:
            run.complete(r.u8())
        elif r.u8() % 8 == 0:
            run.close()
        else:
            run.reject(r.pick(_TAGS))
    run.drain()


def one_input(data: bytes) -> None:
    run_program(data)


if __name__ == "__main__":
    fuzz_main(one_input, TARGET)
