"""Split-virtqueue code against guest memory it must not trust (property tests).

Memory is a bytearray here; the same code runs over a real guest's mmap.  Whatever the
"guest" writes, the queue either yields chains wholly inside the memory regions or marks
itself broken -- it never raises, loops or reads outside the regions.
"""

from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigpoll.virtio._memory import GuestMemory, MemoryFault
from sigpoll.virtio._vhost_user import VringAddr
from sigpoll.virtio._virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Chain,
    Virtqueue,
)

GUEST = 0x100000  # guest-physical base of the region
USER = 0x7F0000000000  # the frontend's virtual address of the same bytes
SIZE = 1 << 16
NUM = 16
DESC, AVAIL, USED = 0x0, 0x400, 0x800  # ring offsets inside the region
DATA = 0x1000  # buffers from here on


class Guest:
    """The driver side, writing into a bytearray region."""

    def __init__(self, num: int = NUM, event_idx: bool = False, buf: Any = None) -> None:
        self.buf = bytearray(SIZE) if buf is None else buf
        self.mem = GuestMemory([(GUEST, USER, self.buf)])
        self.q = Virtqueue(0)
        self.q.set_num(num)
        self.q.set_base(0)
        self.q.event_idx = event_idx
        self.q.set_addr(VringAddr(0, 0, USER + DESC, USER + USED, USER + AVAIL, 0))
        assert self.q.activate(self.mem)
        self.num = num
        self.avail_idx = 0
        self.brk = DATA

    def desc(self, i: int, addr: int, length: int, flags: int, nxt: int, table: int = DESC) -> None:
        struct.pack_into("<QIHH", self.buf, table + 16 * i, addr, length, flags, nxt)

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.buf, AVAIL + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.buf, AVAIL + 2, self.avail_idx)

    def alloc(self, n: int) -> int:
        off = self.brk
        self.brk += max(n, 1)
        assert self.brk <= SIZE
        return off

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack_from("<H", self.buf, USED + 2)[0]
        elems = [struct.unpack_from("<II", self.buf, USED + 4 + 8 * i) for i in range(self.num)]
        return idx, elems


segments = st.lists(st.tuples(st.integers(0, 300), st.booleans()), min_size=1, max_size=6).map(
    # readable buffers first, then writable ones, as the spec requires
    lambda segs: sorted(segs, key=lambda s: s[1])
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(chains=st.lists(st.tuples(segments, st.booleans()), min_size=1, max_size=5))
def test_well_formed_chains_come_back_exactly(chains: list[tuple[list[tuple[int, bool]], bool]]) -> None:
    g = Guest(num=32)  # room for 5 chains of up to 6 descriptors
    next_desc = 0
    expected = []
    for segs, indirect in chains:
        contents = []
        entries = []
        for length, writable in segs:
            off = g.alloc(length)
            data = bytes((off + k) & 0xFF for k in range(length))
            g.buf[off : off + length] = data
            contents.append((data, writable))
            entries.append((GUEST + off, length, DESC_F_WRITE if writable else 0))
        if indirect:
            table = g.alloc(16 * len(entries))
            for i, (addr, length, flags) in enumerate(entries):
                more = i + 1 < len(entries)
                g.desc(i, addr, length, flags | (DESC_F_NEXT if more else 0), i + 1 if more else 0, table)
            head = next_desc
            g.desc(head, GUEST + table, 16 * len(entries), DESC_F_INDIRECT, 0)
            next_desc += 1
        else:
            head = next_desc
            for i, (addr, length, flags) in enumerate(entries):
                more = i + 1 < len(entries)
                g.desc(next_desc, addr, length, flags | (DESC_F_NEXT if more else 0), next_desc + 1 if more else 0)
                next_desc += 1
        assert next_desc <= g.num
        g.publish(head)
        expected.append((head, contents))
    for head, contents in expected:
        chain = g.q.pop()
        assert chain is not None and chain.head == head
        assert [v.tobytes() for v in chain.readable] == [d for d, w in contents if not w and d]
        assert [v.tobytes() for v in chain.writable] == [d for d, w in contents if w and d]
        g.q.push(chain.head, chain.writable_len)
        chain.release()
    assert g.q.pop() is None and g.q.broken is None
    idx, elems = g.used()
    assert idx == len(expected)
    for i, (head, contents) in enumerate(expected):
        assert elems[i] == (head, sum(len(d) for d, w in contents if w))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.binary(min_size=16 * NUM, max_size=16 * NUM),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=NUM, max_size=NUM),
    avail_idx=st.integers(0, 0xFFFF),
    base=st.integers(0, 0xFFFF),
)
def test_garbage_rings_never_escape_or_crash(table: bytes, ring: list[int], avail_idx: int, base: int) -> None:
    g = Guest()
    g.q.set_base(base)
    g.buf[DESC : DESC + 16 * NUM] = table
    for i, head in enumerate(ring):
        struct.pack_into("<H", g.buf, AVAIL + 4 + 2 * i, head)
    struct.pack_into("<H", g.buf, AVAIL + 2, avail_idx)
    popped = 0
    for _ in range(2 * NUM):  # never more than the ring can hold
        chain = g.q.pop()
        if chain is None:
            break
        popped += 1
        for v in chain.readable + chain.writable:
            assert 0 < len(v) <= SIZE
        chain.fill(b"x" * 100)  # writing into whatever the guest offered stays in bounds
        g.q.push(chain.head, chain.written)
        chain.release()
    assert popped <= NUM
    assert g.q.pop() is None or g.q.broken is None


