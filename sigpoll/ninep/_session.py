"""The 9P2000.L session rules, with no I/O: tags, Tflush, Tversion and the fid table.

A connection hands a :class:`Session` every decoded T-message (:meth:`Session.receive`),
says when a request it was given starts to run (:meth:`Session.start`) and what it
answered (:meth:`Session.complete`), and carries out the actions the session returns
from :meth:`Session.take`, in order: a reply to send (a :data:`Reply`), :class:`Abort` a
request that never started (drop it, run nothing), :class:`Close` the connection.  Nothing here reads
a clock, a socket or a file, so the rules can be driven by a test or a fuzzer directly.

The rules (flush(5), version(5), and what Linux's client relies on):

* A request is *queued* until the connection starts it, then *running*.  A Tflush whose
  target is queued aborts it: the target gets no reply at all, only the Rflush (QEMU's
  seed: a reply under the old tag would be taken as the request's real outcome).  A
  running target cannot be taken back, so its own reply goes out first and the Rflush
  right after it.  A Tflush naming a Tflush that waits is answered right after that one.
  Every Tflush is answered; one naming nothing pending (done, never sent, itself) at once.
* At most one reply per tag per request.  A message that arrives under a tag still in
  flight is a client error that no reply can answer safely (any reply under that tag
  would be matched to the earlier request), so the session closes the connection.
* Tversion starts a new session: queued requests are aborted, running ones finish but
  their replies and the Rflushes waiting on them are dropped (their tags belong to the
  old session and may already be reused), and every fid of the old session is clunked.
  A request keeps the fid table of the session it arrived in, so a request of the old
  session that finishes late can never create a fid in the new one.
* Completing a request answers its chain of flushes iteratively: a chain of thousands of
  Tflush each naming the one before costs no recursion.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import Any, Generic, NamedTuple, Protocol, TypeVar, Union

from . import _codec as c
from ._codec import Message, Tflush, Tversion

__all__ = [
    "MIN_MSIZE",
    "Reply",
    "Request",
    "Session",
    "FidTable",
    "Fid",
    "Abort",
    "Close",
    "Action",
    "QUEUED",
    "RUNNING",
    "WAITING",
    "DONE",
    "ABORTED",
]

#: Smallest msize a session agrees to: room for a header, a walk and a useful read.
MIN_MSIZE = 4096

#: A reply: a message, or a frame already laid out (with its tag) by a fast handler.
Reply = Union[Message, bytes, bytearray, memoryview]

QUEUED = "queued"    # given to the connection, not started: a Tflush aborts it
RUNNING = "running"  # started: it will complete, with a reply
WAITING = "waiting"  # a Tflush waiting for its target to complete
DONE = "done"        # answered (or silenced by a Tversion, or its connection closing)
ABORTED = "aborted"  # dropped before it started: no reply at all


class Fid(Protocol):
    """What a :class:`FidTable` holds: something with a reference count to close."""

    refs: int
    clunked: bool

    def close(self) -> None: ...


F = TypeVar("F", bound=Fid)


class FidTable(Generic[F]):
    """The fids of one session, each borrowed by the requests using it.

    A fid that is clunked (or dropped with its session) while a request still borrows it
    is closed when the last borrower gives it back, never under a running request.
    Errors are ``OSError`` with the errno the client gets.
    """

    __slots__ = ("_fids", "limit", "closed", "get")

    def __init__(self, limit: int) -> None:
        self._fids: dict[int, F] = {}
        #: The fid, or None (the dict's own ``get``: the fast handlers look fids up often).
        self.get: Callable[[int], F | None] = self._fids.get
        #: Fids this table may hold at once (EMFILE past it).
        self.limit = limit
        #: The session ended: nothing more may be installed.
        self.closed = False

    def __len__(self) -> int:
        return len(self._fids)

    def __contains__(self, fid: int) -> bool:
        return fid in self._fids

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._fids))

    def borrow(self, fid: int) -> F:
        """The fid, held for the duration of a request (give it back)."""
        f = self._fids.get(fid)
        if f is None or f.clunked:
            raise OSError(errno.EBADF, f"no fid {fid}")
        f.refs += 1
        return f

    def borrowed(self, fid: int) -> _Borrowed[F]:
        """``with table.borrowed(fid) as f:`` -- :meth:`borrow` for the block."""
        return _Borrowed(self, fid)

    def give_back(self, f: F) -> None:
        f.refs -= 1
        if f.refs == 0 and f.clunked:
            f.close()

    def check_new(self, fid: int) -> None:
        """Raise unless ``fid`` could be installed now."""
        if fid in self._fids or fid == c.NOFID or self.closed:
            raise OSError(errno.EBADF, f"fid {fid} is in use")
        if len(self._fids) >= self.limit:
            raise OSError(errno.EMFILE, f"{self.limit} fids already (max_fids)")

    def install(self, fid: int, f: F) -> None:
        """Add a new fid, or close ``f`` and raise when that is no longer possible (the
        number was taken, the cap reached or the session ended meanwhile)."""
        try:
            self.check_new(fid)
        except OSError:
            f.close()
            raise
        self._fids[fid] = f

    def replace(self, fid: int, f: F) -> None:
        """Put ``f`` in place of the live fid ``fid`` (a walk to itself); a request that
        still borrows the old one keeps it until it gives it back."""
        old = self._fids.get(fid)
        if old is None or old.clunked or self.closed:
            f.close()
            raise OSError(errno.EBADF, f"no fid {fid}")
        self.drop(fid)
        self._fids[fid] = f

    def drop(self, fid: int) -> F | None:
        """Clunk a fid: it leaves the table now and closes once nobody borrows it."""
        f = self._fids.pop(fid, None)
        if f is not None:
            f.clunked = True
            if f.refs == 0:
                f.close()
        return f

    def close_all(self) -> None:
        """The session ended: clunk every fid and refuse new ones."""
        self.closed = True
        for fid in list(self._fids):
            self.drop(fid)


class _Borrowed(Generic[F]):
    __slots__ = ("_table", "_fid", "_f")

    def __init__(self, table: FidTable[F], fid: int) -> None:
        self._table = table
        self._fid = fid

    def __enter__(self) -> F:
        self._f = self._table.borrow(self._fid)
        return self._f

    def __exit__(self, *exc: object) -> None:
        self._table.give_back(self._f)


class Request:
    """One T-message in flight on a session."""

    __slots__ = ("tag", "msg", "state", "flushers", "epoch", "fids", "held")

    def __init__(self, msg: Message, state: str, epoch: int, fids: FidTable[Any]) -> None:
        self.tag = msg.tag
        self.msg = msg
        self.state = state
        #: Tflush requests waiting for this one, in arrival order.
        self.flushers: tuple[Request, ...] = ()
        #: The session (counted in Tversions) it belongs to.
        self.epoch = epoch
        #: The fid table of that session (a late finisher never touches a newer one).
        self.fids = fids
        #: Bytes the connection holds for it (see Session.receive's ``held``).
        self.held = 0

    def __repr__(self) -> str:
        return f"<Request {type(self.msg).__name__} tag={self.tag} {self.state}>"


class Abort(NamedTuple):
    """Drop this request, which has not started: run nothing, answer nothing."""

    request: Request


class Close(NamedTuple):
    """Close the connection; ``reason`` is for the log."""

    reason: str


#: What the connection is to do: send a reply (most of them), abort or close.
Action = Union[Message, bytes, bytearray, memoryview, Abort, Close]


class Session(Generic[F]):
    """The protocol state of one connection (see the module docstring).

    ``max_msize``: the largest msize this side accepts.  ``max_fids``: fids per session.
    The fids are whatever the connection makes of them (``F``).
    """

    def __init__(self, max_msize: int, max_fids: int) -> None:
        self.max_msize = max_msize
        #: The negotiated msize (``max_msize`` until a Tversion lowers it).
        self.msize = max_msize
        self.max_fids = max_fids
        self.versioned = False
        #: Tversions so far: a request answers only into the session it came in.
        self.epoch = 0
        self.fids: FidTable[F] = FidTable(max_fids)
        #: Tag -> request in flight (queued, running, or a waiting Tflush).
        self.pending: dict[int, Request] = {}
        #: No more input is taken (the connection is closing or closed).
        self.closed = False
        self._actions: list[Action] = []
        #: Bytes of messages that are over, not yet taken (see :meth:`take_freed`).
        self.freed = 0

    # ------------------------------------------------------------------ events in

    def receive(self, msg: Message, held: int = 0) -> Request | None:
        """Take one T-message.  Returns a queued request for the connection to run
        (start it with :meth:`start`), or None when the session dealt with it (see also
        :meth:`may_answer`, for a message answered before the next one is taken).

        ``held``: bytes the connection holds for this message; :meth:`take_freed` hands
        them back once the message is over (answered, aborted or dropped), whatever it
        became: the connection need not know which messages wait inside the session.
        """
        tag = msg.tag
        cls = type(msg)
        # The common case first: a request of a live session under a free tag.
        if (tag in self.pending or not self.versioned or cls.REPLY is None or self.closed
                or cls is Tversion or cls is Tflush):
            self._unusual(msg, held)
            return None
        req = Request(msg, QUEUED, self.epoch, self.fids)
        req.held = held
        self.pending[tag] = req
        return req

    def _unusual(self, msg: Message, held: int) -> None:
        tag = msg.tag
        self.freed += held  # unless it becomes a waiting Tflush (below)
        if self.closed:
            return
        if isinstance(msg, c.Tversion):
            # Before the tag rule: a new session abandons whatever held that tag.
            self._version(msg)
        elif tag in self.pending:
            self._protocol_error(f"tag {tag} reused while still in flight "
                                 f"({type(msg).__name__})")
        elif type(msg).REPLY is None:
            # An R-message sent to a server: unsupported.
            self._send(c.Rlerror(errno.EOPNOTSUPP, tag=tag))
        elif not self.versioned:
            self._send(c.Rlerror(errno.EPROTO, tag=tag))
        elif isinstance(msg, c.Tflush):
            flush = self._flush(msg)
            if flush is not None:
                self.freed -= held
                flush.held = held

    def reject(self, tag: int | None, err: int, held: int = 0) -> None:
        """A frame that did not decode (``tag`` None: not even its header): answer it
        with Rlerror(``err``), unless its tag is in flight (then no reply is safe)."""
        self.freed += held
        if self.closed or tag is None:
            return
        if tag in self.pending:
            self._protocol_error(f"tag {tag} reused while still in flight (a bad message)")
            return
        self._send(c.Rlerror(err, tag=tag))

    def start(self, req: Request) -> bool:
        """The connection is about to run ``req``: True, unless it was aborted."""
        if req.state is not QUEUED:
            return False
        req.state = RUNNING
        return True

    def complete(self, req: Request, reply: Reply) -> None:
        """``req`` (running) answered ``reply``; its waiting Tflushes are answered after it."""
        pending = self.pending
        if pending.get(req.tag) is req:
            del pending[req.tag]
        req.state = DONE
        if req.held:
            self.freed += req.held
            req.held = 0
        if req.epoch == self.epoch and not self.closed:
            self._actions.append(reply)
        if req.flushers:
            self._answer_flushes(req)

    def may_answer(self, msg: Message) -> bool:
        """For a connection that would answer ``msg`` before it takes the next message
        (its inline path): True if that is allowed -- a request of a live session under
        a free tag -- and then the session registers nothing, since nothing can come
        between it and its reply; the connection sends the reply itself, or, if it turns
        out the request must wait after all, hands it to :meth:`receive`.  False: the
        session dealt with ``msg`` as :meth:`receive` would have."""
        cls = type(msg)
        if (msg.tag in self.pending or not self.versioned or cls.REPLY is None or self.closed
                or cls is Tversion or cls is Tflush):
            self._unusual(msg, 0)
            return False
        return True

    def _answer_flushes(self, req: Request) -> None:
        # Depth first, in arrival order: each Rflush, then the Rflushes waiting on it; a
        # stack, not recursion, so a chain of any length costs no stack depth.
        chain = list(reversed(req.flushers))
        req.flushers = ()
        while chain:
            flush = chain.pop()
            waiting, flush.flushers = flush.flushers, ()
            self.complete(flush, c.Rflush(tag=flush.tag))  # no flushers left: no recursion
            chain.extend(reversed(waiting))

    def close(self) -> None:
        """The connection is gone: abort what has not started, silence the rest, clunk
        every fid (a fid still borrowed closes when its request gives it back)."""
        if self.closed:
            return
        self.closed = True
        self._abandon()

    def take(self) -> list[Action]:
        """The actions decided since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions

    def take_freed(self) -> int:
        """Bytes (see :meth:`receive`) of messages that are over since the last call
        (also readable, and to be reset, as :attr:`freed`)."""
        freed, self.freed = self.freed, 0
        return freed

    # ------------------------------------------------------------------ rules

    def _send(self, reply: Reply) -> None:
        self._actions.append(reply)

    def _protocol_error(self, reason: str) -> None:
        self._actions.append(Close(reason))
        self.close()

    def _abandon(self) -> None:
        for req in self.pending.values():
            if req.state is QUEUED:
                req.state = ABORTED
                self._actions.append(Abort(req))
            elif req.state is WAITING:
                req.state = DONE
            else:
                continue  # running: it gives its bytes back when it completes
            self.freed += req.held
            req.held = 0
        self.pending = {}
        self.fids.close_all()

    def _version(self, msg: c.Tversion) -> None:
        self._abandon()
        self.epoch += 1
        self.fids = FidTable(self.max_fids)
        self.versioned = False
        if msg.msize < MIN_MSIZE:
            # Too small to carry a directory read: say no by the version string.
            self._send(c.Rversion(self.max_msize, "unknown", tag=msg.tag))
            return
        msize = min(msg.msize, self.max_msize)
        if not msg.version.startswith(c.VERSION_9P2000L):
            self._send(c.Rversion(msize, "unknown", tag=msg.tag))
            return
        self.msize = msize
        self.versioned = True
        self._send(c.Rversion(msize, c.VERSION_9P2000L, tag=msg.tag))

    def _flush(self, msg: c.Tflush) -> Request | None:
        """A Tflush: answered now (None), or the request that waits for its target."""
        target = self.pending.get(msg.oldtag)
        if target is None:
            # Nothing pending under that tag (already answered, never sent, or the flush
            # names itself): the flush is trivially done.
            self._send(c.Rflush(tag=msg.tag))
            return None
        if target.state is QUEUED:
            # Not started: drop it, silently, and the flush is done.
            del self.pending[target.tag]
            target.state = ABORTED
            self.freed += target.held
            target.held = 0
            self._actions.append(Abort(target))
            self._send(c.Rflush(tag=msg.tag))
            return None
        # Running (or itself a waiting Tflush): its answer comes first, then this one.
        flush = Request(msg, WAITING, self.epoch, self.fids)
        self.pending[msg.tag] = flush
        target.flushers += (flush,)
        return flush
