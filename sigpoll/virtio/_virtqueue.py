"""Split virtqueues over guest memory, with every guest-supplied number checked.

:class:`Virtqueue` walks descriptor chains
(direct and indirect), and returns used buffers to the guest in the order the guest relies
on: the used element is written before the used index that publishes it, and the avail
index is read before the ring entries it covers.

Nothing the guest writes can make this code touch memory outside the regions, loop, or
raise: a malformed chain, a ring index out of range, an address outside every region, an
overflowing length or a chain giving more than ``max_chain_read`` bytes to read marks the
queue *broken* (logged once) and the queue stops moving.  The
guest then sees a dead device, which is what the virtio spec asks for (NEEDS_RESET).

The module is pure: it works the same over a ``bytearray`` (the property tests) as over an
mmap of a real guest's memory (:mod:`._memory`, which also guards against that memory
vanishing).
"""

from __future__ import annotations

import logging
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._memory import GuestMemory, MemoryFault
from ._vhost_user import VringAddr

__all__ = [
    "DESC_F_INDIRECT",
    "DESC_F_NEXT",
    "DESC_F_WRITE",
    "MAX_QUEUE_SIZE",
    "AVAIL_F_NO_INTERRUPT",
    "MAX_CHAIN_READ",
    "Chain",
    "Virtqueue",
    "full_fence",
    "ring_sizes",
    "u16_view",
]

log = logging.getLogger("sigpoll.virtio")

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
# An indirect table may be longer than the queue (it uses no ring slots); this bounds the
# work one chain can cost us.
MAX_INDIRECT = 4096
# Used-element length is a le32; a chain whose buffers add up to more cannot be described.
MAX_CHAIN_BYTES = 0xFFFFFFFF
# What one chain may give the device to read, counting every descriptor's length even when
# descriptors overlap or repeat (each one is a copy we would make).  Linux's virtio_console
# sends at most 32 KiB per write() and a pipe's worth (1 MiB at most, unprivileged) per
# splice; 512 descriptors all naming the same 1 MiB would otherwise cost 512 MiB of copies.
# A longer chain breaks the queue.  Per queue: Virtqueue.max_chain_read.
MAX_CHAIN_READ = 1 << 20

_DESC = struct.Struct("<QIHH")

# Python has no memory fence.  The event-index handshake needs one: we store the used index
# and then load used_event, while the guest stores used_event and then loads the used index
# (and the same with avail_event/avail idx).  x86 lets a store sit in the store buffer past
# a later load, so without a fence both sides can miss each other: the guest sleeps waiting
# for an interrupt we decided it did not want.  Acquiring and releasing an uncontended lock
# executes atomic read-modify-write instructions (a locked cmpxchg/xadd in glibc's
# semaphores), which are full barriers on x86 and carry barrier semantics elsewhere.
_FENCE_LOCK = threading.Lock()


def full_fence() -> None:
    """A full memory barrier between the stores before it and the loads after it."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


# Ring fields the other side reads or writes while we run (the avail and used indexes,
# flags, used_event, avail_event) must be loaded and stored whole, with one aligned 16-bit
# access.  struct.pack_into cannot do that: CPython's packer first zeroes the whole
# destination (memset, for padding) and then writes the value, so another CPU can read a
# used index of 0 in between.  A guest that reads that 0 sees a used ring that jumped
# ahead, takes a stale element and stops with "id N is not a head" (see docs/virtio.md).
# An item store through a memoryview cast to "H"/"I" is a single fixed-size copy, one
# machine store; so the shared fields go through such views, never through struct.
# The views are native-endian; virtio 1.x rings are little-endian.
_BIG_ENDIAN = sys.byteorder == "big"


def _le16(value: int) -> int:
    """A u16 between host order and the ring's little-endian order (a no-op on LE hosts)."""
    return ((value & 0xFF) << 8) | (value >> 8) if _BIG_ENDIAN else value


def _le32(value: int) -> int:
    return int.from_bytes(value.to_bytes(4, "little"), "big") if _BIG_ENDIAN else value