def _one_chain(g: Guest, descs: list[tuple[int, int, int, int]], head: int = 0) -> Chain | None:
    for i, d in enumerate(descs):
        g.desc(i, *d)
    g.publish(head)
    return g.q.pop()


@pytest.mark.parametrize(
    ("descs", "head", "reason"),
    [
        ([(GUEST + DATA, 8, DESC_F_NEXT, 0)], 0, "loops"),  # next points at itself
        ([(GUEST + DATA, 8, DESC_F_NEXT, 1), (GUEST + DATA, 8, DESC_F_NEXT, 0)], 0, "loops"),
        ([(GUEST + DATA, 8, 0, 0)], NUM, "names descriptor"),  # head out of range
        ([(GUEST + DATA, 8, DESC_F_NEXT, NUM + 3)], 0, "out of range"),
        ([(GUEST - 16, 32, 0, 0)], 0, "outside every memory region"),  # straddles the start
        ([(GUEST + SIZE - 4, 8, 0, 0)], 0, "outside every memory region"),  # straddles the end
        ([(USER + DATA, 8, 0, 0)], 0, "outside every memory region"),  # a user address
        ([(GUEST + DATA, 0xFFFFFFFF, DESC_F_WRITE, 0)], 0, "outside every memory region"),  # huge length
        ([(0xFFFFFFFFFFFFFFF0, 0x20, 0, 0)], 0, "outside every memory region"),  # wraps
        ([(GUEST + DATA, 8, DESC_F_WRITE | DESC_F_NEXT, 1), (GUEST + DATA, 8, 0, 0)], 0, "readable buffer after"),
        ([(GUEST + DATA, 17, DESC_F_INDIRECT, 0)], 0, "indirect table"),  # not a multiple of 16
        ([(GUEST + DATA, 0, DESC_F_INDIRECT, 0)], 0, "indirect table"),
        ([(GUEST + DATA, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1)], 0, "NEXT"),
        ([(GUEST + SIZE, 16, DESC_F_INDIRECT, 0)], 0, "indirect table"),
    ],
)
def test_hostile_chains_break_the_queue(descs: list[tuple[int, int, int, int]], head: int, reason: str) -> None:
    g = Guest()
    assert _one_chain(g, descs, head) is None
    assert g.q.broken is not None and reason in g.q.broken
    assert not g.q.active
    g.q.push(0, 0)  # a broken queue ignores pushes rather than writing anywhere
    assert g.used()[0] == 0


def test_nested_and_looping_indirect_tables() -> None:
    g = Guest()
    table = g.alloc(32)
    g.desc(0, GUEST + table, 32, DESC_F_INDIRECT, 0, table)  # indirect inside indirect
    assert _one_chain(g, [(GUEST + table, 32, DESC_F_INDIRECT, 0)]) is None
    assert "inside an indirect" in (g.q.broken or "")

    g = Guest()
    table = g.alloc(32)
    g.desc(0, GUEST + DATA, 4, DESC_F_NEXT, 1, table)
    g.desc(1, GUEST + DATA, 4, DESC_F_NEXT, 0, table)  # back to 0
    assert _one_chain(g, [(GUEST + table, 32, DESC_F_INDIRECT, 0)]) is None
    assert "loops" in (g.q.broken or "")


