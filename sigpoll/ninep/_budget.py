"""What the 9P server lets its peers make it hold: bytes and descriptors, counted.

A :class:`Budget` is the whole server's; each connection holds an :class:`Account` in it.
Bytes are counted in two kinds:

* *transient* bytes (:meth:`Account.take`/:meth:`Account.give`): what a request holds from
  the moment it is taken off the wire until its reply has left (its frame, its reply's
  worst-case size reserved up front, the reply queued for the peer).  The connection stops
  taking requests while its account or the budget is full (backpressure, not an error),
  except that a connection holding nothing may always take one, so none can be starved.
* *state* bytes (:meth:`Account.hold_state`): what a fid keeps between requests (an xattr
  value read or being written), up to the same two limits, counted apart.  Past either the
  request that would add more is refused with ENOMEM.

Descriptors (:meth:`Account.check_fds`, :meth:`Account.add_fds`) are the fds fids keep
open; past the connection's or the server's limit the request that would open more is
refused with EMFILE or ENFILE.  Every refusal logs one line, at most every
:data:`LOG_EVERY` seconds per kind (with how many were not logged).

No I/O and no clock but ``time.monotonic`` for the log's rate.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

__all__ = ["Budget", "Account", "PeerShare", "RateLimitedLog", "LOG_EVERY"]

log = logging.getLogger("sigpoll.ninep")

#: Seconds between two log lines of one kind of refusal.
LOG_EVERY = 10.0


class RateLimitedLog:
    """At most one warning per ``every`` seconds per key; the rest are counted."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        if quiet:
            message += f" ({quiet} more like it not logged)"
        log.warning(message, *args)


class Budget:
    """The server's limits on bytes and fds, and what all its connections hold."""

    def __init__(self, memory: int, fds: int) -> None:
        #: Transient bytes all connections may hold together.
        self.memory = memory
        #: Fds all connections' fids may hold together.
        self.fds = fds
        self.mem_used = 0
        self.state_used = 0
        self.fds_used = 0
        self.log = RateLimitedLog()
        #: Connections waiting for the budget to free up (an ordered set).
        self.waiting: dict[object, None] = {}
        #: Called when transient bytes come back while some wait.
        self.on_release: Callable[[], None] | None = None


class PeerShare:
    """What all connections of one peer hold together (descriptors): one peer opening
    many connections still cannot take the whole server's budget."""

    __slots__ = ("fds", "fds_used", "connections")

    def __init__(self, fds: int) -> None:
        self.fds = fds
        self.fds_used = 0
        self.connections = 0


class Account:
    """One connection's share of a :class:`Budget`: at most ``memory`` transient bytes,
    ``memory`` state bytes and ``fds`` descriptors, the last also within its peer's
    :class:`PeerShare` (``share``)."""

    __slots__ = ("budget", "memory", "fds", "mem_used", "state_used", "fds_used", "peer",
                 "waiting", "share")

    def __init__(self, budget: Budget, memory: int, fds: int, peer: str = "?") -> None:
        self.budget = budget
        self.memory = memory
        self.fds = fds
        self.mem_used = 0
        self.state_used = 0
        self.fds_used = 0
        self.peer = peer
        #: The peer's share; its own until the server knows the peer.
        self.share = PeerShare(budget.fds)
        #: The last :meth:`room` said no because the whole budget was full.
        self.waiting = False

    # ------------------------------------------------------------------ transient bytes

    def room(self, cost: int) -> bool:
        """Whether a request costing ``cost`` bytes may be taken now."""
        if self.mem_used == 0:
            self.waiting = False
            return True  # a connection holding nothing may always take one
        if self.mem_used + cost > self.memory:
            self.waiting = False
            return False
        self.waiting = self.budget.mem_used + cost > self.budget.memory
        return not self.waiting

    def take(self, n: int) -> None:
        self.mem_used += n
        self.budget.mem_used += n

    def give(self, n: int) -> None:
        self.mem_used -= n
        budget = self.budget
        budget.mem_used -= n
        if budget.waiting and budget.on_release is not None:
            budget.on_release()

    # ------------------------------------------------------------------ state bytes

    def hold_state(self, n: int) -> None:
        """Keep ``n`` more bytes of fid state, or raise ENOMEM (past this connection's
        limit, or past the server's: state counts against both like transient bytes)."""
        budget = self.budget
        if n and (self.state_used + n > self.memory or budget.state_used + n > budget.memory):
            budget.log.warning(
                "state", "%s: fids would hold more than max_connection_memory or "
                "max_server_memory; answered ENOMEM", self.peer)
            raise OSError(errno.ENOMEM, "too much held on this connection's fids")
        self.state_used += n
        budget.state_used += n

    def drop_state(self, n: int) -> None:
        self.state_used -= n
        self.budget.state_used -= n

    # ------------------------------------------------------------------ descriptors

    def room_for_fds(self, n: int = 1) -> bool:
        """Whether ``n`` more fds fit this connection's, its peer's and the server's budget."""
        share = self.share
        budget = self.budget
        return (self.fds_used + n <= self.fds and share.fds_used + n <= share.fds
                and budget.fds_used + n <= budget.fds)

    def check_fds(self, n: int = 1) -> None:
        """Raise EMFILE (this connection or its peer) or ENFILE (the server) unless ``n``
        more fds fit."""
        budget = self.budget
        if self.fds_used + n > self.fds:
            budget.log.warning("emfile", "%s: %d fds open for its fids (max_connection_fds); "
                               "answered EMFILE", self.peer, self.fds_used)
            raise OSError(errno.EMFILE, "too many files open on this connection")
        if self.share.fds_used + n > self.share.fds:
            budget.log.warning("emfile-peer", "%s: %d fds open for the fids of its peer's "
                               "connections (max_peer_fds); answered EMFILE", self.peer,
                               self.share.fds_used)
            raise OSError(errno.EMFILE, "too many files open for this peer")
        if budget.fds_used + n > budget.fds:
            budget.log.warning("enfile", "%d fds open for fids on all connections "
                               "(max_fds); %s answered ENFILE", budget.fds_used, self.peer)
            raise OSError(errno.ENFILE, "too many files open on this server")

    def add_fds(self, n: int) -> None:
        self.fds_used += n
        self.share.fds_used += n
        self.budget.fds_used += n