def u16_view(buf: Any) -> memoryview:
    """``buf`` (an even number of bytes) as native u16 items, each loaded/stored whole.

    Use it for ring fields shared with a peer running concurrently; index ``i`` is the
    field at byte offset ``2 * i``.  Pair values with :func:`_le16` on big-endian hosts.
    """
    return memoryview(buf).cast("B").cast("H")


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, avail ring and used ring for a queue of ``num``."""
    return 16 * num, 6 + 2 * num, 6 + 8 * num


@dataclass
class Chain:
    """One descriptor chain popped from the avail ring.

    ``readable`` are the guest's buffers for the device to read (driver -> device),
    ``writable`` those for the device to fill; both as memoryviews into guest memory.
    Move data with :meth:`read_all` and :meth:`fill`: they copy through the guest-memory
    guard, so memory the frontend takes away mid-copy fails the copy (and breaks the
    queue) instead of the process.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    written: int = 0  #: bytes filled in so far (the used length to report)
    _wseg: int = 0  # write cursor: segment index and offset in it
    _woff: int = 0
    _queue: Virtqueue | None = None
    _mem: GuestMemory | None = None
    _rhost: list[int] = field(default_factory=list)  # host address of each buffer (0: unguarded)
    _whost: list[int] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read_all(self, limit: int = MAX_CHAIN_BYTES) -> bytes:
        """Copy out what the guest gave us to read, at most ``limit`` bytes.

        Empty if the guest's memory has gone (the queue is then broken)."""
        if self._mem is None:
            return b"".join(v.tobytes() for v in self.readable)[:limit]
        data = self._mem.copy_out(self.readable, self._rhost, limit)
        if data is None:
            self._memory_gone()
            return b""
        return data

    def fill(self, data: memoryview | bytes) -> int:
        """Append as much of ``data`` as fits after what was already written; return bytes taken.

        Successive calls continue where the previous one stopped, so one guest buffer can
        be filled from several host writes.  Takes nothing if the guest's memory has gone
        (the queue is then broken).
        """
        src = memoryview(data)
        taken = 0
        while src and self._wseg < len(self.writable):
            view = self.writable[self._wseg]
            n = min(len(view) - self._woff, len(src))
            if self._mem is None:
                view[self._woff : self._woff + n] = src[:n]
            elif not self._mem.copy_in(view, self._whost[self._wseg], self._woff, src[:n]):
                self._memory_gone()
                break
            src = src[n:]
            taken += n
            self._woff += n
            if self._woff == len(view):
                self._wseg += 1
                self._woff = 0
        self.written += taken
        return taken

    def _memory_gone(self) -> None:
        if self._queue is not None:
            self._queue.mark_broken("the frontend took its memory away (SIGBUS caught in a copy)")

    def release(self) -> None:
        for v in self.readable:
            v.release()
        for v in self.writable:
            v.release()
        self.readable.clear()
        self.writable.clear()