@pytest.mark.parametrize("copies", [16, 17])
def test_repeated_descriptors_count_against_the_read_cap(copies: int) -> None:
    """An indirect table naming the same 64 KiB again and again: each repeat is a copy."""
    g = Guest()
    g.q.max_chain_read = 16 * SIZE  # the region is 64 KiB; 16 repeats fill the cap exactly
    table = g.alloc(16 * copies)
    for i in range(copies):
        g.desc(i, GUEST, SIZE, DESC_F_NEXT if i + 1 < copies else 0, i + 1, table)
    chain = _one_chain(g, [(GUEST + table, 16 * copies, DESC_F_INDIRECT, 0)])
    if copies == 16:
        assert chain is not None and chain.readable_len == 16 * SIZE
        assert len(chain.read_all()) == 16 * SIZE
    else:
        assert chain is None
        assert "bytes to read" in (g.q.broken or "")


def test_avail_index_running_ahead_of_the_ring_breaks_it() -> None:
    g = Guest()
    struct.pack_into("<H", g.buf, AVAIL + 2, NUM + 1)
    assert g.q.pop() is None
    assert "ahead" in (g.q.broken or "")


@pytest.mark.parametrize("num", [0, 3, 65536])
def test_bad_queue_sizes(num: int) -> None:
    q = Virtqueue(0)
    q.set_num(num)
    assert q.broken and "power of two" in q.broken


def test_ring_outside_memory_or_misaligned() -> None:
    mem = GuestMemory([(GUEST, USER, bytearray(SIZE))])
    q = Virtqueue(0)
    q.set_num(NUM)
    q.set_addr(VringAddr(0, 0, GUEST + DESC, GUEST + USED, GUEST + AVAIL, 0))  # guest, not user
    assert not q.activate(mem) and "not in guest memory" in (q.broken or "")
    q = Virtqueue(0)
    q.set_num(NUM)
    q.set_addr(VringAddr(0, 0, USER + 8, USER + USED, USER + AVAIL, 0))
    assert not q.activate(mem) and "misaligned" in (q.broken or "")


def test_translate_bounds() -> None:
    mem = GuestMemory([(GUEST, USER, bytearray(SIZE)), (GUEST + 2 * SIZE, USER + 2 * SIZE, bytearray(SIZE))])
    assert len(mem.translate(GUEST, SIZE)) == SIZE
    assert len(mem.translate(GUEST + 2 * SIZE + 5, 10)) == 10
    for addr, length in [(GUEST + SIZE - 1, 2), (GUEST + SIZE, 1), (GUEST - 1, 1), (GUEST, -1), (-5, 1)]:
        with pytest.raises(MemoryFault):
            mem.translate(addr, length)
    with pytest.raises(MemoryFault):  # crossing from one region into the gap
        mem.translate(GUEST + SIZE - 4, SIZE)


@settings(max_examples=100)
@given(cuts=st.lists(st.integers(1, 50), min_size=1, max_size=10), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4))
def test_fill_appends_across_calls(cuts: list[int], sizes: list[int]) -> None:
    buf = bytearray(1024)
    views, off = [], 0
    for s in sizes:
        views.append(memoryview(buf)[off : off + s])
        off += s + 3  # gaps must stay untouched
    chain = Chain(0, [], views)
    stream = bytes(range(256)) * 4
    pos = 0
    for c in cuts:
        pos += chain.fill(stream[pos : pos + c])
    assert chain.written == pos == min(sum(cuts), sum(sizes))
    assert b"".join(v.tobytes() for v in views)[:pos] == stream[:pos]
    off = 0
    for s in sizes:
        assert buf[off + s : off + s + 3] == b"\0\0\0"
        off += s + 3