class Virtqueue:
    """One split virtqueue's device side.

    Configure with :meth:`set_num`, :meth:`set_base`, :meth:`set_addr`, then
    :meth:`activate` with the guest memory.  :meth:`pop` and :meth:`push` move buffers.
    Errors in what the guest wrote mark the queue broken (see :attr:`broken`).
    """

    def __init__(self, index: int, *, name: str = "") -> None:
        self.index = index
        self.name = name or f"queue {index}"
        self.num = 0
        self.last_avail = 0  # next avail ring slot we will consume (free-running u16)
        self.used_idx = 0  # our copy of the used index we last published
        self.event_idx = False
        self.addr: VringAddr | None = None
        self.broken: str | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        # Typed views of the shared fields (see _le16): avail as u16s, used as u16s (flags,
        # idx, avail_event) and its elements as u32s (id, len pairs).
        self._avail16: memoryview | None = None
        self._used16: memoryview | None = None
        self._elems32: memoryview | None = None
        self._mem: GuestMemory | None = None
        self._signalled_used = 0  # used idx at the last interrupt (EVENT_IDX arithmetic)
        self.max_chain_read = MAX_CHAIN_READ  #: readable bytes one chain may hold

    # -- configuration (from the frontend) --

    def set_num(self, num: int) -> None:
        if not (1 <= num <= MAX_QUEUE_SIZE and num & (num - 1) == 0):
            self.mark_broken(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
            return
        self.num = num

    def set_base(self, base: int) -> None:
        if not 0 <= base <= 0xFFFF:
            self.mark_broken(f"ring base {base} out of range")
            return
        self.last_avail = base
        self.used_idx = base
        self._signalled_used = base

    def set_addr(self, addr: VringAddr) -> None:
        self.addr = addr

    def activate(self, mem: GuestMemory | None) -> bool:
        """Translate the ring addresses against ``mem``; False (and broken) if impossible."""
        self.deactivate()
        if self.broken:
            return False
        if mem is None or self.addr is None or self.num == 0:
            self.mark_broken("ring started before its size, addresses and memory were set")
            return False
        dsize, asize, usize = ring_sizes(self.num)
        a = self.addr
        # Alignment the spec requires (16/2/4); misaligned rings mean a confused frontend.
        if a.desc % 16 or a.avail % 2 or a.used % 4:
            self.mark_broken(f"misaligned ring addresses desc={a.desc:#x} avail={a.avail:#x} used={a.used:#x}")
            return False
        try:
            self._desc = mem.translate(a.desc, dsize, user=True)
            self._avail = mem.translate(a.avail, asize, user=True)
            self._used = mem.translate(a.used, usize, user=True)
        except MemoryFault as exc:
            self.deactivate()
            self.mark_broken(f"ring not in guest memory: {exc}")
            return False
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self._elems32 = self._used[4 : 4 + 8 * self.num].cast("I")
        self._mem = mem
        return True

    @property
    def active(self) -> bool:
        return self._used is not None and not self.broken

    def deactivate(self) -> None:
        """Drop the ring views (the memory may be unmapped after this)."""
        # The casts first: a view cannot be released while views made from it exist.
        for v in (self._avail16, self._used16, self._elems32, self._desc, self._avail, self._used):
            if v is not None:
                v.release()
        self._avail16 = self._used16 = self._elems32 = None
        self._desc = self._avail = self._used = None
        self._mem = None

    def reset(self) -> None:
        self.deactivate()
        self.num = 0
        self.last_avail = self.used_idx = self._signalled_used = 0
        self.addr = None
        self.broken = None

    def mark_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.warning("virtio %s broken: %s", self.name, reason)
        self.deactivate()

    # -- the avail side --

    def avail_idx(self) -> int:
        assert self._avail16 is not None
        return _le16(self._avail16[1])

    def pending(self) -> int:
        """How many chains the guest has made available that we have not popped."""
        if not self.active:
            return 0
        n = (self.avail_idx() - self.last_avail) & 0xFFFF
        if n > self.num:
            self.mark_broken(f"avail index moved {n} entries ahead on a ring of {self.num}")
            return 0
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None (nothing available, or the queue is broken)."""
        if not self.pending():
            return None
        # pending() read the avail index first; only now read the slot it covers.
        assert self._avail16 is not None
        head = _le16(self._avail16[2 + self.last_avail % self.num])
        chain = self._walk(head)
        if chain is None:
            return None
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            # The guest kicks only when its avail index crosses avail_event.  Left behind
            # its index, avail_event would never be crossed again (until the u16 wraps),
            # so it follows every pop.
            assert self._used16 is not None
            self._used16[2 + 4 * self.num] = _le16(self.last_avail)
        return chain

    def _walk(self, head: int) -> Chain | None:
        assert self._desc is not None and self._mem is not None
        if head >= self.num:
            self.mark_broken(f"avail ring names descriptor {head} on a ring of {self.num}")
            return None
        chain = Chain(head, _queue=self, _mem=self._mem)
        error = self._walk_into(chain, head)
        if error is not None:
            chain.release()
            self.mark_broken(error)
            return None
        return chain

    def _walk_into(self, chain: Chain, head: int) -> str | None:
        """Fill ``chain`` from descriptor ``head``; the reason it is malformed, or None."""
        assert self._desc is not None and self._mem is not None
        mem = self._mem
        table, table_len, index = self._desc, self.num, head
        indirect: memoryview | None = None
        seen = total = readable = 0
        try:
            while True:
                seen += 1
                if seen > table_len:
                    return f"descriptor chain from {head} loops or exceeds {table_len} entries"
                addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
                if flags & DESC_F_INDIRECT:
                    if indirect is not None:
                        return "indirect descriptor inside an indirect table"
                    if flags & DESC_F_NEXT:
                        return "indirect descriptor with the NEXT flag"
                    if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                        return f"indirect table of {length} bytes"
                    try:
                        indirect = mem.translate(addr, length)
                    except MemoryFault as exc:
                        return f"indirect table: {exc}"
                    table, table_len, index, seen = indirect, length // 16, 0, 0
                    continue
                total += length
                if total > MAX_CHAIN_BYTES:
                    return f"chain from {head} adds up to more than 4 GiB"
                if not flags & DESC_F_WRITE:
                    readable += length
                    if readable > self.max_chain_read:
                        return (f"chain from {head} gives more than {self.max_chain_read} bytes to read "
                                "(descriptors counted each time they appear)")
                if length:
                    try:
                        view, host = mem.locate(addr, length)
                    except MemoryFault as exc:
                        return f"descriptor in chain {head}: {exc}"
                    if flags & DESC_F_WRITE:
                        chain.writable.append(view)
                        chain._whost.append(host)
                    elif chain.writable:
                        view.release()
                        return f"chain {head} has a readable buffer after a writable one"
                    else:
                        chain.readable.append(view)
                        chain._rhost.append(host)
                if not flags & DESC_F_NEXT:
                    return None
                if nxt >= table_len:
                    return f"descriptor next={nxt} out of range ({table_len})"
                index = nxt
        finally:
            if indirect is not None:
                indirect.release()

    def enable_kicks(self) -> bool:
        """Ask the guest to kick when it adds buffers; True if some arrived meanwhile.

        With EVENT_IDX the guest kicks only once its avail index passes ``avail_event``, so
        we publish how far we have read, then look again: a buffer added between our last
        look and the write would otherwise wait for a kick the guest will not send.
        """
        if not self.active:
            return False
        if self.event_idx:
            assert self._used16 is not None
            self._used16[2 + 4 * self.num] = _le16(self.last_avail)
            full_fence()  # publish avail_event before looking at the avail index again
        return self.pending() > 0

    # -- the used side --

    def push(self, head: int, length: int) -> None:
        """Return chain ``head`` to the guest with ``length`` bytes written into it."""
        if not self.active:
            return
        assert self._used16 is not None and self._elems32 is not None
        slot = 2 * (self.used_idx % self.num)
        self._elems32[slot] = _le32(head)
        self._elems32[slot + 1] = _le32(length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # Element first, then the index that makes it visible (stores are not reordered
        # with other stores on x86; the interpreter's own locking orders them elsewhere).
        # The index goes out in one 16-bit store: the guest may read it at any moment, and
        # any intermediate value would publish elements we never wrote (see _le16).
        self._used16[1] = _le16(self.used_idx)

    def should_notify(self) -> bool:
        """Whether the guest wants an interrupt for what was pushed since the last one."""
        if not self.active or self.used_idx == self._signalled_used:
            return False
        assert self._avail16 is not None
        full_fence()  # the used index we published must be visible before we read used_event
        old, new = self._signalled_used, self.used_idx
        if self.event_idx:
            event = _le16(self._avail16[2 + self.num])
            want = ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            want = not _le16(self._avail16[0]) & AVAIL_F_NO_INTERRUPT
        self._signalled_used = new
        return want

    def __repr__(self) -> str:
        state = "broken" if self.broken else "active" if self.active else "idle"
        return f"<Virtqueue {self.name} num={self.num} {state} avail={self.last_avail} used={self.used_idx}>"