def _need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@settings(max_examples=200)
@given(pushes=st.lists(st.integers(1, 5), min_size=1, max_size=20), events=st.lists(st.integers(0, 0xFFFF), min_size=20, max_size=20))
def test_event_idx_interrupt_decisions(pushes: list[int], events: list[int]) -> None:
    g = Guest(event_idx=True)
    for i in range(NUM):
        g.desc(i, GUEST + DATA, 8, DESC_F_WRITE, 0)
    old = 0
    for n, event in zip(pushes, events):
        event_pos = AVAIL + 4 + 2 * NUM
        struct.pack_into("<H", g.buf, event_pos, event)
        for _ in range(n):
            g.publish(0)
            chain = g.q.pop()
            assert chain is not None
            # avail_event follows every pop, so the guest's next buffer is always kicked
            assert struct.unpack_from("<H", g.buf, USED + 4 + 8 * NUM)[0] == g.q.last_avail
            g.q.push(chain.head, 0)
        new = g.q.used_idx
        assert g.q.should_notify() == _need_event(event, new, old)
        old = new


def test_no_interrupt_flag_without_event_idx() -> None:
    g = Guest()
    g.desc(0, GUEST + DATA, 8, DESC_F_WRITE, 0)
    g.publish(0)
    g.q.push(g.q.pop().head, 0)  # type: ignore[union-attr]
    struct.pack_into("<H", g.buf, AVAIL, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    assert not g.q.should_notify()
    g.publish(0)
    g.q.push(g.q.pop().head, 0)  # type: ignore[union-attr]
    struct.pack_into("<H", g.buf, AVAIL, 0)
    assert g.q.should_notify()


# Runs in a separate process (a thread would only ever see whole Python statements): watches
# the used index and avail_event with single 16-bit loads while the parent pushes and pops,
# and reports any value that moved backwards -- what a guest CPU would have read.
_WATCHER = textwrap.dedent("""
    import mmap, sys
    fd, used, num = (int(a) for a in sys.argv[1:4])
    mem = mmap.mmap(fd, 0)
    h = memoryview(mem).cast("H")
    idx_at, event_at, stop_at = (used + 2) // 2, (used + 4 + 8 * num) // 2, len(h) - 1
    reads = back = 0
    last_idx, last_event = h[idx_at], h[event_at]
    print("ready", flush=True)
    while not h[stop_at]:
        for _ in range(1000):
            i, e = h[idx_at], h[event_at]
            if (i - last_idx) & 0xFFFF >= 0x8000 or (e - last_event) & 0xFFFF >= 0x8000:
                back += 1
            last_idx, last_event = i, e
        reads += 1000
    print(reads, back, flush=True)
""")


def test_shared_ring_fields_are_never_seen_half_written() -> None:
    # struct.pack_into zeroes its target before writing the value; a used index stored that
    # way reads as 0 for an instant, and a real guest that looks then takes a stale used
    # element ("id N is not a head!" from Linux).  Every store of a field the guest reads
    # concurrently must be one machine store.
    fd = os.memfd_create("ring-test")
    os.ftruncate(fd, SIZE)
    buf = mmap.mmap(fd, SIZE)
    g = Guest(num=NUM, event_idx=True, buf=buf)
    buf_addr = g.alloc(64)
    for i in range(NUM):
        g.desc(i, GUEST + buf_addr, 64, 0, 0)
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(fd), str(USED), str(NUM)],
                               pass_fds=[fd], stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().strip() == "ready"
        # Start above 0 (a transient 0 must look like a step back) and keep every store's
        # value nonzero in its low and high byte often enough to matter.
        g.q.set_base(0x0101)
        g.avail_idx = 0x0101
        struct.pack_into("<H", buf, USED + 2, 0x0101)
        struct.pack_into("<H", buf, USED + 4 + 8 * NUM, 0x0101)
        for n in range(200_000):
            g.publish(n % NUM)
            chain = g.q.pop()
            assert chain is not None
            chain.release()
            g.q.push(chain.head, 0)
        assert g.q.broken is None
    finally:
        buf[SIZE - 2 : SIZE] = b"\x01\x00"  # the watcher's stop flag, past everything else
        out, _ = watcher.communicate(timeout=30)
        g.q.deactivate()
        g.mem.close()
        buf.close()
        os.close(fd)
    reads, back = (int(x) for x in out.split())
    assert reads > 0
    assert back == 0, f"the watcher saw a ring index move backwards {back} times in {reads} reads"
